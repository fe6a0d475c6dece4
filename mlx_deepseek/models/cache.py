"""The model's cache: one latent KV cache per layer, plus the MTP module's own state.

`ModelCache` is a plain list of mlx-lm `KVCache`s (keys = c_kv [B, 1, S, kv_lora_rank],
values = roped k_pe [B, 1, S, qk_rope_head_dim]), so mlx-lm's generation, trimming and
prompt-cache files work on it unchanged. Speculative decoding with the MTP head keeps its
extra state on the same object: the MTP layers' latent caches and the main model's pre-norm
hidden state at the last cached position (MTP entry i pairs h_i with token i+1, so the
last position waits for the next token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from ..errors import DeepSeekError


def latent_cache() -> KVCache:
    """One layer's latent cache: mlx-lm's KVCache (same class name, so mlx-lm's prompt-cache
    files load it back), refusing mlx-lm's `kv_bits` conversion in one line."""
    cache = KVCache()
    cache.to_quantized = _refuse_kv_bits
    return cache


class ModelCache(list):
    def __init__(
        self,
        num_layers: int,
        num_mtp_layers: int = 0,
        layer_cache: Callable[[], KVCache] | None = None,
    ):
        # layer_cache: the per-layer cache type (V3.2's adds the indexer's keys to the latent)
        super().__init__((layer_cache or latent_cache)() for _ in range(num_layers))
        self.mtp: list[KVCache] = [KVCache() for _ in range(num_mtp_layers)]
        self.mtp_hidden: mx.array | None = None  # [B, 1, D], pre-norm h at position mtp_hidden_pos
        self.mtp_hidden_pos: int = -1

    @property
    def length(self) -> int:
        return min((c.offset for c in self), default=0)

    def reset_mtp(self) -> None:
        self.mtp = [KVCache() for _ in self.mtp]
        self.mtp_hidden, self.mtp_hidden_pos = None, -1

    def trim_mtp(self, length: int) -> None:
        """Keep MTP entries for positions < length."""
        for c in self.mtp:
            if c.offset > length:
                c.trim(c.offset - length)


KV_BITS_REFUSED = (
    "kv_bits: mlx-lm's quantized KV cache does not apply to MLA's latent cache (c_kv and "
    "k_pe, already ~9-71x smaller than an expanded K/V cache); drop kv_bits"
)


def _refuse_kv_bits(*args: Any, **kwargs: Any) -> None:
    raise DeepSeekError(KV_BITS_REFUSED)


def check_layer_cache(cache: Any) -> None:
    """Refuse, in one line, a layer cache the latent attention cannot read: mlx-lm's
    QuantizedKVCache (what its `kv_bits` option turns each KVCache into)."""
    if isinstance(cache, QuantizedKVCache):
        raise DeepSeekError(KV_BITS_REFUSED)
