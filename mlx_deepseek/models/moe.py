"""DeepSeekMoE: the router (greedy, group_limited_greedy, noaux_tc), the MoE block, the MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from .. import ops
from .config import ModelArgs


class MLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return ops.mlp(x, self)


def routing(args: ModelArgs) -> ops.Routing:
    return ops.Routing(
        top_k=args.num_experts_per_tok,
        topk_method=args.topk_method,
        scoring_func=args.scoring_func,
        n_group=args.n_group or 1,
        topk_group=args.topk_group or 1,
        norm_topk_prob=bool(args.norm_topk_prob),
        routed_scaling_factor=float(args.routed_scaling_factor),
    )


class MoEGate(nn.Module):
    """Router: `weight` [E, D] and, for noaux_tc, `e_score_correction_bias` [E], both float32."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.n_routed_experts
        self.weight = mx.zeros((E, args.hidden_size), dtype=mx.float32)
        if args.topk_method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((E,), dtype=mx.float32)
        self.routing = routing(args)

    def __call__(self, x: mx.array, x32: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """x [..., D] -> (inds [..., k], weights [..., k] float32); x32: x in float32 when
        the caller has it already."""
        x32 = x.astype(mx.float32) if x32 is None else x32
        logits = x32 @ self.weight.T  # the weight is float32 (loading.py)
        return self.route(logits, self.get("e_score_correction_bias"))

    def route(self, logits: mx.array, bias: mx.array | None) -> tuple[mx.array, mx.array]:
        """The routing rule on the logits (training replaces it to record the choices)."""
        return ops.route(logits, bias, self.routing)


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
        inds, weights = self.gate(x, x32)
        return ops.moe(x, inds, weights, self.switch_mlp, self.get("shared_experts"))
