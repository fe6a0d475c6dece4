"""A prefix cache shared across requests: token sequences -> their per-layer latent caches.

When a request finishes, the cache of everything it holds (prompt + answer) is kept under its
token ids. A new request starts from the entry sharing the longest run of leading tokens with
its prompt, trimmed to that run, so a multi-turn conversation prefills only its new tokens
(and a shared system prompt is prefilled once). Entries are evicted least-recently-used
first when their bytes pass the limit.

Entries are shared without copying: a cache handed out holds its own array objects (slices
of the entry's), so its writes (`keys[...] = new`, a new array in MLX; a buffer still held by
the entry is never donated) leave the entry as it was. Caches of any kind the model makes
are kept as they are (a quantized latent cache stays quantized: its entries are smaller).
DeepSeek V4's caches are not kept (`viewable`): their windows and compressor state cannot be
cut back to an arbitrary prefix.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.cache import KVCache


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 [S]: what the caches hold
    caches: list[KVCache]  # one per layer, offset == len(tokens)
    mtp: list[KVCache] | None  # the MTP layers' caches (pairs for positions < their offset)
    nbytes: int


def cache_nbytes(caches: Sequence[Any]) -> int:
    """The bytes of the caches' buffers (a quantized one's packed values, scales and biases)."""
    return sum(c.nbytes for c in caches)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def viewable(cache: Any) -> bool:
    """Whether a layer's cache holds its positions as keys / values along one axis (what an
    entry's views slice): mlx-lm's caches and MLA's latent ones, not V4's."""
    return hasattr(cache, "keys") and hasattr(cache, "values")


def _view(caches: Sequence[KVCache], length: int) -> list[KVCache]:
    """New caches of the same kind holding the first `length` tokens: new array objects
    (slices) over the same buffers, so assigning into one never changes another's."""
    out = []
    for c in caches:
        k = copy.copy(c)  # the class and its settings (a quantized cache's bits, group size)
        k.keys = k.values = None
        k.offset = 0
        if length:
            k.keys = tree_map(lambda a: a[..., :length, :], c.keys)
            k.values = tree_map(lambda a: a[..., :length, :], c.values)
            k.offset = length
        out.append(k)
    return out


class PrefixCache:
    """LRU by bytes. `lookup` gives caches to continue from; `store` keeps a finished one."""

    def __init__(self, max_bytes: int, measure: Callable[..., int] | None = None):
        """measure(caches, mtp) -> the bytes an entry counts for (default: the buffers its
        arrays keep alive; a distributed engine counts what every rank agrees on)."""
        self.max_bytes = max(0, int(max_bytes))
        self.measure = measure or (lambda caches, mtp: cache_nbytes(caches) + cache_nbytes(mtp))
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.lookups = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, tokens: Sequence[int]
    ) -> tuple[int, list[KVCache] | None, list[KVCache] | None]:
        """(n, caches holding tokens[:n], MTP caches or None) for the longest reusable prefix,
        at most len(tokens) - 1 (the last prompt token is always run, to get its logits);
        (0, None, None) when nothing is shared."""
        want = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            self.lookups += 1
            best, best_key = 0, None
            for key, e in self._entries.items():
                n = _common_prefix(e.tokens, want)
                if n > best:
                    best, best_key = n, key
            best = min(best, len(want) - 1)
            if best <= 0 or best_key is None:
                return 0, None, None
            entry = self._entries[best_key]
            self._entries.move_to_end(best_key)
            self.hits += 1
            mtp = None
            if entry.mtp:
                mtp = _view(entry.mtp, min(entry.mtp[0].offset, best))
            return best, _view(entry.caches, best), mtp

    def store(
        self,
        tokens: Sequence[int],
        caches: Sequence[KVCache],
        mtp: Sequence[KVCache] | None = None,
    ) -> None:
        """Keep `caches` (holding exactly `tokens`, one per layer) and the MTP layers' caches;
        drop the entries it extends."""
        if self.max_bytes == 0 or not tokens or not all(map(viewable, caches)):
            return
        held = _view(caches, len(tokens))
        mtp_held = _view(mtp, min(mtp[0].offset, len(tokens))) if mtp else None
        arr = np.asarray(tokens, dtype=np.int64)
        # the buffers the slices keep alive, not only the tokens they show
        nbytes = self.measure(caches, mtp or [])
        if nbytes > self.max_bytes:
            return
        with self._lock:
            for key, e in list(self._entries.items()):
                if len(e.tokens) <= len(arr) and _common_prefix(e.tokens, arr) == len(e.tokens):
                    del self._entries[key]  # a prefix of the new entry: it adds nothing
                elif len(e.tokens) > len(arr) and _common_prefix(e.tokens, arr) == len(arr):
                    self._entries.move_to_end(key)  # the new one is a prefix of it: keep that
                    return
            self._entries[self._next] = _Entry(arr, held, mtp_held, nbytes)
            self._next += 1
            while self.nbytes > self.max_bytes and self._entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
