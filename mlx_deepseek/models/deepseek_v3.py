"""The DeepSeek V2/V3 model: MLA + DeepSeekMoE decoder layers, the LM head and the MTP module.

Follows mlx-lm's model protocol: `model(inputs, cache=None)` -> logits [B, L, vocab],
`model.layers`, `model.make_cache()`. Parameter names equal mlx-lm's deepseek_v3 names, so
mlx-lm's quantized checkpoints load as they are; `weights.sanitize` maps raw Hugging Face
checkpoints (per-expert tensors, `kv_b_proj`, the MTP layer) onto them.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from .cache import KVCache, ModelCache, QuantizedKVCache
from .causal_lm import CausalLM
from .config import ModelArgs
from .mla import MLAttention
from .moe import MLP, MoE


def attention_mask(L: int, cache: Any = None) -> Any:
    """The mask for L new tokens: the cache's own where it makes one (mlx-lm's batch caches
    give a boolean array for left-padded rows), else ops.CAUSAL, or None for one token."""
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(L, return_array=False, window_size=None)
    return ops.CAUSAL if L > 1 else None


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int, attention: type[nn.Module] = MLAttention):
        super().__init__()
        self.self_attn = attention(args)
        self.mlp = (
            MoE(args) if args.is_moe_layer(index) else MLP(args.hidden_size, args.intermediate_size)
        )
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: Any = None) -> mx.array:
        """x [B, L, D] -> [B, L, D]."""
        h, m = self.forward(x, None, mask, cache)
        return h + m

    def forward(
        self,
        x: mx.array,
        residual: mx.array | None,
        mask: Any,
        cache: Any = None,
        normed: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """The layer on the residual stream x + residual (None: x), returning it as (h, m)
        with h + m the output: each add is done by ops.add_rms_norm with the norm after it.
        normed: input_layernorm(x) when the caller has it (ops.embed computes it)."""
        if normed is None:
            h, n = ops.add_rms_norm(x, residual, self.input_layernorm)
        else:
            h, n = x, normed
        a = self.self_attn(n, mask, cache)
        if isinstance(self.mlp, MoE):  # the router reads the normed stream in float32
            h, n, n32 = ops.add_rms_norm(h, a, self.post_attention_layernorm, float32_copy=True)
            return h, self.mlp(n, n32)
        h, n = ops.add_rms_norm(h, a, self.post_attention_layernorm)
        return h, self.mlp(n)


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3's multi-token-prediction module (checkpoint layer `num_hidden_layers + j`).

    Predicts token i+2 from the main model's pre-norm hidden state at i and token i+1:
    h' = eh_proj([enorm(embed(t_{i+1})), hnorm(h_i)]), a full decoder block, then
    shared_head.norm and the (shared) LM head. Its own embedding / head exist only when a
    checkpoint's copies differ from the main model's (see weights.sanitize).
    """

    def __init__(self, args: ModelArgs, index: int):
        super().__init__(args, index)
        self.enorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)


class DeepseekModel(nn.Module):
    def __init__(self, args: ModelArgs, attention: type[nn.Module] = MLAttention):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        n = args.num_hidden_layers
        self.layers = [DecoderLayer(args, i, attention) for i in range(n)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def _layers(self, inputs: mx.array, cache: list | None) -> tuple[mx.array, mx.array | None]:
        """The decoder stack: the last hidden states as (h, m), h + m BEFORE the final norm."""
        first = self.layers[0].input_layernorm if self.layers else None
        h, normed = ops.embed(self.embed_tokens, inputs, first)  # and the first layer's norm
        if cache is None:
            cache = [None] * len(self.layers)
        mask, m = attention_mask(h.shape[1], cache[0] if cache else None), None
        for layer, c in zip(self.layers, cache, strict=True):
            h, m = layer.forward(h, m, mask, c, normed)
            normed = None
        return h, m

    def hidden(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """Last hidden states BEFORE the final norm: [B, L, D]."""
        h, m = self._layers(inputs, cache)
        return h if m is None else h + m

    def hidden_and_normed(
        self, inputs: mx.array, cache: list | None = None
    ) -> tuple[mx.array, mx.array]:
        """(last hidden states before the final norm, after it)."""
        return ops.add_rms_norm(*self._layers(inputs, cache), self.norm)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.hidden_and_normed(inputs, cache)[1]


class Model(CausalLM):
    attention_class: type[nn.Module] = MLAttention  # other families swap the attention

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekModel(args, self.attention_class)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        n_mtp = args.num_nextn_predict_layers if args.model_type == "deepseek_v3" else 0
        self.mtp = [MTPLayer(args, args.num_hidden_layers + j) for j in range(n_mtp)]
        self.kv_bits: int | None = None  # c_kv quantized in the caches (load(kv_bits=...))
        self.kv_group_size = 64

    def head(self, h: mx.array) -> mx.array:
        """Final-normed hidden states [B, L, D] -> logits [B, L, vocab]."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> ModelCache:
        """One latent cache per layer (keys = c_kv [B,1,S,rank], values = k_pe [B,1,S,rope]),
        plus the MTP layers' caches on the same object; c_kv quantized when kv_bits is set."""
        return ModelCache(len(self.layers), len(self.mtp), self.kv_bits, self.kv_group_size)

    # ---- multi-token prediction ------------------------------------------------------------

    def make_mtp_cache(self) -> list[KVCache | QuantizedKVCache]:
        return self.make_cache().mtp

    def mtp_hidden(
        self, hidden: mx.array, next_tokens: mx.array, depth: int = 0, cache: KVCache | None = None
    ) -> mx.array:
        """The MTP block's output [B, L, D] (before shared_head.norm)."""
        layer = self.mtp[depth]
        # the layer's own embedding when it has one (a pipeline's last rank may hold no other)
        embedding = layer["embed_tokens"] if "embed_tokens" in layer else self.model.embed_tokens
        _, e = ops.embed(embedding, next_tokens, layer.enorm)
        x = layer.eh_proj(mx.concatenate([e, layer.hnorm(hidden)], axis=-1))
        return layer(x, attention_mask(x.shape[1], cache), cache)

    def mtp_logits(self, h: mx.array, depth: int = 0) -> mx.array:
        layer = self.mtp[depth]
        normed = layer.shared_head.norm(h)
        head = layer.shared_head.get("head")
        return head(normed) if head is not None else self.head(normed)

    # ---- checkpoint mapping -----------------------------------------------------------------

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map raw Hugging Face / mlx-lm tensor names onto this model's parameters."""
        from .weights import sanitize

        return sanitize(self.args, weights)

    @property
    def cast_predicate(self):
        # the router's correction bias stays float32 whatever the compute dtype
        return lambda name: "e_score_correction_bias" not in name
