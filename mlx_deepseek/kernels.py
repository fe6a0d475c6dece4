"""Fused Metal kernels for the routed experts of decode and few-token batches.

MLX's path for one MoE layer is gate, up, SwiGLU, down and a weighted sum for the routed
experts plus three matmuls for the shared ones. Here it is two `mx.fast.metal_kernel`
dispatches (sources in metal_kernels/):

  gate_up  h[t, s, :] = silu(x[t] Wg_s) * (x[t] Wu_s)   routed slots s = (t, j), and the shared
                                                        MLP of width n*I as n always-on slots
  down     y[t, :] = sum_s w_s * Wd_s h[t, s, :]        routed then shared slots, fixed order

Only for affine-quantized experts (MLX's format), 1-8 tokens, float16/bfloat16/float32
activations, bits 2-8 and group sizes 32/64/128. Everything else (and every other backend)
returns None and the caller uses MLX's gather_qmm path. MLX_DEEPSEEK_KERNELS=0 turns the
kernels off. The first use of each variant on a Mac is checked against MLX's reference; on a
failure or a mismatch the kernels are switched off with one warning.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

ENV_SWITCH = "MLX_DEEPSEEK_KERNELS"
MAX_TOKENS = 8
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
ROWS = 4  # output rows per simdgroup
THREADGROUP = (64, 1, 1)  # two simdgroups
# Self-check: max |kernel - reference| allowed, relative to max |reference|. The reference
# rounds its intermediates to the activation dtype; layout or indexing bugs give errors ~1.
SELF_CHECK_TOLERANCE = {mx.float32: 1e-3, mx.float16: 2e-2, mx.bfloat16: 6e-2}

GATE_UP_INPUTS = (
    "x",
    "inds",
    "wg",
    "sg",
    "bg",
    "wu",
    "su",
    "bu",
    "swg",
    "ssg",
    "sbg",
    "swu",
    "ssu",
    "sbu",
)
DOWN_INPUTS = ("h", "inds", "scores", "wd", "sd", "bd", "swd", "ssd", "sbd")

MakeKernel = Callable[..., Callable[..., list]]


@dataclass(frozen=True)
class Variant:
    """Everything a compiled kernel depends on (its template arguments)."""

    dtype: mx.Dtype  # activations (x and y)
    scale_dtype: mx.Dtype  # scales and biases
    gate_up: tuple[int, int]  # (bits, group size) of the routed gate and up projections
    down: tuple[int, int]
    shared_gate_up: tuple[int, int]  # the routed values when there are no shared slots
    shared_down: tuple[int, int]
    hidden: int  # D
    inter: int  # I, one expert's width
    top_k: int
    n_shared: int  # shared slots: the shared MLP's width / I
    n_tokens: int
    rows: int = ROWS


@dataclass(frozen=True)
class KernelSpec:
    """One kernel launch: what `mx.fast.metal_kernel` and its call take."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: tuple[tuple[str, object], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]

    def definition(self) -> dict:
        return {
            "name": self.name,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "source": self.source,
            "header": self.header,
        }

    def launch(self) -> dict:
        return {
            "grid": self.grid,
            "threadgroup": self.threadgroup,
            "template": list(self.template),
            "output_shapes": [list(s) for s in self.output_shapes],
            "output_dtypes": list(self.output_dtypes),
        }


_sources: dict[str, str] = {}


def _source(filename: str) -> str:
    if filename not in _sources:
        files = resources.files("mlx_deepseek.metal_kernels")
        _sources[filename] = files.joinpath(filename).read_text()
    return _sources[filename]


def kernel_specs(v: Variant) -> tuple[KernelSpec, KernelSpec]:
    """The gate_up and down launches for one variant: sources, geometry, template."""
    template = (
        ("T", v.dtype),
        ("S", v.scale_dtype),
        ("BITS", v.gate_up[0]),
        ("GS", v.gate_up[1]),
        ("SBITS", v.shared_gate_up[0]),
        ("SGS", v.shared_gate_up[1]),
        ("D", v.hidden),
        ("I", v.inter),
        ("TOPK", v.top_k),
        ("NSH", v.n_shared),
        ("NT", v.n_tokens),
        ("ROWS", v.rows),
    )
    down_template = (
        template[:2]
        + (("BITS", v.down[0]), ("GS", v.down[1]))
        + (("SBITS", v.shared_down[0]), ("SGS", v.shared_down[1]))
        + template[6:]
    )
    slots = v.top_k + v.n_shared
    header = _source("moe_common.h")
    gate_up = KernelSpec(
        name="mdsk_moe_gate_up",
        input_names=GATE_UP_INPUTS,
        output_names=("h",),
        source=_source("moe_gate_up.metal"),
        header=header,
        grid=(32 * math.ceil(v.inter / v.rows), v.n_tokens * v.top_k + v.n_shared, 1),
        threadgroup=THREADGROUP,
        template=template,
        output_shapes=((v.n_tokens, slots, v.inter),),
        output_dtypes=(mx.float32,),
    )
    down = KernelSpec(
        name="mdsk_moe_down",
        input_names=DOWN_INPUTS,
        output_names=("y",),
        source=_source("moe_down.metal"),
        header=header,
        grid=(32 * math.ceil(v.hidden / v.rows), 1, 1),
        threadgroup=THREADGROUP,
        template=down_template,
        output_shapes=((v.n_tokens, v.hidden),),
        output_dtypes=(v.dtype,),
    )
    return gate_up, down


@dataclass
class Plan:
    """A fused call worked out for given arrays and modules (see plan_moe)."""

    variant: Variant
    gate_up_inputs: list[mx.array]
    down_inputs: list[mx.array]  # after h, the gate_up output
    x: mx.array
    unfused_shared: nn.Module | None  # a shared MLP the kernels cannot take: MLX adds it


class _Unsupported(Exception):
    pass


def _affine(layer: nn.Module, what: str) -> tuple[int, int]:
    """(bits, group size) of an affine-quantized layer without a bias, else _Unsupported."""
    if "scales" not in layer:
        raise _Unsupported(f"{what} is not quantized")
    if getattr(layer, "mode", "affine") != "affine" or layer.get("biases") is None:
        raise _Unsupported(f"{what} is not affine-quantized")
    if getattr(layer, "global_scale", None) is not None or "bias" in layer:
        raise _Unsupported(f"{what} has a global scale or a bias")
    bits, group = int(layer.bits), int(layer.group_size)
    if bits not in SUPPORTED_BITS or group not in SUPPORTED_GROUP_SIZES:
        raise _Unsupported(f"{what}: bits={bits} group_size={group} not supported")
    return bits, group


def _check_shape(a: mx.array, shape: tuple[int, ...], what: str) -> None:
    if tuple(a.shape) != shape:
        raise _Unsupported(f"{what} has shape {tuple(a.shape)}, expected {shape}")


def _check_quantized(layer: nn.Module, lead: tuple[int, ...], out: int, k: int, q, what: str):
    bits, group = q
    _check_shape(layer.weight, (*lead, out, k * bits // 32), f"{what}.weight")
    _check_shape(layer.scales, (*lead, out, k // group), f"{what}.scales")
    _check_shape(layer.biases, (*lead, out, k // group), f"{what}.biases")


def _shared_slots(shared: nn.Module, D: int, inter: int, scale_dtype) -> tuple:
    """(n slots, gate/up spec, down spec) of a shared MLP, or _Unsupported."""
    gate, up, down = shared.gate_proj, shared.up_proj, shared.down_proj
    gu = _affine(gate, "shared gate_proj")
    if _affine(up, "shared up_proj") != gu:
        raise _Unsupported("shared gate_proj and up_proj are quantized differently")
    dq = _affine(down, "shared down_proj")
    width = gate.weight.shape[0]
    if width % inter or inter % dq[1]:
        raise _Unsupported(f"shared width {width} is not a multiple of the expert width {inter}")
    for layer, out, k, q, what in (
        (gate, width, D, gu, "shared gate_proj"),
        (up, width, D, gu, "shared up_proj"),
        (down, D, width, dq, "shared down_proj"),
    ):
        _check_quantized(layer, (), out, k, q, what)
        if layer.scales.dtype != scale_dtype or layer.biases.dtype != scale_dtype:
            raise _Unsupported("shared experts' scales differ in dtype from the routed ones")
    return width // inter, gu, dq


def plan_moe(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: nn.Module,
    shared_experts: nn.Module | None,
) -> Plan | None:
    """The fused call for these arguments, or None (with a debug log) when it does not apply."""
    try:
        return _plan(x, inds, scores, switch_mlp, shared_experts)
    except _Unsupported as e:
        log.debug("fused MoE kernels not used: %s", e)
        return None


def _plan(x, inds, scores, switch_mlp, shared_experts) -> Plan:
    if x.dtype not in SUPPORTED_DTYPES:
        raise _Unsupported(f"activation dtype {x.dtype}")
    D = x.shape[-1]
    top_k = inds.shape[-1]
    n_tokens = x.size // D if D else 0
    if not 1 <= n_tokens <= MAX_TOKENS:
        raise _Unsupported(f"{n_tokens} tokens (the kernels take 1 to {MAX_TOKENS})")
    if tuple(inds.shape) != (*x.shape[:-1], top_k) or tuple(scores.shape) != tuple(inds.shape):
        raise _Unsupported("inds/scores shapes do not match x")
    if type(getattr(switch_mlp, "activation", None)).__name__ != "SwiGLU":
        raise _Unsupported("switch_mlp's activation is not SwiGLU")
    gate, up, down = switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj
    gu = _affine(gate, "gate_proj")
    if _affine(up, "up_proj") != gu:
        raise _Unsupported("gate_proj and up_proj are quantized differently")
    dq = _affine(down, "down_proj")
    E, inter = gate.weight.shape[0], gate.weight.shape[1]
    scale_dtype = gate.scales.dtype
    for layer, out, k, q, what in (
        (gate, inter, D, gu, "gate_proj"),
        (up, inter, D, gu, "up_proj"),
        (down, D, inter, dq, "down_proj"),
    ):
        _check_quantized(layer, (E,), out, k, q, what)
        if layer.scales.dtype != scale_dtype or layer.biases.dtype != scale_dtype:
            raise _Unsupported("scales/biases of the experts differ in dtype")
    if scale_dtype not in SUPPORTED_DTYPES:
        raise _Unsupported(f"scale dtype {scale_dtype}")

    n_shared, sgu, sdq = 0, gu, dq
    shared_layers = (gate, up, down)  # stand-ins when there are no shared slots: never read
    unfused = None
    if shared_experts is not None:
        try:
            n_shared, sgu, sdq = _shared_slots(shared_experts, D, inter, scale_dtype)
            shared_layers = (
                shared_experts.gate_proj,
                shared_experts.up_proj,
                shared_experts.down_proj,
            )
        except _Unsupported as e:
            log.debug("shared experts computed by MLX: %s", e)
            unfused = shared_experts

    variant = Variant(x.dtype, scale_dtype, gu, dq, sgu, sdq, D, inter, top_k, n_shared, n_tokens)
    x2 = x.reshape(n_tokens, D)
    inds2 = inds.reshape(n_tokens, top_k).astype(mx.uint32)
    scores2 = scores.reshape(n_tokens, top_k).astype(mx.float32)
    qs = lambda layer: [layer.weight, layer.scales, layer.biases]  # noqa: E731
    sg, su, sd = shared_layers
    gate_up_inputs = [x2, inds2, *qs(gate), *qs(up), *qs(sg), *qs(su)]
    down_inputs = [inds2, scores2, *qs(down), *qs(sd)]
    return Plan(variant, gate_up_inputs, down_inputs, x, unfused)


_kernels: dict[tuple, Callable] = {}


def _kernel(make_kernel: MakeKernel, spec: KernelSpec) -> Callable:
    # One kernel object per source; MLX compiles (and caches) each template instantiation.
    key = (make_kernel, spec.name, spec.source, spec.header)
    if key not in _kernels:
        _kernels[key] = make_kernel(**spec.definition())
    return _kernels[key]


def run_plan(plan: Plan, make_kernel: MakeKernel | None = None) -> mx.array:
    """Both dispatches of a plan; make_kernel defaults to mx.fast.metal_kernel (tests pass
    the CPU emulator's drop-in)."""
    make_kernel = make_kernel or mx.fast.metal_kernel
    gate_up, down = kernel_specs(plan.variant)
    h = _kernel(make_kernel, gate_up)(inputs=plan.gate_up_inputs, **gate_up.launch())[0]
    y = _kernel(make_kernel, down)(inputs=[h, *plan.down_inputs], **down.launch())[0]
    y = y.reshape(plan.x.shape)
    if plan.unfused_shared is not None:
        y = y + plan.unfused_shared(plan.x)
    return y


def reference_moe(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: nn.Module,
    shared_experts: nn.Module | None,
) -> mx.array:
    """MLX's own computation of the same thing (gather_qmm through SwitchGLU)."""
    y = switch_mlp(x, inds)  # [..., k, D]
    y = (y * scores[..., None]).sum(axis=-2).astype(x.dtype)
    if shared_experts is not None:
        y = y + shared_experts(x)
    return y


class _State:
    disabled = False
    checked: set[Variant] = set()


def enabled() -> bool:
    """Whether fused_moe may run: Metal present, not switched off, not failed its check."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or _State.disabled:
        return False
    return mx.metal.is_available()


def _disable(message: str) -> None:
    _State.disabled = True
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _self_check(plan: Plan, x, inds, scores, switch_mlp, shared_experts) -> bool:
    v = plan.variant
    try:
        got = run_plan(plan)
        ref = reference_moe(x, inds, scores, switch_mlp, shared_experts)
        err = mx.max(mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)))
        scale = mx.max(mx.abs(ref.astype(mx.float32)))
        err, scale = err.item(), scale.item()
    except Exception as e:  # a compile error surfaces here, at evaluation
        _disable(
            f"mlx-deepseek: the fused MoE Metal kernels failed ({type(e).__name__}: {e}); "
            "using MLX's gather_qmm path"
        )
        return False
    tolerance = SELF_CHECK_TOLERANCE[v.dtype] * scale + 1e-6
    if not err <= tolerance:  # also catches NaN
        _disable(
            f"mlx-deepseek: the fused MoE Metal kernels disagree with MLX's reference "
            f"(max error {err:.3g}, tolerance {tolerance:.3g}, {v}); using MLX's "
            "gather_qmm path"
        )
        return False
    return True


def fused_moe(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: nn.Module,
    shared_experts: nn.Module | None,
) -> mx.array | None:
    """moe_experts' result from the fused Metal kernels, or None where they do not apply."""
    if not enabled():
        return None
    plan = plan_moe(x, inds, scores, switch_mlp, shared_experts)
    if plan is None:
        return None
    if plan.variant not in _State.checked:
        if not _self_check(plan, x, inds, scores, switch_mlp, shared_experts):
            return None
        _State.checked.add(plan.variant)
    return run_plan(plan)
