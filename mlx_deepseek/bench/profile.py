"""Where a decode step's time goes: each part of the model timed on its own.

Every decoder layer's attention (with its cache at the given context) and MLP (dense or
MoE), and the final norm + LM head, are evaluated separately on a fixed hidden state, so
the parts add up to a little more than a whole step (one evaluation each instead of one
for the step). Both runtimes are DeepSeek models with the same module tree
(model.model.layers[i].self_attn / .mlp, model.model.norm, lm_head), so one routine
serves both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from .runtimes import Runtime, rewind


def _time(fn: Callable[[], mx.array]) -> float:
    t = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t


def decode_parts(rt: Runtime, cache: list[Any], context: int) -> dict[str, float]:
    """Seconds per decoded token by part: attention, dense_mlp, moe, head."""
    inner = rt.model.model
    D = rt.config["hidden_size"]
    x = mx.random.normal((1, 1, D), key=mx.random.key(3)).astype(inner.norm.weight.dtype)
    mx.eval(x)
    parts = {"attention": 0.0, "dense_mlp": 0.0, "moe": 0.0, "head": 0.0}
    for layer, c in zip(inner.layers, cache, strict=True):

        def attn(layer=layer, c=c) -> mx.array:
            rewind([c], context)
            return layer.self_attn(layer.input_layernorm(x), None, c)

        parts["attention"] += _time(attn)
        kind = "moe" if hasattr(layer.mlp, "switch_mlp") else "dense_mlp"
        parts[kind] += _time(lambda layer=layer: layer.mlp(layer.post_attention_layernorm(x)))
    parts["head"] = _time(lambda: rt.model.lm_head(inner.norm(x)))
    rewind(cache, context)
    return parts


def profile(
    runtimes: list[Runtime], caches: dict[str, list[Any]], context: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Median milliseconds per part for each runtime, interleaved like the timings."""
    for rt in runtimes:  # warm up
        decode_parts(rt.activate(), caches[rt.name], context)
    samples: dict[str, list[dict[str, float]]] = {rt.name: [] for rt in runtimes}
    for rep in range(repeats):
        for rt in runtimes if rep % 2 == 0 else runtimes[::-1]:
            samples[rt.name].append(decode_parts(rt.activate(), caches[rt.name], context))
    out = {}
    for name, runs in samples.items():
        out[name] = {k: 1e3 * statistics.median(r[k] for r in runs) for k in runs[0]}
    return out
