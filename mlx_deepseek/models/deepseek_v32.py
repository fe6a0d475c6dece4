"""DeepSeek V3.2 / V3.2-Exp: DeepSeek-V3 plus DeepSeek Sparse Attention (DSA).

Each layer's MLA gets a lightning indexer (DeepSeek's inference/model.py, V3.2-Exp):
q = wq_b(q_lora residual) [Hi heads x Di], k = LayerNorm(wk(x)) [Di] (one key head), RoPE on
the FIRST qk_rope_head_dim channels of both in the half-split layout (DeepSeek's first code
rotated interleaved pairs, which they later called a bug; MLA itself stays interleaved),
head weights weights_proj(x) * Hi^-0.5 * Di^-0.5. Every query attends only to its
`index_topk` best-scoring positions (ops/sparse.py). DeepSeek's Hadamard rotation and FP8
quantization of q and k are numeric details (the rotation is orthogonal) left out here, as
transformers does.

The indexer's keys are cached beside MLA's latent (`IndexedCache`: index_head_dim = 128
values per token per layer). While a layer's context holds at most index_topk positions
every causal position is selected, and the layer runs V3's MLA unchanged; past it, prefill
and decode gather the selected latent rows. The MTP layer of V3.2 checkpoints is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from .. import ops
from ..errors import ConfigError, DeepSeekError
from ..ops import sparse
from . import config, deepseek_v3
from .cache import ModelCache
from .mla import MLAttention
from .rope import RoPE


@dataclass
class ModelArgs(config.ModelArgs):
    """V3's fields plus the indexer's (Hugging Face names)."""

    model_type: str = "deepseek_v32"
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("deepseek_v32",)

    @property
    def kv_values_per_layer(self) -> int:
        """MLA's latent plus the indexer's key."""
        return super().kv_values_per_layer + self.index_head_dim

    def validate(self, source: str = "config.json") -> None:
        super().validate(source)
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: {name}={value!r} must be a positive integer")
        if self.q_lora_rank is None:
            raise ConfigError(
                f"{source}: q_lora_rank=None, but deepseek_v32's indexer reads the query LoRA "
                "residual: give q_lora_rank"
            )
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(
                f"{source}: index_head_dim={self.index_head_dim} is smaller than "
                f"qk_rope_head_dim={self.qk_rope_head_dim} (the indexer ropes that many channels)"
            )


class Indexer(nn.Module):
    """The lightning indexer: parameter names as in the checkpoints (`self_attn.indexer.*`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = H = args.index_n_heads
        self.head_dim = D = args.index_head_dim
        self.wq_b = nn.Linear(args.q_lora_rank, H * D, bias=False)
        self.wk = nn.Linear(args.hidden_size, D, bias=False)
        self.k_norm = nn.LayerNorm(D, eps=1e-6)
        self.weights_proj = nn.Linear(args.hidden_size, H, bias=False)
        self.rope = RoPE(args, traditional=False)
        self.weight_scale = H**-0.5 * D**-0.5

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        """Half-split RoPE on the first rope channels of x [B, heads, L, D]."""
        r = self.rope.dims
        return mx.concatenate([self.rope(x[..., :r], offset), x[..., r:]], axis=-1)

    def keys(self, x: mx.array, offset: int) -> mx.array:
        """x [B, L, hidden] -> the roped keys [B, 1, L, D] the cache holds (x's dtype)."""
        k = self.wk(x).astype(mx.float32)
        norm = self.k_norm
        k = mx.fast.layer_norm(
            k, norm.weight.astype(mx.float32), norm.bias.astype(mx.float32), norm.eps
        )
        return self._rope(k[:, None], offset).astype(x.dtype)

    def queries(self, x: mx.array, qr: mx.array, offset: int) -> tuple[mx.array, mx.array]:
        """(roped queries [B, L, H, D], head weights [B, L, H] with both scales), float32."""
        B, L, _ = x.shape
        q = self.wq_b(qr).astype(mx.float32).reshape(B, L, self.n_heads, self.head_dim)
        q = self._rope(q.transpose(0, 2, 1, 3), offset).transpose(0, 2, 1, 3)
        w = self.weights_proj(x).astype(mx.float32) * self.weight_scale
        return q, w


class IndexedCache(KVCache):
    """One layer's cache: MLA's latent (keys = c_kv [B,1,S,rank], values = k_pe [B,1,S,rope],
    as in V3) plus the indexer's keys [B, 1, S, index_head_dim], at the same offset: trimming
    the one trims the other. mlx-lm's prompt-cache files rebuild a layer by its class name,
    which theirs lacks: the chat refuses /save for it (`savable`)."""

    savable = False

    def __init__(self):
        super().__init__()
        self.index_keys: mx.array | None = None

    def update_index(self, k: mx.array) -> mx.array:
        """Store the indexer keys k [B, 1, L, D] of the next L positions (call BEFORE
        update_and_fetch, which advances the offset); returns all of them [B, 1, S, D]."""
        prev, n = self.offset, k.shape[2]
        if self.index_keys is None or prev + n > self.index_keys.shape[2]:
            grow = -(-n // self.step) * self.step
            new = mx.zeros((*k.shape[:2], grow, k.shape[3]), k.dtype)
            if self.index_keys is None:
                self.index_keys = new
            else:
                self.index_keys = mx.concatenate([self.index_keys[..., :prev, :], new], axis=2)
        self.index_keys[..., prev : prev + n, :] = k
        return self.index_keys[..., : prev + n, :]

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.index_keys

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.index_keys = v

    def to_quantized(self, *args, **kwargs):
        raise DeepSeekError(  # mlx-lm's kv_bits
            "kv_bits: V3.2's cache (latent plus the indexer's keys) is not quantized yet; "
            "drop kv_bits"
        )

    @property
    def nbytes(self) -> int:
        extra = self.index_keys.nbytes if self.index_keys is not None else 0
        return super().nbytes + extra


class SparseAttention(MLAttention):
    """MLA whose queries attend only to the positions the indexer selects."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.indexer = Indexer(args)
        self.index_topk = args.index_topk
        self.chunk: int | None = None  # queries per chunk (None: ops.sparse decides)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        """x [B, L, D] -> [B, L, D]; mask as MLA's (None, ops.CAUSAL or a boolean array)."""
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        k_index = self.indexer.keys(x, offset)  # [B, 1, L, Di]
        if cache is not None:
            k_index = cache.update_index(k_index)
        S = k_index.shape[2]
        if S <= self.index_topk:
            return super().__call__(x, mask, cache)  # the indexer selects every position

        h = self.heads()
        c_kv, k_pe, qr = ops.latent(
            self.kv_a_proj_with_mqa(x), self.kv_a_layernorm, self.rope, offset,
            self.q_a_proj(x), self.q_a_layernorm,
        )  # fmt: skip
        q = self.q_b_proj(qr)  # [B, L, H * qk]
        if cache is not None:
            c_kv, k_pe = cache.update_and_fetch(c_kv, k_pe)  # [B, 1, S, *]
        q_nope, q_pe = mx.split(q.reshape(B, L, h.heads, -1).transpose(0, 2, 1, 3), [h.nope], -1)
        q_index, weights = self.indexer.queries(x, qr, offset)
        out = sparse.sparse_attention(
            q_index,
            k_index[:, 0],
            weights,
            h.embed_q(q_nope),  # [B, H, L, rank]
            h.rope(q_pe, offset),
            c_kv[:, 0],
            k_pe[:, 0],
            visible=sparse.visible_positions(mask, L, S, offset),
            topk=self.index_topk,
            scale=h.scale,
            chunk=self.chunk,
        )
        out = h.unembed_out(out)  # [B, H, L, v]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Model(deepseek_v3.Model):
    attention_class = SparseAttention

    def make_cache(self) -> ModelCache:
        """Per layer the latent cache plus the indexer's keys (IndexedCache)."""
        return ModelCache(len(self.layers), 0, layer_cache=IndexedCache)
