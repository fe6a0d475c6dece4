"""The fused MoE / MLP kernels (families "moe" and "mlp"; metal_kernels/moe_*.metal).

MLX's path for one MoE layer is gate, up, SwiGLU, down and a weighted sum for the routed
experts plus three matmuls for the shared ones. Here it is two dispatches:

  gate_up  h[t, s, :] = silu(x[t] Wg_s) * (x[t] Wu_s)   routed slots s = (t, j), and the shared
                                                        MLP of width n*I as n always-on slots
  down     y[t, :] = sum_s w_s * Wd_s h[t, s, :]        routed then shared slots, fixed order

Only for affine-quantized experts (MLX's format), 1-8 tokens, float16/bfloat16/float32
activations, bits 2-8 and group sizes 32/64/128; otherwise the planners raise Unsupported.
A dense MLP is the same two kernels with no routed slot and one shared slot of its width.
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
    affine,
    check_quantized,
    header,
    launch,
    source,
    token_count,
)

log = logging.getLogger(__name__)

ROWS = 4  # output rows per simdgroup
THREADGROUP = (64, 1, 1)  # two simdgroups
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
        source=source("moe_gate_up.metal"),
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
        source=source("moe_down.metal"),
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


def plan_mlp(x: mx.array, mlp: nn.Module) -> Plan:
    """A dense SwiGLU MLP (gate_proj/up_proj/down_proj) as the fused kernels' single shared
    slot; Unsupported when it does not apply."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"activation dtype {x.dtype}")
    if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        raise Unsupported("not a SwiGLU MLP")
    n_tokens, D = token_count(x), x.shape[-1]
    scale_dtype = mlp.gate_proj.get("scales", mx.array(0)).dtype
    if scale_dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"scale dtype {scale_dtype}")
    n, inter, gu, dq = _shared_slots(mlp, D, None, scale_dtype)
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


def moe(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: nn.Module,
    shared_experts: nn.Module | None,
) -> Launch:
    """ops.moe's result from the two kernels; Unsupported where they do not apply."""
    plan = plan_moe(x, inds, scores, switch_mlp, shared_experts)
    return Launch(plan.variant, lambda: [run_plan(plan)], plan.variant.dtype)


def mlp(x: mx.array, layer: nn.Module) -> Launch:
    """ops.mlp's result (a dense SwiGLU MLP) from the two kernels; Unsupported where not."""
    plan = plan_mlp(x, layer)
    return Launch(plan.variant, lambda: [run_plan(plan)], plan.variant.dtype)
