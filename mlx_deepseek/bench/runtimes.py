"""The two runtimes under test, driven the same way: load, fill a cache, prefill, decode.

Both follow mlx-lm's model protocol (`model(tokens, cache=cache) -> logits`), so one set of
helpers drives both. Long contexts are reached by filling each runtime's own cache with
random values of the right shape and dtype (mlx-lm's V2 cache holds per-head K/V, ours the
MLA latent): decode speed does not depend on the values, and a real 8k prefill on a CPU
would take many minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from mlx_deepseek import _blas

from . import v4

OURS = "mlx-deepseek"
MLX_LM = "mlx-lm"
CACHE_STEP = 256
BLAS_SETTLE_S = 0.3  # mlx-lm's KVCache grows in steps of 256 tokens


@dataclass
class Runtime:
    name: str
    model: nn.Module
    checkpoint: Path
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    blas_threads: int | None = None  # OpenBLAS threads this runtime runs with (None: as is)
    _layout: list[Any] | None = None

    def activate(self) -> Runtime:
        """Set the process-wide state this runtime runs with (OpenBLAS's thread count: ours
        splits work across CPU streams and wants one; mlx-lm gets OpenBLAS's default)."""
        if self.blas_threads is not None and self.blas_threads != _blas.threads():
            _blas.set_threads(self.blas_threads)
            # OpenBLAS's idle helper threads spin ~2^28 cycles before sleeping: let them stop
            # before timing a runtime that does not use them
            time.sleep(BLAS_SETTLE_S)
        return self

    def make_cache(self) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)


def load_ours(path: Path, dtype: mx.Dtype) -> Runtime:
    import json

    from mlx_deepseek.loading import load_model

    model = load_model(path, dtype=dtype, lazy=False)  # sets OpenBLAS's threads as it wants
    config = json.loads((Path(path) / "config.json").read_text())
    return Runtime(OURS, model, Path(path), config, blas_threads=_blas.threads())


def load_mlx_lm(path: Path, dtype: mx.Dtype) -> Runtime:
    """mlx-lm's own loader; floating parameters cast to `dtype` when the checkpoint's differ
    (mlx-lm computes in its scales' dtype), the router's correction bias kept as loaded."""
    from mlx_lm.utils import load_model

    model, config = load_model(Path(path), lazy=False)
    notes = []
    dtypes = {
        v.dtype
        for k, v in tree_flatten(model.parameters())
        if _is_float(v) and "e_score_correction_bias" not in k
    }
    if dtypes - {dtype}:

        def cast(name: str, v: mx.array) -> mx.array:
            keep = "e_score_correction_bias" in name or not _is_float(v)
            return v if keep else v.astype(dtype)

        model.update(tree_map_with_path(cast, model.parameters()))
        mx.eval(model.parameters())
        names = ", ".join(sorted(str(d).split(".")[-1] for d in dtypes - {dtype}))
        notes.append(f"parameters cast from {names} to {str(dtype).split('.')[-1]}")
    model.eval()
    return Runtime(MLX_LM, model, Path(path), config, notes, blas_threads=_blas.default_threads)


def _is_float(v: mx.array) -> bool:
    return mx.issubdtype(v.dtype, mx.floating)


# ---- caches ---------------------------------------------------------------------------------


def cache_layout(rt: Runtime) -> list[tuple[tuple[int, ...], tuple[int, ...], mx.Dtype]]:
    """Per layer: (keys shape, values shape, dtype) of ONE token, read after a real step."""
    if rt._layout is None:
        cache = rt.make_cache()
        mx.eval(rt.model(mx.array([[0]]), cache=cache))
        rt._layout = [
            ((*c.keys.shape[:2], 1, c.keys.shape[3]), (*c.values.shape[:2], 1, c.values.shape[3]),
             c.keys.dtype)
            for c in cache
        ]  # fmt: skip
    return rt._layout


def filled_cache(rt: Runtime, context: int, room: int, seed: int = 0) -> list[Any]:
    """A cache at offset `context` holding random values, with space for `room` more tokens
    (so timed decode steps never reallocate). A V4 cache: bench/v4.py's `fill`."""
    capacity = -(-(context + room) // CACHE_STEP) * CACHE_STEP
    key = mx.random.key(seed)
    if rt.config.get("model_type") == "deepseek_v4":
        if rt._layout is None:
            rt._layout = v4.buffer_widths(rt.model)
        return v4.fill(rt.model, rt._layout, context, room, key)
    cache = rt.make_cache()
    for c, (ks, vs, dtype) in zip(cache, cache_layout(rt), strict=True):
        k1, k2, key = mx.random.split(key, 3)
        c.keys = mx.random.normal((ks[0], ks[1], capacity, ks[3]), key=k1).astype(dtype)
        c.values = mx.random.normal((vs[0], vs[1], capacity, vs[3]), key=k2).astype(dtype)
        c.offset = context
        mx.eval(c.keys, c.values)
    return cache


def rewind(cache: list[Any], offset: int) -> None:
    if v4.is_v4_cache(cache):
        v4.rewind(cache, offset)
        return
    for c in cache:
        c.offset = offset


def cache_bytes_per_token(cache: list[Any]) -> float:
    """Bytes of the live cache (every layer's keys + values up to the offset) per token."""
    if v4.is_v4_cache(cache):
        return v4.cache_bytes_per_token(cache)
    total, tokens = 0, cache[0].offset
    for c in cache:
        for a in (c.keys, c.values):
            total += a[..., : c.offset, :].nbytes
    return total / max(tokens, 1)


def cache_read_bytes(rt: Runtime, cache: list[Any]) -> int:
    """Cache bytes one decode step reads: all of it for MLA (every position is attended),
    V4's window, top-k and indexer rows (bench/v4.py)."""
    if v4.is_v4_cache(cache):
        return v4.read_bytes(cache, rt.config.get("index_topk", 512))
    return int(cache_bytes_per_token(cache) * cache[0].offset)


def held_bytes(cache: list[Any]) -> int:
    """Bytes the cache's buffers hold (allocated, not only used)."""
    if v4.is_v4_cache(cache):
        return sum(a.nbytes for c in cache for a in c.state)
    return sum(c.keys.nbytes + c.values.nbytes for c in cache)


# ---- steps -----------------------------------------------------------------------------------


def decode_step(rt: Runtime, token: mx.array, cache: list[Any]) -> mx.array:
    """One greedy decode step, lazily: token [1, 1] -> next token [1, 1]."""
    logits = rt.model(token, cache=cache)
    return mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)


def prefill(rt: Runtime, tokens: mx.array) -> tuple[mx.array, list[Any]]:
    cache = rt.make_cache()
    logits = rt.model(tokens, cache=cache)
    mx.eval(logits)
    return logits, cache
