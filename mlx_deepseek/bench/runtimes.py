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


def layer_parts(c: Any) -> list[Any]:
    """The KVCache-like objects of one layer's cache: mlx-lm's deepseek_v32 keeps a CacheList
    (latent cache, indexer cache); ours one cache (V3.2's with the indexer keys inside)."""
    return list(c.caches) if hasattr(c, "caches") else [c]


def part_arrays(part: Any) -> list[str]:
    """The per-position arrays a cache object holds ([B, H, S, D] each)."""
    return ["keys", "values"] + (["index_keys"] if hasattr(part, "index_keys") else [])


Layout = list[list[dict[str, tuple[tuple[int, ...], mx.Dtype]]]]


def cache_layout(rt: Runtime) -> Layout:
    """Per layer, per cache object: each array's shape for ONE token and its dtype, read
    after a real step."""
    if rt._layout is None:
        cache = rt.make_cache()
        mx.eval(rt.model(mx.array([[0]]), cache=cache))
        rt._layout = [
            [
                {
                    name: ((*a.shape[:2], 1, a.shape[3]), a.dtype)
                    for name in part_arrays(part)
                    if (a := getattr(part, name)) is not None
                }
                for part in layer_parts(c)
            ]
            for c in cache
        ]
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
    for c, layout in zip(cache, cache_layout(rt), strict=True):
        for part, arrays in zip(layer_parts(c), layout, strict=True):
            for name, (shape, dtype) in arrays.items():
                k, key = mx.random.split(key)
                a = mx.random.normal((shape[0], shape[1], capacity, shape[3]), key=k)
                setattr(part, name, a.astype(dtype))
                mx.eval(getattr(part, name))
            part.offset = context
    return cache


def rewind(cache: list[Any], offset: int) -> None:
    if v4.is_v4_cache(cache):
        v4.rewind(cache, offset)
        return
    for c in cache:
        for part in layer_parts(c):
            part.offset = offset


def cache_bytes_per_token(cache: list[Any]) -> float:
    """Bytes of the live cache (every layer's arrays up to the offset) per token."""
    if v4.is_v4_cache(cache):
        return v4.cache_bytes_per_token(cache)
    total, tokens = 0, layer_parts(cache[0])[0].offset
    for c in cache:
        for p in layer_parts(c):
            for n in part_arrays(p):
                a = getattr(p, n)
                if a is not None:
                    total += a[..., : p.offset, :].nbytes
    return total / max(tokens, 1)


def snapshot(cache: list[Any]) -> list[list[tuple[dict[str, Any], int]]]:
    return [
        [({n: getattr(p, n) for n in part_arrays(p)}, p.offset) for p in layer_parts(c)]
        for c in cache
    ]


def restore(cache: list[Any], saved: list[list[tuple[dict[str, Any], int]]]) -> None:
    for c, layer in zip(cache, saved, strict=True):
        for p, (arrays, offset) in zip(layer_parts(c), layer, strict=True):
            for n, a in arrays.items():
                setattr(p, n, a)
            p.offset = offset


def cache_read_bytes(rt: Runtime, cache: list[Any]) -> int:
    """Cache bytes one decode step reads: all of it for MLA (every position is attended),
    V4's window, top-k and indexer rows (bench/v4.py)."""
    if v4.is_v4_cache(cache):
        return v4.read_bytes(cache, rt.config.get("index_topk", 512))
    return int(cache_bytes_per_token(cache) * layer_parts(cache[0])[0].offset)


def held_bytes(cache: list[Any]) -> int:
    """Bytes the cache's buffers hold (allocated, not only used)."""
    if v4.is_v4_cache(cache):
        return sum(a.nbytes for c in cache for a in c.state)
    return sum(
        getattr(p, n).nbytes
        for c in cache
        for p in layer_parts(c)
        for n in part_arrays(p)
        if getattr(p, n) is not None
    )


# ---- steps -----------------------------------------------------------------------------------


def decode_step(rt: Runtime, token: mx.array, cache: list[Any]) -> mx.array:
    """One greedy decode step, lazily: token [1, 1] -> next token [1, 1]."""
    logits = rt.model(token, cache=cache)
    return mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)


def decode_tok_s(rt: Runtime, cache: list[Any], ctx: int, tokens: int) -> float:
    """Greedy decode tok/s over `tokens` steps (each evaluated) from `cache` rewound to ctx."""
    rewind(cache, ctx)
    tok = mx.array([[1]])
    t = time.perf_counter()
    for _ in range(tokens):
        tok = decode_step(rt, tok, cache)
        mx.eval(tok)
    return tokens / (time.perf_counter() - t)


def prefill(rt: Runtime, tokens: mx.array) -> tuple[mx.array, list[Any]]:
    cache = rt.make_cache()
    logits = rt.model(tokens, cache=cache)
    mx.eval(logits)
    return logits, cache
