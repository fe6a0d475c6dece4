"""The one dispatch point for a MoE layer's expert computation.

Everything that computes experts goes through `moe_experts`: the MLX reference
(`mx.gather_qmm` / `mx.gather_mm` through mlx-lm's SwitchGLU, which sorts the tokens by
expert for large batches) and, on Metal, the fused kernels of `kernels.py`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from . import cpu_parallel
from .kernels import fused_moe

# the CPU splits a MoE layer's experts across its streams for up to this many tokens
# (decode and MTP verification); longer batches go through SwitchGLU's sorted gather
MAX_SPLIT_TOKENS = 16


def _needs_float32_gather(switch_mlp: SwitchGLU, x: mx.array) -> bool:
    return (
        x.dtype != mx.float32
        and "scales" not in switch_mlp.gate_proj
        and mx.default_device() == mx.cpu
    )


def _switch_glu_float32(switch_mlp: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
    """SwitchGLU computed in float32 with mx.gather_mm: [..., D] -> [..., k, D]."""

    def project(layer: nn.Module, h: mx.array) -> mx.array:
        w = layer.weight.astype(mx.float32).swapaxes(-1, -2)
        return mx.gather_mm(h, w, rhs_indices=inds)

    h = mx.expand_dims(x.astype(mx.float32), (-2, -3))  # [..., 1, 1, D]
    h = nn.silu(project(switch_mlp.gate_proj, h)) * project(switch_mlp.up_proj, h)
    return project(switch_mlp.down_proj, h).squeeze(-2)


def moe_experts(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: SwitchGLU,
    shared_experts: nn.Module | None,
) -> mx.array:
    """sum_j scores[..., j] * expert_{inds[..., j]}(x) + shared_experts(x), in x.dtype.

    x: [..., D]; inds: [..., k] int; scores: [..., k] float32 routing weights (the routed
    scaling factor already applied).
    """
    y = fused_moe(x, inds, scores, switch_mlp, shared_experts)
    if y is not None:  # fused Metal kernels: Metal, quantized experts, 1-8 tokens
        return y
    y = _split_experts(x, inds, scores, switch_mlp, shared_experts)
    if y is not None:  # the CPU's streams, a share of the experts each
        return y
    return _experts(x, inds, scores, switch_mlp, shared_experts)


def _experts(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: SwitchGLU,
    shared_experts: nn.Module | None,
) -> mx.array:
    """MLX's path (on one stream)."""
    if _needs_float32_gather(switch_mlp, x):
        # MLX's CPU gather_mm only takes float32: compute unquantized experts in float32 there
        y = _switch_glu_float32(switch_mlp, x, inds)
    else:
        y = switch_mlp(x, inds)  # [..., k, D]
    y = (y * scores[..., None]).sum(axis=-2).astype(x.dtype)  # combined in float32
    if shared_experts is not None:
        y = y + shared_experts(x)
    return y


def _split_experts(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: SwitchGLU,
    shared_experts: nn.Module | None,
) -> mx.array | None:
    """The experts of a few tokens split across the CPU streams, each stream computing a
    contiguous share of the selected slots (the first also the shared experts), summed on the
    default stream. None when it should not split."""
    streams = cpu_parallel.workers()
    tokens = x.size // x.shape[-1]
    if not streams or tokens > MAX_SPLIT_TOKENS or "scales" not in switch_mlp.gate_proj:
        return None
    k = inds.shape[-1]
    w = switch_mlp.gate_proj["weight"]
    if 3 * k * (w.nbytes // w.shape[0]) < 2 * cpu_parallel.MIN_PART_BYTES:
        return None  # too little to read for a join to pay
    per_expert = w.shape[-2]
    shared_units = 0
    if shared_experts is not None:
        shared_units = round(shared_experts.gate_proj["weight"].shape[0] / per_expert)
    slots = cpu_parallel.split_slots(k, shared_units, len(streams))

    def part(i: int, lo: int, hi: int) -> mx.array | None:
        def run() -> mx.array | None:
            y = None
            if hi > lo:
                y = switch_mlp(x, inds[..., lo:hi])
                y = (y * scores[..., lo:hi, None]).sum(axis=-2)
            if i == 0 and shared_experts is not None:
                shared = shared_experts(x).astype(mx.float32 if y is None else y.dtype)
                y = shared if y is None else y + shared
            return y

        return run

    parts = [part(i, lo, hi) for i, (lo, hi) in enumerate(slots)]
    parts = [p for i, p in enumerate(parts) if slots[i][1] > slots[i][0] or i == 0]
    outs = [y for y in cpu_parallel.parallel(parts, streams) if y is not None]
    y = outs[0]
    for other in outs[1:]:
        y = y + other
    return y.astype(x.dtype)
