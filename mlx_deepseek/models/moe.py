"""DeepSeekMoE: the router (greedy, group_limited_greedy, noaux_tc) and the MoE block."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from ..experts import moe_experts
from ..kernels.router import fused_route
from ..kernels.runtime import fused_mlp
from .config import ModelArgs


class MLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        y = fused_mlp(x, self)  # two Metal kernels for 1-8 tokens of a quantized MLP
        if y is not None:
            return y
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def route(
    logits: mx.array,
    bias: mx.array | None,
    *,
    top_k: int,
    topk_method: str,
    scoring_func: str,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[mx.array, mx.array]:
    """Router logits [..., E] (float32) -> (expert indices [..., k], weights [..., k] float32)."""
    if scoring_func == "softmax":
        scores = mx.softmax(logits, axis=-1, precise=True)
    else:
        scores = mx.sigmoid(logits)
    choice = scores + bias if bias is not None else scores
    if topk_method != "greedy" and n_group > 1:
        grouped = mx.unflatten(choice, -1, (n_group, -1))  # [..., G, E/G]
        if topk_method == "group_limited_greedy":
            group_scores = grouped.max(axis=-1, keepdims=True)
        else:  # noaux_tc: sum of the two best (bias-corrected) scores in the group
            group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1, keepdims=True)
        n_drop = n_group - topk_group
        if n_drop > 0:
            drop = mx.argpartition(group_scores, kth=n_drop - 1, axis=-2)[..., :n_drop, :]
            grouped = mx.put_along_axis(grouped, drop, mx.array(-mx.inf, grouped.dtype), axis=-2)
        choice = mx.flatten(grouped, -2, -1)
    inds = mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if scoring_func == "sigmoid":
        # DeepSeek-V3: normalise the original sigmoid scores, then scale
        if norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        weights = weights * routed_scaling_factor
    elif top_k > 1 and norm_topk_prob:
        # DeepSeek-V2's original rule: renormalise instead of scaling
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    else:
        weights = weights * routed_scaling_factor
    return inds, weights


class MoEGate(nn.Module):
    """Router: `weight` [E, D] and, for noaux_tc, `e_score_correction_bias` [E], both float32."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.n_routed_experts
        self.weight = mx.zeros((E, args.hidden_size), dtype=mx.float32)
        if args.topk_method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((E,), dtype=mx.float32)
        self._config = dict(
            top_k=args.num_experts_per_tok,
            topk_method=args.topk_method,
            scoring_func=args.scoring_func,
            n_group=args.n_group or 1,
            topk_group=args.topk_group or 1,
            norm_topk_prob=bool(args.norm_topk_prob),
            routed_scaling_factor=float(args.routed_scaling_factor),
        )
        self._route = self._compiled_route = mx.compile(partial(route, **self._config))

    def __call__(self, x: mx.array, x32: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """x [..., D] -> (inds [..., k], weights [..., k] float32); x32: x in float32 when
        the caller has it already."""
        x32 = x.astype(mx.float32) if x32 is None else x32
        logits = x32 @ self.weight.T  # the weight is float32 (loading.py)
        bias = self.get("e_score_correction_bias")
        if self._route is self._compiled_route:  # not hooked (training's load accounting)
            fused = fused_route(logits, bias, self._route, **self._config)  # one Metal kernel
            if fused is not None:
                return fused
        return self._route(logits, bias)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = MoEGate(args)
        self.switch_mlp = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
        )
        if args.n_shared_experts:
            self.shared_experts = MLP(
                args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
            )

    def __call__(self, x: mx.array, x32: mx.array | None = None) -> mx.array:
        inds, scores = self.gate(x, x32)
        return moe_experts(x, inds, scores, self.switch_mlp, self.get("shared_experts"))
