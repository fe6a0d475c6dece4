"""The fused MoE / MLP kernels (families "moe" and "mlp"; metal_kernels/moe_*.metal).

MLX's path for one MoE layer is gate, up, SwiGLU, down and a weighted sum for the routed
experts plus three matmuls for the shared ones. Here it is two dispatches:

  gate_up  h[t, s, :] = silu(x[t] Wg_s) * (x[t] Wu_s)   routed slots s = (t, j), and the shared
                                                        MLP of width n*I as n always-on slots
  down     y[t, :] = sum_s w_s * Wd_s h[t, s, :]        routed then shared slots, fixed order

For experts quantized in MLX's affine format (bits 2-8, group sizes 32/64/128) or as mxfp4
(DeepSeek V4's released FP4 experts: E2M1 values, an E8M0 scale per 32, no biases), each of
routed gate/up, routed down, shared gate/up and shared down in its own format; 1-8 tokens;
float16/bfloat16/float32 activations; optionally V4's clamped SwiGLU (swiglu_limit > 0:
silu(min(g, limit)) * clip(u, -limit, limit), routed and shared slots alike). Otherwise the
planners raise Unsupported. A dense MLP is the same two kernels with no routed slot and one
shared slot of its width.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .runtime import (
    SUPPORTED_DTYPES,
    KernelSpec,
    Launch,
    MakeKernel,
    Unsupported,
    check_quantized,
    header,
    launch,
    quant_format,
    source,
    token_count,
)

log = logging.getLogger(__name__)

ROWS = 4  # output rows per simdgroup
THREADGROUP = (64, 1, 1)  # two simdgroups
MODES = ("affine", "mxfp4")  # the kernels' MODE template values 0, 1
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
    "lim",
)
DOWN_INPUTS = ("h", "inds", "scores", "wd", "sd", "bd", "swd", "ssd", "sbd")
# the two kernels: (name, source in metal_kernels/, inputs, output)
GATE_UP = ("mdsk_moe_gate_up", "moe_gate_up.metal", GATE_UP_INPUTS, "h")
DOWN = ("mdsk_moe_down", "moe_down.metal", DOWN_INPUTS, "y")


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
    # "affine" or "mxfp4" for routed gate/up, routed down, shared gate/up, shared down
    modes: tuple[str, str, str, str] = ("affine",) * 4
    shared_scale_dtype: mx.Dtype | None = None  # None: scale_dtype
    swiglu_limit: float = 0.0  # > 0: V4's clamped SwiGLU (an input, not compiled in)


def kernel_specs(v: Variant) -> tuple[KernelSpec, KernelSpec]:
    """The gate_up and down launches for one variant: sources, geometry, template."""
    mode = {m: MODES.index(m) for m in MODES}
    shape = (
        ("D", v.hidden),
        ("I", v.inter),
        ("TOPK", v.top_k),
        ("NSH", v.n_shared),
        ("NT", v.n_tokens),
        ("ROWS", v.rows),
    )
    common = header("moe_common.h")

    def spec(
        kernel: tuple, formats: tuple, grid_rows: int, out: tuple, out_dtype: mx.Dtype
    ) -> KernelSpec:
        """A kernel (GATE_UP or DOWN): `formats` the (bits, group size) of its routed and its
        shared projections and their two modes; its output `out` [..., n], each simdgroup
        computing v.rows of the n features for one of the grid's rows."""
        name, filename, inputs, output = kernel
        (bits, gs), (sbits, sgs), (routed_mode, shared_mode) = formats
        template = (
            ("T", v.dtype),
            ("S", v.scale_dtype),
            ("SS", v.shared_scale_dtype or v.scale_dtype),
            ("BITS", bits),
            ("GS", gs),
            ("MODE", mode[routed_mode]),
            ("SBITS", sbits),
            ("SGS", sgs),
            ("SMODE", mode[shared_mode]),
            *shape,
        )
        return KernelSpec(
            name=name,
            input_names=inputs,
            output_names=(output,),
            source=source(filename),
            header=common,
            grid=(32 * math.ceil(out[-1] / v.rows), grid_rows, 1),
            threadgroup=THREADGROUP,
            template=template,
            output_shapes=(out,),
            output_dtypes=(out_dtype,),
        )

    slots = v.top_k + v.n_shared
    gate_up = (v.gate_up, v.shared_gate_up, v.modes[0::2])
    down = (v.down, v.shared_down, v.modes[1::2])
    return (
        # one grid row per routed slot (token, j) and per shared slot
        spec(GATE_UP, gate_up, v.n_tokens * v.top_k + v.n_shared, (v.n_tokens, slots, v.inter),
             mx.float32),
        spec(DOWN, down, 1, (v.n_tokens, v.hidden), v.dtype),
    )  # fmt: skip


@dataclass
class Plan:
    """A fused call worked out for given arrays and modules (see plan_moe)."""

    variant: Variant
    gate_up_inputs: list[mx.array]
    down_inputs: list[mx.array]  # after h, the gate_up output
    x: mx.array
    unfused_shared: nn.Module | None  # a shared MLP the kernels cannot take: MLX adds it
    swiglu_limit: float = 0.0

    def as_launch(self) -> Launch:
        """The op's result from the two kernels, for the metal back-end's `fused`."""
        return Launch(self.variant, lambda: [run_plan(self)], self.variant.dtype)


def _same_format(layers, what: str) -> tuple[tuple[int, int, str], tuple[int, int, str]]:
    """(gate/up format, down format) of (gate, up, down); gate and up must match."""
    gate, up, down = layers
    gu = quant_format(gate, f"{what}gate_proj")
    if quant_format(up, f"{what}up_proj") != gu:
        raise Unsupported(f"{what}gate_proj and {what}up_proj are quantized differently")
    return gu, quant_format(down, f"{what}down_proj")


def _scale_dtype(layers, what: str) -> mx.Dtype:
    """The one dtype of the layers' scales (and affine biases): a float dtype, or uint8 when
    all are mxfp4."""
    dtypes = {layer.scales.dtype for layer in layers}
    dtypes |= {layer.biases.dtype for layer in layers if layer.get("biases") is not None}
    if len(dtypes) != 1:
        raise Unsupported(f"{what}scales/biases differ in dtype")
    (dtype,) = dtypes
    if dtype not in (*SUPPORTED_DTYPES, mx.uint8):
        raise Unsupported(f"{what}scale dtype {dtype}")
    return dtype


def _shared_slots(shared: nn.Module, D: int, inter: int | None) -> tuple:
    """(n slots, slot width, gate/up format, down format, scale dtype) of a shared MLP, or
    Unsupported. inter None: a dense MLP, one slot of its whole width."""
    layers = (shared.gate_proj, shared.up_proj, shared.down_proj)
    gu, dq = _same_format(layers, "shared ")
    width = layers[0].weight.shape[0]
    inter = inter or width
    if width % inter or inter % dq[1]:
        raise Unsupported(f"shared width {width} is not a multiple of the expert width {inter}")
    for layer, out, k, q, what in (
        (layers[0], width, D, gu, "shared gate_proj"),
        (layers[1], width, D, gu, "shared up_proj"),
        (layers[2], D, width, dq, "shared down_proj"),
    ):
        check_quantized(layer, (), out, k, q, what)
    return width // inter, inter, gu, dq, _scale_dtype(layers, "shared ")


def plan_moe(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: nn.Module,
    shared_experts: nn.Module | None,
    swiglu_limit: float = 0.0,
) -> Plan:
    """The fused call for these arguments; Unsupported when it does not apply."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"activation dtype {x.dtype}")
    D = x.shape[-1]
    top_k = inds.shape[-1]
    n_tokens = token_count(x)
    if tuple(inds.shape) != (*x.shape[:-1], top_k) or tuple(scores.shape) != tuple(inds.shape):
        raise Unsupported("inds/scores shapes do not match x")
    if type(getattr(switch_mlp, "activation", None)).__name__ != "SwiGLU":
        raise Unsupported("switch_mlp's activation is not SwiGLU")
    layers = (switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj)
    gu, dq = _same_format(layers, "")
    E, inter = layers[0].weight.shape[0], layers[0].weight.shape[1]
    for layer, out, k, q, what in (
        (layers[0], inter, D, gu, "gate_proj"),
        (layers[1], inter, D, gu, "up_proj"),
        (layers[2], D, inter, dq, "down_proj"),
    ):
        check_quantized(layer, (E,), out, k, q, what)
    scale_dtype = _scale_dtype(layers, "")

    n_shared, sgu, sdq, shared_scale = 0, gu, dq, scale_dtype
    shared_layers = layers  # stand-ins when there are no shared slots: never read
    unfused = None
    if shared_experts is not None:
        try:
            n_shared, _, sgu, sdq, shared_scale = _shared_slots(shared_experts, D, inter)
            shared_layers = (
                shared_experts.gate_proj,
                shared_experts.up_proj,
                shared_experts.down_proj,
            )
        except Unsupported as e:
            log.debug("shared experts computed by MLX: %s", e)
            unfused = shared_experts

    variant = Variant(
        x.dtype, scale_dtype, gu[:2], dq[:2], sgu[:2], sdq[:2], D, inter, top_k, n_shared,
        n_tokens, ROWS, (gu[2], dq[2], sgu[2], sdq[2]), shared_scale, float(swiglu_limit),
    )  # fmt: skip
    x2 = x.reshape(n_tokens, D)
    inds2 = inds.reshape(n_tokens, top_k).astype(mx.uint32)
    scores2 = scores.reshape(n_tokens, top_k).astype(mx.float32)
    sg, su, sd = shared_layers
    lim = mx.array([swiglu_limit], mx.float32)
    gate_up_inputs = [x2, inds2, *_qs(layers[0]), *_qs(layers[1]), *_qs(sg), *_qs(su), lim]
    down_inputs = [inds2, scores2, *_qs(layers[2]), *_qs(sd)]
    return Plan(variant, gate_up_inputs, down_inputs, x, unfused, swiglu_limit)


def _qs(layer: nn.Module) -> list[mx.array]:
    """weight, scales, biases (mxfp4 has none: its scales stand in, never read)."""
    biases = layer.get("biases")
    return [layer.weight, layer.scales, layer.scales if biases is None else biases]


def plan_mlp(x: mx.array, mlp: nn.Module) -> Plan:
    """A dense SwiGLU MLP (gate_proj/up_proj/down_proj) as the fused kernels' single shared
    slot; Unsupported when it does not apply."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"activation dtype {x.dtype}")
    if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        raise Unsupported("not a SwiGLU MLP")
    n_tokens, D = token_count(x), x.shape[-1]
    n, inter, gu, dq, scale_dtype = _shared_slots(mlp, D, None)
    modes = (gu[2], dq[2]) * 2
    variant = Variant(
        x.dtype, scale_dtype, gu[:2], dq[:2], gu[:2], dq[:2], D, inter, 0, n, n_tokens, ROWS,
        modes, scale_dtype,
    )  # fmt: skip
    # no routed slot: the routed inputs are stand-ins that the kernels never read
    dummy_inds, dummy_scores = mx.array([0], mx.uint32), mx.array([0.0], mx.float32)
    layers = _qs(mlp.gate_proj) + _qs(mlp.up_proj)
    lim = mx.array([0.0], mx.float32)
    gate_up_inputs = [x.reshape(n_tokens, D), dummy_inds, *layers, *layers, lim]
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
        y = y + _shared_mlp(plan.unfused_shared, plan.x, plan.swiglu_limit)
    return y


def _shared_mlp(shared: nn.Module, x: mx.array, limit: float) -> mx.array:
    """A shared MLP the kernels do not take, by MLX (clamped as the kernels clamp)."""
    if not limit:
        return shared(x)
    gate, up = shared.gate_proj(x), shared.up_proj(x)
    gate, up = mx.minimum(gate, limit), mx.clip(up, -limit, limit)
    return shared.down_proj(nn.silu(gate) * up)
