"""Where the engine calls the model: a prompt chunk of one sequence, or one decode step of the
running batch.

A decode batch holds each row's cache of everything it has seen but its pending token (the
last sampled one, or the last prompt token); `forward` runs the pending tokens and returns
the next-token logits per row. Two kinds:

- `PaddedBatch`: ONE forward for all rows, over mlx-lm's `BatchKVCache` per layer (rows left-
  padded, per-row offsets, the mask built from the cache). Rows join (`add`, merged and
  right-aligned) and leave (`remove`, filtered) between steps.
- `SequentialBatch`: one forward per row over its own cache, for models that do not take
  batch caches (the result is the same; only slower).
`supports_batching(model)` tells which one a model can use, by checking that a padded
two-row forward equals the rows run alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache


def prefill_chunk(model: nn.Module, cache: list, tokens: Sequence[int], mtp: Any = None) -> None:
    """Run `tokens` of one sequence into its per-layer cache (no logits needed).

    mtp: an `MtpFeed` when the MTP head should see the prompt too (drafting later needs its
    cache to follow the main one)."""
    x = mx.array(list(tokens))[None]
    if mtp is None:
        model(x, cache=cache)
        mx.eval([c.state for c in cache])
    else:
        mtp.feed(model, cache, x)
    mx.clear_cache()


class MtpFeed:
    """Enters a prompt's (hidden state, next token) pairs into the MTP layer's cache as the
    prompt is prefilled chunk by chunk: pair i joins h_i with token i+1, so each chunk's last
    hidden state waits for the next chunk's first token (or the first decode step)."""

    def __init__(self) -> None:
        self.pending_h: mx.array | None = None  # [1, 1, D]

    def feed(self, model: nn.Module, cache: Any, x: mx.array) -> None:
        h = model.hidden(x, cache)  # [1, n, D]
        hs = h[:, :-1] if self.pending_h is None else mx.concatenate([self.pending_h, h[:, :-1]], 1)
        ts = x[:, 1:] if self.pending_h is None else x
        if hs.shape[1] > 0:
            model.mtp_hidden(hs, ts, 0, cache.mtp[0])
        self.pending_h = h[:, -1:]
        mx.eval(self.pending_h, [c.state for c in cache], cache.mtp[0].state)


class SequentialBatch:
    """Rows run one at a time, each over its own per-layer cache list."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows: list[list] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, caches: Sequence[list]) -> None:
        self.rows.extend(caches)

    def remove(self, keep: Sequence[int]) -> None:
        self.rows = [self.rows[i] for i in keep]

    def extract(self, i: int) -> list:
        return list(self.rows[i])

    def forward(self, tokens: Sequence[int]) -> mx.array:
        """Pending tokens [B] -> next-token logits [B, V]."""
        out = [
            self.model(mx.array([[t]]), cache=cache)[:, -1, :]
            for t, cache in zip(tokens, self.rows, strict=True)
        ]
        return mx.concatenate(out, axis=0)


class PaddedBatch:
    """Rows in one BatchKVCache per layer; one forward per step for all of them."""

    def __init__(self, model: nn.Module, num_layers: int):
        self.model = model
        self.num_layers = num_layers
        self.caches: list[BatchKVCache] | None = None
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, caches: Sequence[list]) -> None:
        if not caches:
            return
        merged = [
            BatchKVCache.merge([row[layer] for row in caches]) for layer in range(self.num_layers)
        ]
        if self.caches is None:
            self.caches = merged
        else:
            for mine, new in zip(self.caches, merged, strict=True):
                mine.extend(new)
        self.size += len(caches)

    def remove(self, keep: Sequence[int]) -> None:
        if not keep:
            self.caches, self.size = None, 0
            return
        if self.caches is not None and list(keep) != list(range(self.size)):
            idx = mx.array(list(keep))
            for c in self.caches:
                c.filter(idx)
        self.size = len(keep)

    def extract(self, i: int) -> list[KVCache]:
        return [_extract(c, i) for c in self.caches]

    def forward(self, tokens: Sequence[int]) -> mx.array:
        x = mx.array(list(tokens))[:, None]  # [B, 1]
        return self.model(x, cache=self.caches)[:, -1, :]


def _extract(cache: BatchKVCache, i: int) -> KVCache:
    out = KVCache()
    if cache.keys is None:
        return out
    pad = int(cache.left_padding[i].item())
    out.keys = mx.contiguous(cache.keys[i : i + 1, :, pad : cache._idx])
    out.values = mx.contiguous(cache.values[i : i + 1, :, pad : cache._idx])
    out.offset = out.keys.shape[2]
    return out


def supports_batching(model: nn.Module, make_cache: Callable[[], list]) -> bool:
    """Whether the model takes mlx-lm batch caches correctly: two prompts of different lengths
    run padded in one forward give the logits each gives alone."""
    prompts = [[1, 2, 3], [4]]
    try:
        alone, rows = [], []
        for p in prompts:
            a, b = make_cache(), make_cache()
            if len(p) > 1:
                model(mx.array([p[:-1]]), cache=a)
                model(mx.array([p[:-1]]), cache=b)
            alone.append(model(mx.array([p[-1:]]), cache=a)[0, -1])
            rows.append(b)
        batch = PaddedBatch(model, len(rows[0]))
        batch.add(rows)
        together = batch.forward([p[-1] for p in prompts])
        return all(
            mx.allclose(together[i], alone[i], atol=1e-3, rtol=1e-3).item()
            for i in range(len(prompts))
        )
    except Exception:  # a model that cannot take batch caches at all
        return False
