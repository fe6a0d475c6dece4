"""The model's cache: one latent KV cache per layer, plus the MTP module's own state.

`ModelCache` is a plain list of per-layer caches (keys = c_kv [B, 1, S, kv_lora_rank],
values = roped k_pe [B, 1, S, qk_rope_head_dim]), so mlx-lm's generation, trimming and
prompt-cache files work on it unchanged. Speculative decoding with the MTP head keeps its
extra state on the same object: the MTP layers' latent caches and the main model's pre-norm
hidden state at the last cached position (MTP entry i pairs h_i with token i+1, so the
last position waits for the next token).

The latent cache can be quantized (`kv_bits`, or mlx-lm's `kv_bits` through `to_quantized`):
c_kv in groups along the rank with MLX's affine format, k_pe at full precision (at 4 bits
quantizing it too adds ~19% KL for 22% fewer bytes; at 8 bits it would save 9%: README,
"Bigger than memory"). The attention ops read the quantized c_kv directly (ops.mlx).

Both classes carry mlx-lm's class names (KVCache, QuantizedKVCache) and state layout, so
mlx-lm's prompt-cache files save and load them (as mlx-lm's classes; the chat copies the
state back into the model's own cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlx_lm_cache

from ..errors import ArgumentTypeError, ArgumentValueError, DeepSeekError

KV_BITS = (4, 8)  # what --kv-bits / load(kv_bits=...) offer
GROUP_SIZES = (64, 32)  # MLX's affine group sizes that fit DeepSeek's ranks, preferred first


def latent_group_size(rank: int, preferred: int = 64, what: str = "kv_lora_rank") -> int:
    """The quantization group size along c_kv's rank (or `what`, another width quantized
    the same way: V4's compressed rows' non-RoPE channels): `preferred` when it divides the
    rank, else the largest of GROUP_SIZES that does; DeepSeekError when none does."""
    for g in (preferred, *GROUP_SIZES):
        if g in (32, 64, 128) and rank % g == 0:
            return g
    raise DeepSeekError(
        f"{what}={rank} is not a multiple of 32, so the cache cannot be quantized in MLX's "
        "groups: drop kv_bits"
    )


def check_kv_bits(kv_bits: int | None) -> int | None:
    """kv_bits as given to load() or --kv-bits: None, 4 or 8 (one line otherwise)."""
    if kv_bits is None:
        return None
    if isinstance(kv_bits, bool) or not isinstance(kv_bits, int):
        raise ArgumentTypeError(f"kv_bits={kv_bits!r}: give 8 or 4 (an int), or None")
    if kv_bits not in KV_BITS:
        raise ArgumentValueError(
            f"kv_bits={kv_bits!r}: the latent cache quantizes to 8 or 4 bits (or give none "
            "for full precision)"
        )
    return kv_bits


class KVCache(mlx_lm_cache.KVCache):
    """One layer's full-precision latent cache: mlx-lm's KVCache whose `to_quantized` (what
    mlx-lm's `kv_bits` calls) gives the latent QuantizedKVCache below."""

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedKVCache:
        rank = None if self.keys is None else self.keys.shape[-1]
        if rank is not None and rank % group_size:
            raise DeepSeekError(
                f"kv_group_size={group_size} does not divide kv_lora_rank={rank}: give "
                f"kv_group_size={latent_group_size(rank)}"
            )
        out = QuantizedKVCache(group_size=group_size, bits=bits)
        if self.keys is not None and self.offset:
            n = self.offset
            out.keys = tuple(mx.quantize(self.keys[..., :n, :], group_size=group_size, bits=bits))
            out.values = self.values[..., :n, :]
            out.offset = n
        return out


class QuantizedKVCache(mlx_lm_cache.QuantizedKVCache):
    """One layer's latent cache with c_kv quantized: keys = (packed uint32 [B, 1, S, rank *
    bits / 32], scales [B, 1, S, rank / group], biases [same]), values = k_pe [B, 1, S,
    rope] at full precision. mlx-lm's state layout (keys, values, offset, group_size, bits)."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        B, H, L, rank = keys.shape
        prev = self.offset
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            steps = (self.step + L - 1) // self.step * self.step
            shape = (B, H, steps)
            grown_k = (
                mx.zeros((*shape, rank * self.bits // 32), mx.uint32),
                mx.zeros((*shape, rank // self.group_size), keys.dtype),
                mx.zeros((*shape, rank // self.group_size), keys.dtype),
            )
            grown_v = mx.zeros((*shape, values.shape[-1]), values.dtype)
            if self.keys is None:
                self.keys, self.values = grown_k, grown_v
            else:
                old_k = tuple(k[..., :prev, :] for k in self.keys)
                old_v = self.values[..., :prev, :]
                self.keys = tuple(
                    mx.concatenate([o, g], axis=2) for o, g in zip(old_k, grown_k, strict=True)
                )
                self.values = mx.concatenate([old_v, grown_v], axis=2)
        self.offset += L
        parts = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        for buffer, part in zip(self.keys, parts, strict=True):
            buffer[..., prev : self.offset, :] = part
        self.values[..., prev : self.offset, :] = values
        return self.keys_and_values()

    def keys_and_values(self) -> tuple:
        n = self.offset
        if n == self.keys[0].shape[2]:
            return self.keys, self.values
        return tuple(k[..., :n, :] for k in self.keys), self.values[..., :n, :]

    def size(self) -> int:
        return self.offset

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(k.nbytes for k in self.keys) + self.values.nbytes


def adopt_cache(
    fresh: Any,
    keys: Any,
    values: mx.array | None,
    offset: int,
    quant: tuple[int, int] | None = None,
) -> Any:
    """A cache of `fresh`'s kind (an empty cache the model made: full precision or quantized)
    holding saved state (e.g. read from a session file): keys = c_kv, or (packed, scales,
    biases) when `quant` = (group size, bits); values = k_pe. Converted between full
    precision and quantized where the saved state and `fresh` differ."""
    if keys is None or not offset:
        return fresh
    if quant is not None:
        g, b = quant
        if isinstance(fresh, QuantizedKVCache) and (fresh.group_size, fresh.bits) == (g, b):
            fresh.keys, fresh.values, fresh.offset = tuple(keys), values, offset
            return fresh
        keys = mx.dequantize(*keys, group_size=g, bits=b)
    full = KVCache()
    full.keys, full.values, full.offset = keys, values, offset
    if isinstance(fresh, QuantizedKVCache):
        return full.to_quantized(fresh.group_size, fresh.bits)
    return full


def latent_bytes_per_token(
    rank: int,
    rope: int,
    dtype: mx.Dtype | int,
    kv_bits: int | None,
    group_size: int | None = None,
) -> int:
    """One layer's cache bytes per token: c_kv (quantized: packed + scales + biases) + k_pe
    (or one row of V4's compressed cache: rank = its non-RoPE channels). dtype: the compute
    dtype or its size in bytes."""
    size = dtype if isinstance(dtype, int) else dtype.size
    if kv_bits is None:
        return (rank + rope) * size
    g = group_size or latent_group_size(rank)
    return rank * kv_bits // 8 + 2 * (rank // g) * size + rope * size


class ModelCache(list):
    """The per-layer latent caches (quantized when kv_bits is set) and the MTP state.

    layer_cache: the per-layer cache type when it is not the plain latent (V3.2's adds the
    indexer's keys); such caches are not quantized."""

    def __init__(
        self,
        num_layers: int,
        num_mtp_layers: int = 0,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        layer_cache: Callable[[], KVCache] | None = None,
    ):
        if layer_cache is not None and kv_bits is not None:
            raise ArgumentValueError(
                f"kv_bits={kv_bits}: this model's cache (latent plus indexer keys) is not "
                "quantized yet: drop --kv-bits"
            )
        self.kv_bits = kv_bits
        self.kv_group_size = kv_group_size
        self.layer_cache = layer_cache
        super().__init__(self.new_layer_cache() for _ in range(num_layers))
        self.mtp: list = [self.new_layer_cache() for _ in range(num_mtp_layers)]
        self.mtp_hidden: mx.array | None = None  # [B, 1, D], pre-norm h at position mtp_hidden_pos
        self.mtp_hidden_pos: int = -1

    def new_layer_cache(self) -> KVCache | QuantizedKVCache:
        """An empty latent cache of this model's kind."""
        if self.layer_cache is not None:
            return self.layer_cache()
        if self.kv_bits is None:
            return KVCache()
        return QuantizedKVCache(group_size=self.kv_group_size, bits=self.kv_bits)

    @property
    def length(self) -> int:
        return min((c.offset for c in self), default=0)

    def reset_mtp(self) -> None:
        self.mtp = [self.new_layer_cache() for _ in self.mtp]
        self.mtp_hidden, self.mtp_hidden_pos = None, -1

    def trim_mtp(self, length: int) -> None:
        """Keep MTP entries for positions < length."""
        for c in self.mtp:
            if c.offset > length:
                c.trim(c.offset - length)
