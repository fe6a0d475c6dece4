"""The one dispatch point for a MoE layer's expert computation.

Everything that computes experts goes through `moe_experts`: the MLX reference
(`mx.gather_qmm` / `mx.gather_mm` through mlx-lm's SwitchGLU, which sorts the tokens by
expert for large batches) and, on Metal, the fused kernels of `kernels.py`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from .kernels import fused_moe


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
    if _needs_float32_gather(switch_mlp, x):
        # MLX's CPU gather_mm only takes float32: compute unquantized experts in float32 there
        y = _switch_glu_float32(switch_mlp, x, inds)
    else:
        y = switch_mlp(x, inds)  # [..., k, D]
    y = (y * scores[..., None]).sum(axis=-2).astype(x.dtype)  # combined in float32
    if shared_experts is not None:
        y = y + shared_experts(x)
    return y
