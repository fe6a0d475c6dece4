"""Training-time hooks on the model's MoE routers: expert-load accounting and the
auxiliary-loss-free bias update of DeepSeek-V3 (bias += gamma * sign(mean load - load)).

The bias is not trained by gradient: it is frozen in the optimiser and moved after each
step from the number of tokens each expert received in that step. V4's hash-routed layers
(a fixed token -> experts table, no bias) are left alone.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_deepseek.models import deepseek_v4
from mlx_deepseek.models.deepseek_v3 import Model
from mlx_deepseek.models.moe import MoE

# per model family: (the gate's routing function, its bias) that the balancer hooks
_V3_GATE = ("route", "e_score_correction_bias")
_V4_GATE = ("_route", "bias")


def moe_layers(model: Model) -> list[tuple[str, MoE]]:
    """(name, MoE block) for every MoE layer with a learnt router, the MTP modules' included."""
    named = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.layers)]
    named += [(f"mtp.{j}", layer) for j, layer in enumerate(model.mtp)]
    out = []
    for name, layer in named:
        moe = getattr(layer, "ffn", None) or getattr(layer, "mlp", None)
        if isinstance(moe, MoE) or (isinstance(moe, deepseek_v4.MoE) and "bias" in moe.gate):
            out.append((name, moe))
    return out


def _selection_is_differentiable(gate) -> bool:
    logits = mx.zeros((2, gate.weight.shape[0]))
    bias = gate.get("e_score_correction_bias")
    try:
        mx.eval(mx.grad(lambda lg: gate.route(lg, bias)[1].sum())(logits))
        return True
    except ValueError:
        return False


def _differentiable_v3_route(route, scaling: float, norm: bool):
    """Expert choice without gradient, weights (sigmoid scores) with gradient.

    Only used while the product's router leaves its top-k indices in the autograd graph
    (mx.take_along_axis cannot differentiate through indices).
    """

    def routed(logits: mx.array, bias: mx.array):
        inds, _ = route(mx.stop_gradient(logits), bias)
        w = mx.take_along_axis(mx.sigmoid(logits), inds, axis=-1)
        if norm:
            w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        return inds, w * scaling

    return routed


class LoadBalancer:
    """Records each router's expert choices in a step and applies the bias update after it."""

    def __init__(self, model: Model, gamma: float):
        self.gamma = gamma
        self.layers = moe_layers(model)
        self.chosen: dict[str, mx.array] = {}
        args = model.args
        v4 = model.model_type == "deepseek_v4"
        self.route_name, self.bias_name = _V4_GATE if v4 else _V3_GATE
        for name, moe in self.layers:
            gate = moe.gate
            route = getattr(gate, self.route_name)
            if not v4 and not _selection_is_differentiable(gate):
                route = _differentiable_v3_route(
                    route, float(args.routed_scaling_factor), bool(args.norm_topk_prob)
                )
            setattr(gate, self.route_name, self._recorder(name, route))
            gate.freeze(keys=[self.bias_name], recurse=False)

    def _recorder(self, name: str, route):
        def recorded(logits: mx.array, bias: mx.array, *rest):
            inds, weights = route(logits, mx.stop_gradient(bias), *rest)
            self.chosen[name] = mx.stop_gradient(inds)
            return inds, weights

        return recorded

    def update(self, token_mask: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Move each bias by gamma towards balance; returns each layer's load (fractions).

        token_mask: per layer name, [B, L] booleans of the positions that count (not padding).
        """
        loads = {}
        for name, moe in self.layers:
            inds = np.array(self.chosen[name])  # [B, L, k]
            keep = token_mask[name][..., None].repeat(inds.shape[-1], axis=-1)
            E = moe.gate.weight.shape[0]
            load = np.bincount(inds[keep].ravel(), minlength=E).astype(np.float32)
            step = self.gamma * np.sign(load.mean() - load)
            gate = moe.gate
            setattr(gate, self.bias_name, gate[self.bias_name] + mx.array(step))
            loads[name] = load / max(load.sum(), 1.0)
        self.chosen.clear()
        return loads
