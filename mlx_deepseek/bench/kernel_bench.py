"""`mlx-deepseek bench --kernels`: mlx-deepseek's decode with its Metal kernels on and off.

For each model (the synthetic shapes, or --model folders) and context: whole-model decode
tok/s, each layer's attention and MLP time per token, and the effective GB/s of the weights
each part reads per token, with the custom kernels on and off (MLX's own path), measured
back to back in the same process. Where MLX has no Metal back-end the kernels cannot run:
the result says so in one line and holds the reference path's numbers alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_deepseek import ops
from mlx_deepseek.kernels import runtime as kernels
from mlx_deepseek.ops import metal

from . import metrics
from .models import DEFAULT_CACHE, SHAPES, prepare
from .runtimes import (
    Runtime,
    cache_bytes_per_token,
    decode_step,
    filled_cache,
    load_ours,
    rewind,
)

SCHEMA_VERSION = 1
NO_METAL = "no Metal here: the kernels cannot run, measuring the reference path only"
MODES = ("off", "on")

Log = Callable[[str], None]


@dataclass
class KernelSettings:
    shapes: list[str] = field(default_factory=lambda: ["v2-lite", "v3"])
    models: list[Path] = field(default_factory=list)
    dtype: str | None = None  # None: mlx-deepseek's default for this device
    contexts: list[int] = field(default_factory=lambda: [128, 2048, 8192])
    decode_tokens: int = 16  # timed decode steps per repeat
    repeats: int = 5
    bits: int = 4
    group_size: int = 64
    cache_dir: Path = DEFAULT_CACHE


def layer_weight_bytes(model: nn.Module, top_k: int) -> list[dict[str, int]]:
    """Per decoder layer, the bytes of weights one decoded token reads: attention (with its
    input norm) and MLP (with its norm; routed experts: top_k of them)."""
    out = []
    for layer in model.layers:
        attn = _nbytes(layer.self_attn) + _nbytes(layer.input_layernorm)
        mlp = _nbytes(layer.post_attention_layernorm)
        for name, v in tree_flatten(layer.mlp.parameters()):
            mlp += v.nbytes * top_k // v.shape[0] if name.startswith("switch_mlp.") else v.nbytes
        out.append({"attention": attn, "mlp": mlp})
    return out


def _nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of fn() evaluated, after one warm-up call."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _layer_parts(rt: Runtime, cache: list[Any], ctx: int, repeats: int) -> list[dict]:
    """Seconds per token of each layer's attention and MLP, on a fixed hidden state."""
    inner = rt.model.model
    x = mx.random.normal((1, 1, rt.config["hidden_size"]), key=mx.random.key(3))
    x = x.astype(inner.norm.weight.dtype)
    parts = []
    for layer, c in zip(inner.layers, cache, strict=True):

        def attention(layer=layer, c=c) -> mx.array:
            rewind([c], ctx)
            return layer.self_attn(layer.input_layernorm(x), None, c)

        def mlp(layer=layer) -> mx.array:
            return layer.mlp(layer.post_attention_layernorm(x))

        parts.append({"attention": _seconds(attention, repeats), "mlp": _seconds(mlp, repeats)})
    rewind(cache, ctx)
    return parts


def measure(rt: Runtime, settings: KernelSettings, modes: tuple[str, ...], log: Log) -> dict:
    """Decode and per-layer timings of one model in each mode ("off", "on")."""
    top_k = rt.config.get("num_experts_per_tok") or 1
    per_layer_bytes = layer_weight_bytes(rt.model, top_k)
    weights = metrics.weight_bytes_per_token(rt.model, rt.config)["total"]
    res: dict[str, Any] = {
        m: {"decode_tok_s": {}, "weights_gbps": {}, "effective_gbps": {}, "layers": {}}
        for m in modes
    }
    for ctx in settings.contexts:
        log(f"  context {ctx}: filling the cache with random values")
        cache = filled_cache(rt, ctx, room=settings.decode_tokens + 1)
        cache_bytes = cache_bytes_per_token(cache) * ctx
        samples = _decode_samples(rt, cache, ctx, settings, modes, log)
        for mode in modes:
            summary = metrics.summary(samples[mode])
            res[mode]["decode_tok_s"][str(ctx)] = summary
            res[mode]["weights_gbps"][str(ctx)] = weights * summary["median"] / 1e9
            gbps = (weights + cache_bytes) * summary["median"] / 1e9
            res[mode]["effective_gbps"][str(ctx)] = gbps
            with _backend(mode):
                parts = _layer_parts(rt, cache, ctx, settings.repeats)
            res[mode]["layers"][str(ctx)] = [
                {
                    "kind": "moe" if hasattr(layer.mlp, "switch_mlp") else "dense",
                    **{f"{p}_ms": 1e3 * t for p, t in part.items()},
                    **{f"{p}_gbps": b[p] / t / 1e9 for p, t in part.items()},
                }
                for layer, part, b in zip(rt.model.layers, parts, per_layer_bytes, strict=True)
            ]
        del cache
        mx.clear_cache()
    return {
        "weight_bytes_per_token": weights,
        "layer_weight_bytes": per_layer_bytes,
        "modes": res,
        "kernels_off_after_self_check": metal.failed_families(),
    }


def _backend(mode: str):
    """The kernels on ("metal") or off (MLX's own ops on the same device)."""
    return ops.use("metal" if mode == "on" else "mlx")


def _decode_samples(
    rt: Runtime,
    cache: list[Any],
    ctx: int,
    settings: KernelSettings,
    modes: tuple[str, ...],
    log: Log,
) -> dict[str, list[float]]:
    """tok/s of N decode steps per repeat and mode, the modes interleaved."""
    N = settings.decode_tokens
    for mode in modes:  # warm up: compiles, and on a Mac the kernels' self-checks
        with _backend(mode):
            rewind(cache, ctx)
            mx.eval(decode_step(rt, mx.array([[1]]), cache))

    def steps(mode: str) -> float:
        rewind(cache, ctx)
        tok = mx.array([[1]])
        with _backend(mode):
            t = time.perf_counter()
            for _ in range(N):
                tok = decode_step(rt, tok, cache)
                mx.eval(tok)
            return N / (time.perf_counter() - t)

    samples: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(settings.repeats):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            samples[mode].append(steps(mode))
        done = ", ".join(f"kernels {m} {s[-1]:.3g} tok/s" for m, s in samples.items())
        log(f"  decode at {ctx} ({rep + 1}/{settings.repeats}): {done}")
    rewind(cache, ctx)
    return samples


def run(settings: KernelSettings, log: Log = print) -> dict[str, Any]:
    """Measure every model in `settings`; returns the JSON-ready result."""
    from .harness import compute_dtype, machine_info

    dtype = compute_dtype(settings)
    available = kernels.available()
    modes = MODES if available else ("off",)
    started = time.perf_counter()
    entries = []
    targets = [(n, None) for n in settings.shapes] + [(None, Path(p)) for p in settings.models]
    for shape_name, path in targets:
        if shape_name is not None:
            shape = SHAPES[shape_name]()
            path = prepare(
                shape, settings.cache_dir, bits=settings.bits, group_size=settings.group_size,
                log=log,
            ).ours  # fmt: skip
            name, title = shape.name, shape.title
        else:
            name, title = path.name, str(path)
        log(f"{name}: loading mlx-deepseek")
        rt = load_ours(path, dtype)
        entry = measure(rt, settings, modes, log)
        entry.update(name=name, title=title, checkpoint=str(path))
        entries.append(entry)
        del rt
        mx.clear_cache()
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "kernels",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.perf_counter() - started,
        "machine": machine_info(),
        "kernels_available": available,
        "note": None if available else NO_METAL,
        "settings": {
            "dtype": str(dtype).split(".")[-1],
            "contexts": settings.contexts,
            "decode_tokens_per_repeat": settings.decode_tokens,
            "repeats": settings.repeats,
            "quantization": {"bits": settings.bits, "group_size": settings.group_size},
            "modes": list(modes),
            "layer_timing": "each layer's attention (with its input norm) and MLP (with its "
            "norm) evaluated alone on a fixed hidden state, median of the repeats",
            "gbps": "bytes read per token / time per token: weights_gbps and the per-layer "
            "numbers count the weights (routed experts: top-k of them), effective_gbps the "
            "weights plus the KV cache up to the context",
        },
        "models": entries,
    }


def print_report(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    m, s = result["machine"], result["settings"]
    console.print(
        f"[bold]mlx-deepseek bench --kernels[/]  {m['platform']}, MLX {m['mlx']} ({m['device']}); "
        f"{s['dtype']}, {s['quantization']['bits']}-bit; {s['repeats']} repeats x "
        f"{s['decode_tokens_per_repeat']} decode tokens; medians"
    )
    if result["note"]:
        console.print(result["note"])
    modes = s["modes"]
    label = {"off": "kernels off (MLX)", "on": "kernels on"}
    for entry in result["models"]:
        res = entry["modes"]
        table = Table(title=f"{entry['title']} ({entry['name']})", title_justify="left")
        table.add_column("whole model")
        for mode in modes:
            table.add_column(label[mode], justify="right")
        if len(modes) == 2:
            table.add_column("on / off", justify="right")
        for ctx in res["off"]["decode_tok_s"]:
            tok = [res[mode]["decode_tok_s"][ctx]["median"] for mode in modes]
            ratio = [f"{tok[1] / tok[0]:.2f}x"] if len(modes) == 2 else []
            table.add_row(f"decode tok/s at {ctx}", *[f"{t:.3g}" for t in tok], *ratio)
            pad = [""] if len(modes) == 2 else []
            for key, what in (("weights_gbps", "weights"), ("effective_gbps", "weights + cache")):
                gbps = [f"{res[mode][key][ctx]:.2f}" for mode in modes]
                table.add_row(f"GB/s read ({what}) at {ctx}", *gbps, *pad)
        console.print(table)
        for ctx in res["off"]["layers"]:
            layers = Table(
                title=f"  layers at {ctx}: ms/token (GB/s)",
                title_justify="left",
            )
            layers.add_column("layer")
            for part in ("attention", "mlp"):
                for mode in modes:
                    layers.add_column(f"{part} {mode}", justify="right")
            rows = zip(*(res[mode]["layers"][ctx] for mode in modes), strict=True)
            for i, per_mode in enumerate(rows):
                cells = [
                    f"{pm[f'{part}_ms']:.2f} ({pm[f'{part}_gbps']:.1f})"
                    for part in ("attention", "mlp")
                    for pm in per_mode
                ]
                layers.add_row(f"{i} {per_mode[0]['kind']}", *cells)
            console.print(layers)
        if entry["kernels_off_after_self_check"]:
            console.print(
                "  kernels switched off by their self-check: "
                + ", ".join(entry["kernels_off_after_self_check"])
            )
    console.print(f"\ntotal {result['seconds']:.1f} s")
