"""Custom Metal kernels for decode and few-token batches, and the runtime that runs them.

The runtime (this module's first half) serves every kernel of the package:

- `launch(spec, inputs)` runs one `mx.fast.metal_kernel` dispatch described by a `KernelSpec`
  (sources in metal_kernels/, each compiled once per template instantiation);
- `enabled(family)` says whether a family of kernels may run: Metal present, not switched
  off by MLX_DEEPSEEK_KERNELS (0 = none; a comma list such as "moe,router" = only those;
  unset or 1 = all), not failed its self-check;
- `fused_call(...)` checks the first use of each variant on a Mac against MLX's reference of
  the same maths; on a compile error or a mismatch that family is switched off with one
  warning and the caller uses the reference;
- `pretend_metal(make_outputs)` lets a machine without Metal build the graph a Mac would run
  (for counting primitives): every family is on, no self-check runs, and each launch's
  outputs come from `make_outputs(spec, inputs)` instead of a kernel.

The families: "moe" (routed experts, below), "mlp" (dense SwiGLU MLPs, below), "router",
"norm" and "latent" (norm_kernels.py), "embedding" (norm_kernels.py), "mla" (mla_kernels.py).

The fused MoE kernels. MLX's path for one MoE layer is gate, up, SwiGLU, down and a weighted
sum for the routed experts plus three matmuls for the shared ones. Here it is two dispatches:

  gate_up  h[t, s, :] = silu(x[t] Wg_s) * (x[t] Wu_s)   routed slots s = (t, j), and the shared
                                                        MLP of width n*I as n always-on slots
  down     y[t, :] = sum_s w_s * Wd_s h[t, s, :]        routed then shared slots, fixed order

Only for affine-quantized experts (MLX's format), 1-8 tokens, float16/bfloat16/float32
activations, bits 2-8 and group sizes 32/64/128. Everything else (and every other backend)
returns None and the caller uses MLX's gather_qmm path. A dense MLP is the same two kernels
with no routed slot and one shared slot of its whole width.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

ENV_SWITCH = "MLX_DEEPSEEK_KERNELS"
FAMILIES = ("moe", "mlp", "router", "norm", "latent", "embedding", "mla")
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
MakeOutputs = Callable[["KernelSpec", Sequence[mx.array]], list[mx.array]]


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
    ensure_row_contiguous: bool = True

    def definition(self) -> dict:
        return {
            "name": self.name,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "source": self.source,
            "header": self.header,
            "ensure_row_contiguous": self.ensure_row_contiguous,
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


def source(filename: str) -> str:
    """The text of a file in metal_kernels/ (read once)."""
    if filename not in _sources:
        files = resources.files("mlx_deepseek.metal_kernels")
        _sources[filename] = files.joinpath(filename).read_text()
    return _sources[filename]


_source = source


def header(*files: str) -> str:
    """The shared headers a kernel needs, concatenated (passed as `header`)."""
    return "".join(source(f) + "\n" for f in files)


_kernels: dict[tuple, Callable] = {}


def _kernel(make_kernel: MakeKernel, spec: KernelSpec) -> Callable:
    # One kernel object per source; MLX compiles (and caches) each template instantiation.
    key = (make_kernel, spec.name, spec.source, spec.header, spec.ensure_row_contiguous)
    if key not in _kernels:
        _kernels[key] = make_kernel(**spec.definition())
    return _kernels[key]


class _State:
    disabled: set[str] = set()  # families switched off after a failed self-check
    checked: set[Hashable] = set()  # variants that passed it
    pretend: MakeOutputs | None = None  # set by pretend_metal()
    forced: bool | None = None  # set by forced(): overrides MLX_DEEPSEEK_KERNELS


def launch(
    spec: KernelSpec, inputs: Sequence[mx.array], make_kernel: MakeKernel | None = None
) -> list[mx.array]:
    """One dispatch of `spec`; make_kernel defaults to mx.fast.metal_kernel (tests pass the CPU
    emulator's drop-in). Inside pretend_metal() the outputs are its stand-ins."""
    if make_kernel is None and _State.pretend is not None:
        return list(_State.pretend(spec, inputs))
    make_kernel = make_kernel or mx.fast.metal_kernel
    return _kernel(make_kernel, spec)(inputs=list(inputs), **spec.launch())


def _switched_on(family: str) -> bool:
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value in ("", "1", "on", "all", "true", "yes"):
        return True
    if value in ("0", "off", "none", "false", "no"):
        return False
    return family in {v.strip() for v in value.split(",")}


def enabled(family: str = "moe") -> bool:
    """Whether a family of kernels may run: Metal present (or pretend_metal()), not switched
    off by MLX_DEEPSEEK_KERNELS, not failed its self-check."""
    on = _State.forced if _State.forced is not None else _switched_on(family)
    if not on or family in _State.disabled:
        return False
    return _State.pretend is not None or available()


@contextmanager
def forced(on: bool) -> Iterator[None]:
    """Every family on (where Metal is) or off while inside, whatever MLX_DEEPSEEK_KERNELS
    says (a benchmark's on/off comparison)."""
    saved, _State.forced = _State.forced, on
    try:
        yield
    finally:
        _State.forced = saved


def failed_families() -> list[str]:
    """The families switched off by a failed self-check in this process."""
    return sorted(_State.disabled)


def available() -> bool:
    """Whether this machine can run the kernels at all (MLX's Metal back-end)."""
    return mx.metal.is_available()


@contextmanager
def pretend_metal(make_outputs: MakeOutputs) -> Iterator[None]:
    """Build graphs as on a Mac with the kernels: every launch's outputs are
    make_outputs(spec, inputs) (e.g. one placeholder node), and no self-check runs.
    Graphs built inside are for inspection: they do not compute the kernels' results."""
    if _State.pretend is not None:
        raise RuntimeError("pretend_metal() does not nest")
    _State.pretend = make_outputs
    try:
        yield
    finally:
        _State.pretend = None


def _disable(family: str, message: str) -> None:
    _State.disabled.add(family)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


Compare = Callable[[list[mx.array], list[mx.array]], tuple[float, float]]


def max_relative_error(got: list[mx.array], ref: list[mx.array]) -> tuple[float, float]:
    """(max |got - ref|, max |ref|) over all outputs, in float32."""
    err = scale = 0.0
    for g, r in zip(got, ref, strict=True):
        g32, r32 = g.astype(mx.float32), r.astype(mx.float32)
        err = max(err, mx.max(mx.abs(g32 - r32)).item())
        scale = max(scale, mx.max(mx.abs(r32)).item())
    return err, scale


def fused_call(
    family: str,
    variant: Hashable,
    run: Callable[[], list[mx.array]],
    reference: Callable[[], list[mx.array]],
    dtype: mx.Dtype,
    compare: Compare = max_relative_error,
    what: str = "",
) -> list[mx.array] | None:
    """run()'s outputs, after checking the first use of `variant` against reference() (on a
    Mac; not inside pretend_metal()). None when the check fails: the caller then uses its
    reference path (the family is off from then on, with one warning)."""
    if _State.pretend is not None or (family, variant) in _State.checked:
        return run()
    name = what or f"fused {family} Metal kernels"
    try:
        got = run()
        err, scale = compare(got, reference())
    except Exception as e:  # a compile error surfaces here, at evaluation
        _disable(
            family,
            f"mlx-deepseek: the {name} failed ({type(e).__name__}: {e}); using MLX's path",
        )
        return None
    tolerance = SELF_CHECK_TOLERANCE.get(dtype, 1e-3) * scale + 1e-6
    if not err <= tolerance:  # also catches NaN
        _disable(
            family,
            f"mlx-deepseek: the {name} disagree with MLX's reference (max error {err:.3g}, "
            f"tolerance {tolerance:.3g}, {variant}); using MLX's path",
        )
        return None
    _State.checked.add((family, variant))
    return got


# ---- the fused MoE / MLP kernels -------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """Everything a compiled MoE kernel depends on (its template arguments)."""

    dtype: mx.Dtype  # activations (x and y)
    scale_dtype: mx.Dtype  # scales and biases
    gate_up: tuple[int, int]  # (bits, group size) of the routed gate and up projections
    down: tuple[int, int]
    shared_gate_up: tuple[int, int]  # the routed values when there are no shared slots
    shared_down: tuple[int, int]
    hidden: int  # D
    inter: int  # I, one expert's width
    top_k: int  # 0: a dense MLP (shared slots only)
    n_shared: int  # shared slots: the shared MLP's width / I
    n_tokens: int
    rows: int = ROWS


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
    common = header("moe_common.h")
    gate_up = KernelSpec(
        name="mdsk_moe_gate_up",
        input_names=GATE_UP_INPUTS,
        output_names=("h",),
        source=_source("moe_gate_up.metal"),
        header=common,
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
        header=common,
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


class Unsupported(Exception):
    """A kernel does not apply to these arguments (the reason is logged at debug level)."""


_Unsupported = Unsupported


def affine(layer: nn.Module, what: str) -> tuple[int, int]:
    """(bits, group size) of an affine-quantized layer without a bias, else Unsupported."""
    if "scales" not in layer:
        raise Unsupported(f"{what} is not quantized")
    if getattr(layer, "mode", "affine") != "affine" or layer.get("biases") is None:
        raise Unsupported(f"{what} is not affine-quantized")
    if getattr(layer, "global_scale", None) is not None or "bias" in layer:
        raise Unsupported(f"{what} has a global scale or a bias")
    bits, group = int(layer.bits), int(layer.group_size)
    if bits not in SUPPORTED_BITS or group not in SUPPORTED_GROUP_SIZES:
        raise Unsupported(f"{what}: bits={bits} group_size={group} not supported")
    return bits, group


_affine = affine


def check_shape(a: mx.array, shape: tuple[int, ...], what: str) -> None:
    if tuple(a.shape) != shape:
        raise Unsupported(f"{what} has shape {tuple(a.shape)}, expected {shape}")


def check_quantized(layer: nn.Module, lead: tuple[int, ...], out: int, k: int, q, what: str):
    """The weight/scales/biases of a quantized [*lead, out, k] matrix have their shapes."""
    bits, group = q
    check_shape(layer.weight, (*lead, out, k * bits // 32), f"{what}.weight")
    check_shape(layer.scales, (*lead, out, k // group), f"{what}.scales")
    check_shape(layer.biases, (*lead, out, k // group), f"{what}.biases")


def token_count(x: mx.array) -> int:
    """Tokens in x [..., D], or Unsupported when the decode kernels do not take that many."""
    n = x.size // x.shape[-1] if x.ndim and x.shape[-1] else 0
    if not 1 <= n <= MAX_TOKENS:
        raise Unsupported(f"{n} tokens (the kernels take 1 to {MAX_TOKENS})")
    return n


def _shared_slots(shared: nn.Module, D: int, inter: int | None, scale_dtype) -> tuple:
    """(n slots, slot width, gate/up spec, down spec) of a shared MLP, or Unsupported.
    inter None: a dense MLP, one slot of its whole width."""
    gate, up, down = shared.gate_proj, shared.up_proj, shared.down_proj
    gu = affine(gate, "shared gate_proj")
    if affine(up, "shared up_proj") != gu:
        raise Unsupported("shared gate_proj and up_proj are quantized differently")
    dq = affine(down, "shared down_proj")
    width = gate.weight.shape[0]
    inter = inter or width
    if width % inter or inter % dq[1]:
        raise Unsupported(f"shared width {width} is not a multiple of the expert width {inter}")
    for layer, out, k, q, what in (
        (gate, width, D, gu, "shared gate_proj"),
        (up, width, D, gu, "shared up_proj"),
        (down, D, width, dq, "shared down_proj"),
    ):
        check_quantized(layer, (), out, k, q, what)
        if layer.scales.dtype != scale_dtype or layer.biases.dtype != scale_dtype:
            raise Unsupported("shared experts' scales differ in dtype from the routed ones")
    return width // inter, inter, gu, dq


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
    except Unsupported as e:
        log.debug("fused MoE kernels not used: %s", e)
        return None


def _plan(x, inds, scores, switch_mlp, shared_experts) -> Plan:
    if x.dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"activation dtype {x.dtype}")
    D = x.shape[-1]
    top_k = inds.shape[-1]
    n_tokens = token_count(x)
    if tuple(inds.shape) != (*x.shape[:-1], top_k) or tuple(scores.shape) != tuple(inds.shape):
        raise Unsupported("inds/scores shapes do not match x")
    if type(getattr(switch_mlp, "activation", None)).__name__ != "SwiGLU":
        raise Unsupported("switch_mlp's activation is not SwiGLU")
    gate, up, down = switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj
    gu = affine(gate, "gate_proj")
    if affine(up, "up_proj") != gu:
        raise Unsupported("gate_proj and up_proj are quantized differently")
    dq = affine(down, "down_proj")
    E, inter = gate.weight.shape[0], gate.weight.shape[1]
    scale_dtype = gate.scales.dtype
    for layer, out, k, q, what in (
        (gate, inter, D, gu, "gate_proj"),
        (up, inter, D, gu, "up_proj"),
        (down, D, inter, dq, "down_proj"),
    ):
        check_quantized(layer, (E,), out, k, q, what)
        if layer.scales.dtype != scale_dtype or layer.biases.dtype != scale_dtype:
            raise Unsupported("scales/biases of the experts differ in dtype")
    if scale_dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"scale dtype {scale_dtype}")

    n_shared, sgu, sdq = 0, gu, dq
    shared_layers = (gate, up, down)  # stand-ins when there are no shared slots: never read
    unfused = None
    if shared_experts is not None:
        try:
            n_shared, _, sgu, sdq = _shared_slots(shared_experts, D, inter, scale_dtype)
            shared_layers = (
                shared_experts.gate_proj,
                shared_experts.up_proj,
                shared_experts.down_proj,
            )
        except Unsupported as e:
            log.debug("shared experts computed by MLX: %s", e)
            unfused = shared_experts

    variant = Variant(x.dtype, scale_dtype, gu, dq, sgu, sdq, D, inter, top_k, n_shared, n_tokens)
    x2 = x.reshape(n_tokens, D)
    inds2 = inds.reshape(n_tokens, top_k).astype(mx.uint32)
    scores2 = scores.reshape(n_tokens, top_k).astype(mx.float32)
    sg, su, sd = shared_layers
    gate_up_inputs = [x2, inds2, *_qs(gate), *_qs(up), *_qs(sg), *_qs(su)]
    down_inputs = [inds2, scores2, *_qs(down), *_qs(sd)]
    return Plan(variant, gate_up_inputs, down_inputs, x, unfused)


def _qs(layer: nn.Module) -> list[mx.array]:
    return [layer.weight, layer.scales, layer.biases]


def plan_mlp(x: mx.array, mlp: nn.Module) -> Plan | None:
    """A dense SwiGLU MLP (gate_proj/up_proj/down_proj) as the fused kernels' single shared
    slot, or None (with a debug log) when it does not apply."""
    try:
        if x.dtype not in SUPPORTED_DTYPES:
            raise Unsupported(f"activation dtype {x.dtype}")
        n_tokens, D = token_count(x), x.shape[-1]
        scale_dtype = mlp.gate_proj.get("scales", mx.array(0)).dtype
        if scale_dtype not in SUPPORTED_DTYPES:
            raise Unsupported(f"scale dtype {scale_dtype}")
        n, inter, gu, dq = _shared_slots(mlp, D, None, scale_dtype)
    except (Unsupported, AttributeError) as e:
        log.debug("fused MLP kernels not used: %s", e)
        return None
    variant = Variant(x.dtype, scale_dtype, gu, dq, gu, dq, D, inter, 0, n, n_tokens)
    # no routed slot: the routed inputs are stand-ins that the kernels never read
    dummy_inds, dummy_scores = mx.array([0], mx.uint32), mx.array([0.0], mx.float32)
    layers = _qs(mlp.gate_proj) + _qs(mlp.up_proj)
    gate_up_inputs = [x.reshape(n_tokens, D), dummy_inds, *layers, *layers]
    down_inputs = [dummy_inds, dummy_scores, *_qs(mlp.down_proj), *_qs(mlp.down_proj)]
    return Plan(variant, gate_up_inputs, down_inputs, x, None)


def run_plan(plan: Plan, make_kernel: MakeKernel | None = None) -> mx.array:
    """Both dispatches of a plan; make_kernel defaults to mx.fast.metal_kernel (tests pass
    the CPU emulator's drop-in)."""
    gate_up, down = kernel_specs(plan.variant)
    h = launch(gate_up, plan.gate_up_inputs, make_kernel)[0]
    y = launch(down, [h, *plan.down_inputs], make_kernel)[0]
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
        y = y + reference_mlp(x, shared_experts)
    return y


def reference_mlp(x: mx.array, mlp: nn.Module) -> mx.array:
    """MLX's computation of a SwiGLU MLP (moe.MLP without its kernels)."""
    return mlp.down_proj(nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def fused_moe(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: nn.Module,
    shared_experts: nn.Module | None,
) -> mx.array | None:
    """moe_experts' result from the fused Metal kernels, or None where they do not apply."""
    if not enabled("moe"):
        return None
    plan = plan_moe(x, inds, scores, switch_mlp, shared_experts)
    if plan is None:
        return None
    out = fused_call(
        "moe",
        plan.variant,
        lambda: [run_plan(plan)],
        lambda: [reference_moe(x, inds, scores, switch_mlp, shared_experts)],
        plan.variant.dtype,
        what="fused MoE Metal kernels",
    )
    return out[0] if out else None


def fused_mlp(x: mx.array, mlp: nn.Module) -> mx.array | None:
    """A dense SwiGLU MLP's result from the fused kernels, or None where they do not apply."""
    if not enabled("mlp"):
        return None
    plan = plan_mlp(x, mlp)
    if plan is None:
        return None
    out = fused_call(
        "mlp",
        plan.variant,
        lambda: [run_plan(plan)],
        lambda: [reference_mlp(x, mlp)],
        plan.variant.dtype,
        what="fused MLP Metal kernels",
    )
    return out[0] if out else None
