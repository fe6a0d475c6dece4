"""The benchmark run: both runtimes, same models, same process, interleaved and repeated."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import metrics, modes, v4
from .counting import count_step
from .models import DEFAULT_CACHE, SHAPES, prepare
from .profile import profile
from .runtimes import (
    MLX_LM,
    OURS,
    Runtime,
    cache_bytes_per_token,
    cache_read_bytes,
    decode_step,
    decode_tok_s,
    filled_cache,
    held_bytes,
    load_mlx_lm,
    load_ours,
    prefill,
    rewind,
)

SCHEMA_VERSION = 1
COUNTING_RULE = (
    "nodes of one decode step's lazy graph (mx.export_to_dot), weights and cache as leaves; "
    "views and no-ops (Reshape, Transpose, Slice, Broadcast, Split, ...) excluded; an "
    "mx.compile fusion counts once; Metal-equivalent: mx.fast rms_norm/rope/SDPA calls that "
    "MLX's Metal back-end runs fused, and mx.dequantize, count as one node (the CPU expands "
    "them); mlx-deepseek's custom Metal kernels are on as on a Mac, each launch counted as one "
    "node ('metal_equivalent'), or off: MLX ops only ('metal_equivalent_reference')"
)
KERNEL_COUNTING = {
    True: "custom Metal kernels: this machine runs them; each launch counted as one node",
    False: "custom Metal kernels: a kernel call raises here (no Metal back-end), so each launch "
    "is counted as one node: a placeholder with the kernel's output shapes ('Fused<kernel>')",
}
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "first_k_dense_replace",
    "intermediate_size",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "moe_intermediate_size",
    "n_shared_experts",
    "num_experts_per_tok",
    "topk_method",
    "n_group",
    "topk_group",
)
V4_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "compress_ratios",
    "num_attention_heads",
    "head_dim",
    "qk_rope_head_dim",
    "q_lora_rank",
    "o_groups",
    "o_lora_rank",
    "n_routed_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "sliding_window",
    "hc_mult",
)
CACHE_FILL = (
    "random: each runtime's own KV cache filled with random values of its real shape and "
    "dtype up to the context (no prefill); decode speed does not depend on the values"
)


@dataclass
class Settings:
    shapes: list[str] = field(default_factory=lambda: ["v2-lite", "v3"])
    models: list[Path] = field(default_factory=list)  # user checkpoints, run as given
    dtype: str | None = None  # None: mlx-deepseek's default for this device
    # None: the device's default (DEFAULTS): a 2-core CPU cannot afford a GPU's sample sizes
    prompt_tokens: int | None = None
    contexts: list[int] = field(default_factory=lambda: [128, 2048, 8192])
    # prefill of prompt_tokens more tokens on a cache already holding this many (chunked
    # prefill of a long prompt: the cost of its chunk at that depth)
    prefill_contexts: list[int] = field(default_factory=list)
    decode_tokens: int | None = None  # timed decode steps per repeat
    repeats: int | None = None
    bits: int = 4
    group_size: int = 64
    cache_dir: Path = DEFAULT_CACHE
    bandwidth_gb: float = 2.0
    shape_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile: bool = False  # time each part of a decode step at the shortest/longest context
    # how each context is reached (modes.MODES); None: DEFAULT_MODES for the shape
    modes: list[str] | None = None
    mtp_draft_tokens: int = 1  # MTP rows, for a model with an MTP layer (0: none)


# the attention-heavy shape is cheap enough to prefill for real and to run twice
DEFAULT_MODES = {"attn": ["cache", "prefill", "mlx-first"]}


def shape_modes(settings: Settings, name: str) -> list[str]:
    return list(settings.modes or DEFAULT_MODES.get(name, ["cache"]))


Log = Callable[[str], None]

# (prompt tokens, decode tokens per repeat, repeats). MLX's CPU quantized matmul costs the
# same per row at any batch size, so a CPU's prefill tok/s barely depends on the prompt
# length; 8 tokens keep the default run near 10 minutes on 2 shared cores.
DEFAULTS = {"gpu": (512, 16, 5), "cpu": (8, 1, 4)}


def resolve_defaults(settings: Settings) -> Settings:
    """Fill the unset sample sizes with this device's defaults."""
    from dataclasses import replace

    gpu = mx.default_device() == mx.gpu
    prompt, tokens, repeats = DEFAULTS["gpu" if gpu else "cpu"]
    return replace(
        settings,
        prompt_tokens=prompt if settings.prompt_tokens is None else settings.prompt_tokens,
        decode_tokens=tokens if settings.decode_tokens is None else settings.decode_tokens,
        repeats=repeats if settings.repeats is None else settings.repeats,
    )


def compute_dtype(settings: Settings) -> mx.Dtype:
    from mlx_deepseek.loading import _parse_dtype

    return _parse_dtype(settings.dtype)


def run(settings: Settings, log: Log = print) -> dict[str, Any]:
    """Measure every model in `settings`; returns the JSON-ready result."""
    dtype = compute_dtype(settings)
    settings = resolve_defaults(settings)
    started = time.perf_counter()
    log("measuring the machine's read bandwidth")
    bandwidth = [metrics.read_bandwidth(settings.bandwidth_gb)]
    results = []
    for name in settings.shapes:
        shape = SHAPES[name](**settings.shape_overrides.get(name, {}))
        ckpts = prepare(
            shape, settings.cache_dir, bits=settings.bits, group_size=settings.group_size, log=log
        )
        log(f"{shape.name}: loading " + ("both runtimes" if ckpts.mlx_lm else OURS))
        runtimes = [load_ours(ckpts.ours, dtype)]
        if ckpts.mlx_lm:
            runtimes.append(load_mlx_lm(ckpts.mlx_lm, dtype))
        wanted = shape_modes(settings, name)
        entry = measure_model(settings, runtimes, log, wanted)
        if "mlx-first" in wanted and ckpts.mlx_lm:
            _measure_mlx_first(settings, entry, {OURS: str(ckpts.ours), MLX_LM: str(ckpts.mlx_lm)},
                               log)  # fmt: skip
        entry.update(
            name=shape.name,
            title=shape.title,
            synthetic=True,
            scaled=shape.scaled,
            checkpoints={
                "source_bf16": str(ckpts.source),
                OURS: str(ckpts.ours),
                MLX_LM: str(ckpts.mlx_lm) if ckpts.mlx_lm else None,
                "quantized_by": {OURS: ckpts.ours_quantized_by}
                | ({MLX_LM: "mlx-lm"} if ckpts.mlx_lm else {}),
            },
        )
        entry["notes"] = ckpts.notes + entry["notes"]
        results.append(entry)
        del runtimes
        mx.clear_cache()
    for path in settings.models:
        results.append(measure_user_model(settings, Path(path), dtype, log))
    log("measuring the machine's read bandwidth again")
    bandwidth.append(metrics.read_bandwidth(settings.bandwidth_gb))
    read_gbps = max(b["read_gbps"] for b in bandwidth)
    for entry in results:
        derive(entry, read_gbps, settings.prompt_tokens)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.perf_counter() - started,
        "machine": machine_info(),
        "settings": {
            "dtype": str(dtype).split(".")[-1],
            "prompt_tokens": settings.prompt_tokens,
            "contexts": settings.contexts,
            "prefill_contexts": settings.prefill_contexts,
            "decode_tokens_per_repeat": settings.decode_tokens,
            "repeats": settings.repeats,
            "quantization": {"bits": settings.bits, "group_size": settings.group_size},
            "cache_fill": CACHE_FILL,
            "primitive_counting": COUNTING_RULE,
            "kernel_counting": KERNEL_COUNTING[bool(mx.metal.is_available())],
            "interleaving": "each repeat runs both runtimes back to back, alternating which "
            "goes first",
            "modes": {
                "cache": CACHE_FILL,
                "prefill": "the context's tokens (random) really prefilled, in chunks of "
                f"{modes.PREFILL_CHUNK}, then decoding",
                "mlx-first": "as cache, in a child process that imported mlx.core before "
                "mlx_deepseek",
            },
        },
        "bandwidth": {"read_gbps": read_gbps, "measurements": bandwidth},
        "models": results,
    }


def measure_user_model(settings: Settings, path: Path, dtype: mx.Dtype, log: Log) -> dict:
    log(f"{path}: loading with mlx-deepseek")
    runtimes = [load_ours(path, dtype)]
    notes = []
    try:
        runtimes.append(load_mlx_lm(path, dtype))
    except Exception as e:  # mlx-lm cannot read every DeepSeek checkpoint (raw FP8, MTP...)
        notes.append(f"mlx-lm could not load it ({type(e).__name__}: {e}); measured alone")
    wanted = shape_modes(settings, "")
    entry = measure_model(settings, runtimes, log, wanted)
    if "mlx-first" in wanted:
        _measure_mlx_first(settings, entry, {rt.name: str(path) for rt in runtimes}, log)
    entry.update(
        name=path.name,
        title=str(path),
        synthetic=False,
        scaled=[],
        checkpoints={rt.name: str(path) for rt in runtimes},
    )
    entry["notes"] = notes + entry["notes"]
    return entry


def _peak(fn: Callable[[], Any], resident: int) -> tuple[Any, int]:
    """Run fn; return its result and `resident` + the extra memory MLX allocated at peak.
    (MLX's buffer cache is left alone: clearing it would make each timed step allocate.)"""
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    return out, resident + max(0, mx.get_peak_memory() - base)


def new_result(rt: Runtime) -> dict[str, Any]:
    """One runtime's result before measuring (also the mlx-first child's)."""
    return {
        "checkpoint": str(rt.checkpoint),
        "notes": rt.notes,
        "weights_bytes": metrics.parameter_bytes(rt.model),
        "weight_bytes_per_token": metrics.weight_bytes_per_token(rt.model, rt.config),
        "decode_tok_s": {},
        "peak_memory_bytes": {"decode": {}},
        "cache_bytes": {},
        "cache_read_bytes": {},  # what one decode step reads of it
    }


def measure_model(
    settings: Settings, runtimes: list[Runtime], log: Log, wanted: list[str] | None = None
) -> dict[str, Any]:
    """Every measurement of one model, for each runtime (keyed by runtime name); `wanted`:
    the modes measured in this process ("cache" always)."""
    res = {rt.name: new_result(rt) for rt in runtimes}
    agreement = None
    if settings.prompt_tokens > 0:
        agreement = _measure_prefill(settings, runtimes, res, log)
    for ctx in settings.prefill_contexts:
        _measure_prefill_at(settings, runtimes, res, ctx, log)
    for ctx in settings.contexts:
        _measure_decode(settings, runtimes, res, ctx, log)
    for rt in runtimes:
        res[rt.name]["decode_tok_s_by_mode"] = {"cache": res[rt.name]["decode_tok_s"]}
    if "prefill" in (wanted or ()):
        for ctx in settings.contexts:
            by = modes.decode_after_prefill(
                runtimes, ctx, settings.decode_tokens, settings.repeats, log
            )
            for name, summary in by.items():
                res[name]["decode_tok_s_by_mode"].setdefault("prefill", {})[str(ctx)] = summary
    ours = next((rt for rt in runtimes if rt.name == OURS), None)
    if ours is not None and settings.mtp_draft_tokens and getattr(ours.model, "mtp", None):
        res[OURS]["mtp"] = modes.measure_mtp(
            ours, settings.decode_tokens, settings.repeats, settings.mtp_draft_tokens, log
        )
    # last: counting patches mx.fast while it traces
    _count(runtimes, res, min(settings.contexts) if settings.contexts else 16)
    config = runtimes[0].config
    entry = {
        "model_type": config.get("model_type"),
        "config": {k: config.get(k) for k in CONFIG_FIELDS},
        "runtimes": res,
        "agreement": agreement,
        "notes": [],
    }
    if config.get("model_type") == "deepseek_v4":
        entry["config"] = {k: config.get(k) for k in V4_CONFIG_FIELDS}
        entry["kv_comparison"] = v4.kv_comparison(config)
    return entry


def _measure_mlx_first(
    settings: Settings, entry: dict[str, Any], checkpoints: dict[str, str], log: Log
) -> None:
    """The "mlx-first" mode: decode at each context in a child that imported mlx first."""
    child = modes.decode_in_mlx_first_process(
        checkpoints, settings.dtype, settings.contexts, settings.decode_tokens,
        settings.repeats, log,
    )  # fmt: skip
    for name, by_ctx in child["decode_tok_s"].items():
        entry["runtimes"][name]["decode_tok_s_by_mode"]["mlx-first"] = by_ctx
    entry["mlx_first_blas"] = child["blas"]


def _order(runtimes: list[Runtime], rep: int) -> Iterator[Runtime]:
    """The runtimes, reversed on odd repeats, each made active as it comes up."""
    for rt in runtimes if rep % 2 == 0 else runtimes[::-1]:
        yield rt.activate()


def _keep_max(table: dict[str, Any], key: str, value: int) -> None:
    table[key] = max(value, table.get(key, 0))


def _measure_prefill(
    settings: Settings, runtimes: list[Runtime], res: dict[str, Any], log: Log
) -> dict[str, float] | None:
    P, R = settings.prompt_tokens, settings.repeats
    vocab = min(rt.config["vocab_size"] for rt in runtimes)
    tokens = mx.random.randint(2, vocab, (1, P), key=mx.random.key(1))
    samples: dict[str, list[float]] = {rt.name: [] for rt in runtimes}
    last: dict[str, mx.array] = {}
    for rep in range(R):
        for rt in _order(runtimes, rep):
            log(f"  prefill {P} tokens: {rt.name} ({rep + 1}/{R})")
            t = time.perf_counter()
            (logits, _), extra = _peak(lambda rt=rt: prefill(rt, tokens), 0)
            samples[rt.name].append(P / (time.perf_counter() - t))
            last[rt.name] = logits[0, -1].astype(mx.float32)
            peaks = res[rt.name]["peak_memory_bytes"]
            _keep_max(peaks, "prefill", res[rt.name]["weights_bytes"] + extra)
            del logits
    for rt in runtimes:
        res[rt.name]["prefill_tok_s"] = metrics.summary(samples[rt.name])
    if len(runtimes) != 2:
        return None
    a, b = last[runtimes[0].name], last[runtimes[1].name]
    diff = (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30)).item()
    return {"last_logits_max_rel_diff": diff}


def _measure_prefill_at(
    settings: Settings, runtimes: list[Runtime], res: dict[str, Any], ctx: int, log: Log
) -> None:
    """prompt_tokens tokens prefilled onto a cache holding `ctx` random positions. A runtime
    that fails (e.g. out of memory) is recorded as such and the others go on."""
    P, R = settings.prompt_tokens, settings.repeats
    vocab = min(rt.config["vocab_size"] for rt in runtimes)
    tokens = mx.random.randint(2, vocab, (1, P), key=mx.random.key(2))
    samples: dict[str, list[float]] = {rt.name: [] for rt in runtimes}
    caches = {}
    for rt in runtimes:
        log(f"  prefill at context {ctx}: filling the {rt.name} cache with random values")
        caches[rt.name] = filled_cache(rt, ctx, room=P)
    failed: set[str] = set()
    for rep in range(R):
        for rt in _order(runtimes, rep):
            if rt.name in failed:
                continue
            cache = caches[rt.name]

            def chunk(rt=rt, cache=cache) -> float:
                rewind(cache, ctx)
                t = time.perf_counter()
                mx.eval(rt.model(tokens, cache=cache))
                return P / (time.perf_counter() - t)

            resident = res[rt.name]["weights_bytes"] + held_bytes(cache)
            try:
                tok_s, peak = _peak(chunk, resident)
            except (RuntimeError, MemoryError) as e:  # MLX's allocation failures
                failed.add(rt.name)
                res[rt.name]["notes"].append(f"prefill at {ctx} failed: {type(e).__name__}: {e}")
                continue
            samples[rt.name].append(tok_s)
            peaks = res[rt.name]["peak_memory_bytes"].setdefault("prefill_at", {})
            _keep_max(peaks, str(ctx), peak)
            log(f"  prefill {P} tokens at {ctx} ({rep + 1}/{R}): {rt.name} {tok_s:.2f} tok/s")
    for rt in runtimes:
        if samples[rt.name]:
            res[rt.name].setdefault("prefill_tok_s_at", {})[str(ctx)] = metrics.summary(
                samples[rt.name]
            )
    del caches
    mx.clear_cache()


def _measure_decode(
    settings: Settings, runtimes: list[Runtime], res: dict[str, Any], ctx: int, log: Log
) -> None:
    R, N = settings.repeats, settings.decode_tokens
    log(f"  decode at context {ctx}: filling both caches with random values")
    caches = {rt.name: filled_cache(rt, ctx, room=N + 1) for rt in runtimes}
    for rt in _order(runtimes, 0):
        c = caches[rt.name]
        res[rt.name]["kv_bytes_per_token"] = cache_bytes_per_token(c)
        res[rt.name]["cache_bytes"][str(ctx)] = int(cache_bytes_per_token(c) * ctx)
        res[rt.name]["cache_read_bytes"][str(ctx)] = cache_read_bytes(rt, c)
        mx.eval(decode_step(rt, mx.array([[1]]), c))  # warm up: compiles, first touch

    samples: dict[str, list[float]] = {rt.name: [] for rt in runtimes}
    for rep in range(R):
        for rt in _order(runtimes, rep):
            cache = caches[rt.name]
            resident = res[rt.name]["weights_bytes"]
            resident += held_bytes(cache)
            tok_s, peak = _peak(partial(decode_tok_s, rt, cache, ctx, N), resident)
            samples[rt.name].append(tok_s)
            _keep_max(res[rt.name]["peak_memory_bytes"]["decode"], str(ctx), peak)
        log(
            f"  decode at {ctx} ({rep + 1}/{R}): "
            + ", ".join(f"{n} {s[-1]:.2f} tok/s" for n, s in samples.items())
        )
    for rt in runtimes:
        res[rt.name]["decode_tok_s"][str(ctx)] = metrics.summary(samples[rt.name])
    if settings.profile and ctx in (min(settings.contexts), max(settings.contexts)):
        log(f"  profiling decode at {ctx}")
        for name, parts in profile(runtimes, caches, ctx, R).items():
            res[name].setdefault("profile_ms", {})[str(ctx)] = parts
    del caches
    mx.clear_cache()


def _count(runtimes: list[Runtime], res: dict[str, Any], ctx: int) -> None:
    """Primitives of one decode step, on throwaway caches (the traced step is never run)."""
    modes = [("metal_equivalent", True, "metal"), ("this_backend", False, "metal")]
    for rt in runtimes:
        counts = {}
        # ours also without its custom kernels: MLX ops only, fast ops fused as on Metal
        extra = [("metal_equivalent_reference", True, "mlx")] if rt.name == OURS else []
        for mode, metal, backend in modes + extra:
            cache = filled_cache(rt, ctx, room=2)
            counts[mode] = count_step(
                lambda rt=rt, cache=cache: [decode_step(rt, mx.array([[1]]), cache)],
                metal,
                backend,
            ).as_dict()
        res[rt.name]["primitives_per_token"] = counts


PREFILL_TARGET_TOKENS = 256  # the prefill targets hold for real prompts, not the CPU's 8 tokens


def derive(entry: dict[str, Any], read_gbps: float, prompt_tokens: int = 0) -> None:
    """Effective GB/s, fractions of bandwidth, ratios ours / mlx-lm, and the targets."""
    for r in entry["runtimes"].values():
        w = r["weight_bytes_per_token"]["total"]
        r["effective_gbps"], r["bandwidth_fraction"], r["bytes_read_per_token"] = {}, {}, {}
        for ctx, s in r["decode_tok_s"].items():
            cache = r.get("cache_read_bytes", r["cache_bytes"])[ctx]
            r["bytes_read_per_token"][ctx] = w + cache
            gbps = (w + cache) * s["median"] / 1e9
            r["effective_gbps"][ctx] = gbps
            r["bandwidth_fraction"][ctx] = gbps / read_gbps
    rts = entry["runtimes"]
    if entry.get("model_type") == "deepseek_v4" and OURS in rts:
        entry["ratios"], entry["targets"] = {}, []
        tok_s = rts[OURS]["decode_tok_s"]
        contexts = sorted(tok_s, key=int)
        if len(contexts) > 1:  # V4's decode reads the window and top-k rows: nearly flat
            lo, hi = contexts[0], contexts[-1]
            flat = tok_s[hi]["median"] / tok_s[lo]["median"]
            entry["ratios"]["decode_vs_shortest"] = {
                c: tok_s[c]["median"] / tok_s[lo]["median"] for c in contexts
            }
            entry["targets"] = [_target(f"decode at {hi} vs {lo}", flat, ">=", 0.8)]
        return
    if OURS not in rts or MLX_LM not in rts:
        entry["ratios"], entry["targets"] = {}, []
        return
    a, b = rts[OURS], rts[MLX_LM]
    ratios: dict[str, Any] = {
        "method": PAIRED,
        "decode": {
            c: paired(a["decode_tok_s"][c], b["decode_tok_s"][c]) for c in a["decode_tok_s"]
        },
        "kv_bytes_per_token": a["kv_bytes_per_token"] / b["kv_bytes_per_token"],
        # where decode is bandwidth-bound, the speed ratio tends to the inverse of this
        "bytes_read_per_token": {
            c: a["bytes_read_per_token"][c] / b["bytes_read_per_token"][c]
            for c in a["bytes_read_per_token"]
        },
        "primitives_per_token": a["primitives_per_token"]["metal_equivalent"]["total"]
        / b["primitives_per_token"]["metal_equivalent"]["total"],
        "weights_bytes": a["weights_bytes"] / b["weights_bytes"],
        "weight_bytes_per_token": a["weight_bytes_per_token"]["total"]
        / b["weight_bytes_per_token"]["total"],
    }
    by_mode_a, by_mode_b = a.get("decode_tok_s_by_mode", {}), b.get("decode_tok_s_by_mode", {})
    ratios["decode_by_mode"] = {
        mode: {c: paired(by_mode_a[mode][c], by_mode_b[mode][c]) for c in by_mode_a[mode]}
        for mode in by_mode_a
        if mode in by_mode_b
    }
    if "prefill_tok_s" in a:
        ratios["prefill"] = paired(a["prefill_tok_s"], b["prefill_tok_s"])
        ratios["prefill_peak_memory"] = (
            a["peak_memory_bytes"]["prefill"] / b["peak_memory_bytes"]["prefill"]
        )
    at_a, at_b = a.get("prefill_tok_s_at", {}), b.get("prefill_tok_s_at", {})
    both = [c for c in at_a if c in at_b]
    if both:
        ratios["prefill_at"] = {c: paired(at_a[c], at_b[c]) for c in both}
    entry["ratios"] = ratios
    targets = []
    contexts = sorted(ratios["decode"], key=int)
    v2 = entry.get("model_type") == "deepseek_v2"
    for c in contexts:  # at least as fast as mlx-lm at every context, in every mode
        targets.append(_target(f"decode at {c}", ratios["decode"][c], ">=", 1.0))
    for mode, by_ctx in ratios["decode_by_mode"].items():
        if mode != "cache":
            for c in sorted(by_ctx, key=int):
                targets.append(_target(f"decode at {c} ({mode})", by_ctx[c], ">=", 1.0))
    if contexts:
        hi = contexts[-1]
        if v2 and int(hi) >= 8192:
            targets.append(_target(f"decode at {hi}, latent cache", ratios["decode"][hi], ">=",
                                   2.0))  # fmt: skip
    if "prefill" in ratios and prompt_tokens >= PREFILL_TARGET_TOKENS:
        targets.append(_target("prefill speed", ratios["prefill"], ">=", 10.0))
        targets.append(_target("prefill peak memory", ratios["prefill_peak_memory"], "<=", 1.1))
    if v2:
        targets.append(_target("KV bytes per token", ratios["kv_bytes_per_token"], "<=", 1 / 8))
    targets.append(
        _target(
            "primitives per token (after the kernel issue)",
            ratios["primitives_per_token"],
            "<=",
            0.5,
        )
    )
    entry["targets"] = targets


def missed_targets(result: dict[str, Any]) -> list[str]:
    """Each missed target of a result as "model: target ratio (goal)" (`bench --check`); the
    primitive-count goal waits for the Metal kernels and is left out."""
    return [
        f"{e['name']}: {t['name']} {t['ratio']:.2f}x (goal {t['goal']})"
        for e in result["models"]
        for t in e.get("targets", [])
        if not t["met"] and "kernel issue" not in t["name"]
    ]


PAIRED = (
    "speed ratios are the median over repeats of ours / mlx-lm, each repeat timing both "
    "runtimes back to back (robust to the load drifting on a shared machine)"
)


def paired(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median of per-repeat ratios a/b (repeats are paired: run back to back)."""
    import statistics

    return statistics.median(x / y for x, y in zip(a["samples"], b["samples"], strict=True))


def _target(name: str, value: float, op: str, goal: float) -> dict[str, Any]:
    met = value >= goal if op == ">=" else value <= goal
    return {"name": name, "ratio": value, "goal": f"{op} {goal:g}", "met": met}


def machine_info() -> dict[str, Any]:
    import mlx_lm

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(mx.default_device()),
        "metal": bool(mx.metal.is_available()),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "load_average": list(load) if load else None,
    }
