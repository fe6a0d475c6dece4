"""The DeepSeek V4 model (Flash, Pro): hyper-connected blocks of V4 attention and a MoE with
hash routing in the first layers, the head's collapse of the copies, and the MTP module.

Follows the V3 model's interface: `model(inputs, cache=None)` -> logits [B, L, vocab],
`model.layers`, `model.make_cache()`, and for MTP drafting (speculative.py) `model.hidden`
(the last layer's residual copies [B, L, hc, D]), `model.logits` (their collapse, the final
RMSNorm and the head), `model.mtp_hidden`, `model.mtp_logits`. Parameter
names follow DeepSeek's checkpoint under `model.` (v4_weights.py maps both published layouts
onto them); the routed experts are stacked as `ffn.switch_mlp.{gate,up,down}_proj`.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from .. import ops
from .causal_lm import CausalLM
from .v4_attention import V4Attention
from .v4_cache import V4Cache, V4LayerCache
from .v4_config import ModelArgs
from .v4_weights import sanitize

__all__ = ["Model", "ModelArgs", "sanitize"]

# parameters kept in float32 whatever the compute dtype (as DeepSeek and transformers do)
FLOAT32_PARAMS = ("hc_", "attn_sink", ".ape", "ffn.gate.weight", "ffn.gate.bias")


class SharedExpert(nn.Module):
    """The shared expert: a SwiGLU MLP clamped at swiglu_limit (ops.moe computes it with the
    routed experts; DeepSeek's w1 / w3 / w2 are gate_proj / up_proj / down_proj here)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, inter = args.hidden_size, args.moe_intermediate_size
        self.gate_proj = nn.Linear(D, inter, bias=False)
        self.up_proj = nn.Linear(D, inter, bias=False)
        self.down_proj = nn.Linear(inter, D, bias=False)
        self.limit = float(args.swiglu_limit)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.limit > 0:
            gate, up = mx.minimum(gate, self.limit), mx.clip(up, -self.limit, self.limit)
        return self.down_proj(nn.silu(gate) * up)


def route(
    logits: mx.array,
    bias: mx.array | None,
    table_inds: mx.array | None,
    *,
    top_k: int,
    scoring_func: str,
    routed_scaling_factor: float,
) -> tuple[mx.array, mx.array]:
    """Router logits [..., E] float32 -> (expert indices [..., k], weights [..., k] float32).

    Scores sqrt(softplus) / sigmoid / softmax; the bias only chooses (noaux_tc style); a hash
    layer takes its experts from the token table instead. Weights are the chosen scores,
    normalised (not for softmax, as in DeepSeek's Gate) and scaled.
    """
    if scoring_func == "sqrtsoftplus":
        scores = mx.sqrt(mx.logaddexp(logits, 0.0))
    elif scoring_func == "sigmoid":
        scores = mx.sigmoid(logits)
    else:
        scores = mx.softmax(logits, axis=-1, precise=True)
    if table_inds is not None:
        inds = table_inds
    else:
        choice = scores if bias is None else scores + bias
        inds = mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k]
    # the choice is not differentiable; the chosen scores are (training: ./demo_train)
    inds = mx.stop_gradient(inds)
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if scoring_func != "softmax":
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return inds, weights * routed_scaling_factor


class Gate(nn.Module):
    """`weight` [E, D] float32; `bias` [E] (learned layers) or `tid2eid` [vocab, k] (hash:
    a fixed table, frozen so that training leaves it alone)."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size), dtype=mx.float32)
        if args.is_hash_layer(index):
            self.tid2eid = mx.zeros((args.vocab_size, args.num_experts_per_tok), dtype=mx.int32)
            self.freeze(keys=["tid2eid"], recurse=False)
        else:
            self.bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)
        self._route = partial(
            route,
            top_k=args.num_experts_per_tok,
            scoring_func=args.scoring_func,
            routed_scaling_factor=float(args.routed_scaling_factor),
        )

    def __call__(self, x: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
        logits = x.astype(mx.float32) @ self["weight"].astype(mx.float32).T
        table = self.get("tid2eid")
        table_inds = None if table is None else table[ids].astype(mx.uint32)
        return self._route(logits, self.get("bias"), table_inds)


class MoE(nn.Module):
    """Routed experts (stacked, mlx-lm's SwitchGLU) and the shared expert, all with the clamped
    SwiGLU, computed by ops.moe (the back-end's CPU split or fused Metal kernels)."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.gate = Gate(args, index)
        self.switch_mlp = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
        )
        self.shared_experts = SharedExpert(args)
        self.limit = float(args.swiglu_limit)

    def __call__(self, x: mx.array, ids: mx.array) -> mx.array:
        inds, weights = self.gate(x, ids)
        return ops.moe(x, inds, weights, self.switch_mlp, self.shared_experts, self.limit)


class Block(nn.Module):
    """One layer on the hyper-connected residual [B, L, hc, D]: the copies collapse into the
    attention's input, its output expands back and mixes with them; then the same for the MoE."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        D, hc = args.hidden_size, args.hc_mult
        mix = (2 + hc) * hc
        self.attn = V4Attention(args, index)
        self.ffn = MoE(args, index)
        self.attn_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", mx.zeros((mix, hc * D), dtype=mx.float32))
            setattr(self, f"hc_{site}_base", mx.zeros((mix,), dtype=mx.float32))
            setattr(self, f"hc_{site}_scale", mx.ones((3,), dtype=mx.float32))
        self._mix = partial(
            ops.hc_mixes, iters=args.hc_sinkhorn_iters, eps=args.hc_eps, norm_eps=args.rms_norm_eps
        )

    def __call__(self, x: mx.array, ids: mx.array, cache: V4LayerCache) -> mx.array:
        pre, post, comb = self._mix(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        a = self.attn(self.attn_norm(ops.hc_pre(x, pre)), cache)
        x = ops.hc_post(a, x, post, comb)
        pre, post, comb = self._mix(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        m = self.ffn(self.ffn_norm(ops.hc_pre(x, pre)), ids)
        return ops.hc_post(m, x, post, comb)


class HyperNorm(nn.Module):
    """The head's input: the copies [B, L, hc, D] collapsed (DeepSeek's hc_head_{fn,base,
    scale}, here hc_fn / hc_base / hc_scale), then the final RMSNorm (`weight`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, hc = args.hidden_size, args.hc_mult
        self.weight = mx.ones((D,))
        self.hc_fn = mx.zeros((hc, hc * D), dtype=mx.float32)
        self.hc_base = mx.zeros((hc,), dtype=mx.float32)
        self.hc_scale = mx.ones((1,), dtype=mx.float32)
        self.eps, self.hc_eps = args.rms_norm_eps, args.hc_eps

    def __call__(self, x: mx.array) -> mx.array:
        h = ops.hc_head(
            x, self.hc_fn, self.hc_base, self.hc_scale, eps=self.hc_eps, norm_eps=self.eps
        )
        return mx.fast.rms_norm(h, self.weight, self.eps)


class MTPLayer(Block):
    """DeepSeek V4's multi-token-prediction block (checkpoint `mtp.j.*`, attention kind
    `compress_ratios[num_hidden_layers + j]`): from the main model's copies h_i and token
    t_{i+1}, x = e_proj(enorm(embed(t))) + h_proj(hnorm(h)) per copy, a full block, then its
    own collapse + norm and the shared head predict t_{i+2}."""

    def __init__(self, args: ModelArgs, index: int):
        super().__init__(args, index)
        D = args.hidden_size
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.norm = HyperNorm(args)


class DeepseekV4Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hc_mult = args.hc_mult
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = HyperNorm(args)

    def hidden(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """The last layer's residual copies [B, L, hc, D] (before the head's collapse)."""
        h = self.embed_tokens(inputs)
        x = mx.broadcast_to(h[:, :, None], (*h.shape[:2], self.hc_mult, h.shape[-1]))
        if cache is None:
            cache = [layer.attn.make_cache() for layer in self.layers]
        for layer, c in zip(self.layers, cache, strict=True):
            x = layer(x, inputs, c)
        return x

    def hidden_and_normed(
        self, inputs: mx.array, cache: list | None = None
    ) -> tuple[mx.array, mx.array]:
        """(the last layer's copies [B, L, hc, D], them collapsed and normed [B, L, D])."""
        h = self.hidden(inputs, cache)
        return h, self.norm(h)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.norm(self.hidden(inputs, cache))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekV4Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        n = args.num_hidden_layers
        self.mtp = [MTPLayer(args, n + j) for j in range(args.num_nextn_predict_layers)]
        # the compressed rows quantized in the caches (load(kv_bits=...)); group size along
        # their non-RoPE channels
        self.kv_bits: int | None = None
        self.kv_group_size = 64

    @property
    def kv_quant(self) -> tuple[int, int] | None:
        """(group size, bits) of the caches' compressed rows, or None: full precision."""
        return None if self.kv_bits is None else (self.kv_group_size, self.kv_bits)

    def head(self, h: mx.array) -> mx.array:
        """Final-normed hidden states [B, L, D] -> logits [B, L, vocab]."""
        return self.lm_head(h)

    def make_cache(self) -> V4Cache:
        """Per layer its window, compressed rows (quantized with kv_bits), indexer rows and
        compressor state; the MTP layers' caches on `.mtp`."""
        return V4Cache(
            [layer.attn.make_cache(self.kv_quant) for layer in self.layers],
            self.make_mtp_cache(),
        )

    # ---- multi-token prediction ------------------------------------------------------------

    def make_mtp_cache(self) -> list[V4LayerCache]:
        return [layer.attn.make_cache(self.kv_quant) for layer in self.mtp]

    def mtp_hidden(
        self,
        hidden: mx.array,
        next_tokens: mx.array,
        depth: int = 0,
        cache: V4LayerCache | None = None,
    ) -> mx.array:
        """MTP module `depth` on the copies h_i [B, L, hc, D] (the main model's, or its own
        previous output) and t_{i+1} [B, L] -> its copies [B, L, hc, D]."""
        layer = self.mtp[depth]
        e = layer.e_proj(layer.enorm(self.model.embed_tokens(next_tokens)))  # [B, L, D]
        x = e[:, :, None] + layer.h_proj(layer.hnorm(hidden))
        return layer(x, next_tokens, cache if cache is not None else layer.attn.make_cache())

    def mtp_logits(self, h: mx.array, depth: int = 0) -> mx.array:
        return self.head(self.mtp[depth].norm(h))

    # ---- checkpoint mapping -----------------------------------------------------------------

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map DeepSeek's or transformers' tensor names (FP8 / FP4 decoded) onto ours."""
        return sanitize(self.args, weights)

    @property
    def cast_predicate(self):
        # mixing parameters, sinks, position biases and the router stay float32
        return lambda name: not any(key in name for key in FLOAT32_PARAMS)
