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

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class ModelCache(list):
    def __init__(
        self, num_layers: int, num_mtp_layers: int = 0, layer_cache: Callable[[], KVCache] = KVCache
    ):
        # layer_cache: the per-layer cache type (V3.2's adds the indexer's keys to the latent)
        super().__init__(layer_cache() for _ in range(num_layers))
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
