"""Bigger than memory: decode speed vs the routed experts' budget, with misses read from disk.

    python scripts/bench_memory.py [--experts 80] [--moe-layers 2] [--tokens 12]
        [--budgets 100 50 25 10] [--cache-dir DIR] [--json FILE]

1. Writes (once, cached) a V3-shaped 4-bit synthetic checkpoint: DeepSeek-V3's per-layer
   shapes (7168 hidden, 2048-wide experts, 8 of them per token, noaux_tc over 8 groups),
   fewer layers and experts (mlx_deepseek.bench.models.v3_shape), written directly in MLX's
   format (mlx_deepseek.bench.streaming). Random weights: the routing is near uniform, the
   worst case for a cache (trained routers repeat experts more).
2. Measures the disk: expert-sized reads at random offsets, page cache dropped.
3. For each budget: drops the page cache of the shards (posix_fadvise DONTNEED), loads with
   --expert-cache N%, the reader dropping what it reads from the page cache too (so every
   miss reaches the disk, as when the experts are many times the memory), prefills 16
   tokens and decodes 2 x --tokens greedily: a cold window then a warm one. Prints tok/s,
   hit rate, MB read and seconds stalled per token, and the I/O model's prediction:
   compute (the warm 100% window) + bytes read / measured bandwidth, no overlap.
4. Prefetching on vs off at the lowest budget but the minimum.
5. Replays the routing traces (this model's, and the bundled demo's trained router) under
   LRU, LFU and Belady's optimum: how much a better policy could gain over LRU.
6. The I/O model extrapolated to V3 / V4-Flash on 64 / 128 GB Macs (assumptions printed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.bench.models import DEFAULT_CACHE, v3_shape
from mlx_deepseek.bench.streaming import (
    REAL,
    drop_page_cache,
    extrapolate,
    read_bandwidth,
    replay,
    write_quantized_synthetic,
)
from mlx_deepseek.loading import load_model, weight_files
from mlx_deepseek.offload import expert_store

PREFILL = 16


def decode_window(model, cache, token: int, n: int) -> tuple[list[float], int]:
    """n greedy steps from `token`; per-step seconds and the last token."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        logits = model(mx.array([[token]]), cache=cache)
        token = int(mx.argmax(logits[0, -1]).item())
        times.append(time.perf_counter() - t0)
    return times, token


def run_budget(path: Path, budget: str, tokens: int, prefetch: bool = True) -> dict:
    files = weight_files(path)
    drop_page_cache(files)
    model = load_model(path, expert_cache=budget)
    store = expert_store(model)
    store.reader.page_cache = False
    store.set_prefetch(prefetch)
    trace: list = []
    for layer in store.layers:
        layer.trace = []
    cache = model.make_cache()
    prompt = np.random.default_rng(1).integers(2, model.args.vocab_size, PREFILL).tolist()
    logits = model(mx.array([prompt]), cache=cache)
    token = int(mx.argmax(logits[0, -1]).item())
    out = {"budget": budget, "slots": store.slots, "prefetch": prefetch, "windows": []}
    for window in ("cold", "warm"):
        before = store.snapshot()
        times, token = decode_window(model, cache, token, tokens)
        s = store.snapshot() - before
        out["windows"].append(
            {
                "window": window,
                "tok_s": len(times) / sum(times),
                "s_per_tok": sum(times) / len(times),
                "hit_rate": s.hit_rate,
                "mb_per_tok": s.bytes_per_token / 1e6,
                "stall_s_per_tok": s.stall_per_token,
                "reads_per_tok": s.reads / max(s.tokens, 1),
                "prefetched": s.prefetched,
                "prefetch_used": s.prefetch_used,
            }
        )
    for i, layer in enumerate(store.layers):
        trace += [(i, chosen) for chosen in layer.trace[-2 * tokens :]]  # the decode calls
    out["trace"] = trace
    out["read_bytes"] = store.plan.read_bytes
    store.close()
    return out


def demo_trace() -> list:
    """The bundled demo's routing (a trained router) over its arithmetic questions, decoding."""
    from mlx_deepseek import load, stream_generate

    model, tokenizer = load("demo", expert_cache="100%")
    store = expert_store(model)
    for layer in store.layers:
        layer.trace = []
    for a, b in [(23, 45), (71, 38), (12, 30), (66, 19), (50, 8), (93, 47)]:
        q = [{"role": "user", "content": f"What is {a} + {b}?"}]
        list(stream_generate(model, tokenizer, q, 24, mtp=False))
    calls = []
    for i, (prefix, layer) in enumerate(zip(store.plan.prefixes, store.layers, strict=True)):
        if not prefix.startswith("mtp."):  # decode calls of the main layers
            calls += [(i, c) for c in layer.trace if c.size <= model.args.num_experts_per_tok]
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=80, help="routed experts per layer")
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=12, help="decode tokens per window")
    p.add_argument("--budgets", type=int, nargs="+", default=[100, 50, 25, 10])
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    shape = v3_shape(moe_layers=a.moe_layers, experts=a.experts)
    path = write_quantized_synthetic(a.cache_dir / f"{shape.key}-direct-q4", shape.config)
    print(f"model: {shape.title}, {path}")
    for line in shape.scaled:
        print(f"  {line}")
    files = weight_files(path)
    results: dict = {"model": shape.title, "scaled": shape.scaled}

    first = run_budget(path, f"{a.budgets[0]}%", a.tokens)
    piece = first["read_bytes"]
    bw = read_bandwidth(files, piece)
    results["bandwidth_gb_s"] = bw
    print(
        f"disk: {bw['threads']:.3f} GB/s with the reader's threads, {bw['one_thread']:.3f} GB/s "
        f"one thread ({piece / 1e6:.1f} MB reads at random offsets, page cache dropped)"
    )
    runs = [first] + [run_budget(path, f"{b}%", a.tokens) for b in a.budgets[1:]]
    warm = first["windows"][-1]  # the largest budget, warm: what decoding costs without reads
    compute = warm["s_per_tok"] - warm["stall_s_per_tok"]
    results["compute_s_per_tok"] = compute
    print(
        f"compute per token: {compute:.2f} s ({first['budget']} warm, hit {warm['hit_rate']:.0%},"
        " its stall taken out)"
    )
    print(
        "\nper token: the I/O model's read time (MB / disk GB/s) next to the measured stall, and"
        "\ncompute + read time next to the measured time"
    )
    print(
        f"{'budget':>7} {'slots':>5} {'window':>6} {'tok/s':>7} {'hit':>5} {'MB/tok':>8} "
        f"{'read s':>7} {'stall s':>8} {'model s':>8} {'measured s':>10}"
    )
    for run in runs:
        for w in run["windows"]:
            read = w["mb_per_tok"] / 1e3 / bw["threads"]
            w["predicted_read_s_per_tok"] = read
            w["predicted_s_per_tok"] = compute + read
            print(
                f"{run['budget']:>7} {run['slots']:>5} {w['window']:>6} {w['tok_s']:>7.3f} "
                f"{w['hit_rate']:>5.0%} {w['mb_per_tok']:>8.1f} {read:>7.2f} "
                f"{w['stall_s_per_tok']:>8.2f} {compute + read:>8.2f} {w['s_per_tok']:>10.2f}"
            )
    low = [b for b in a.budgets if b * a.experts / 100 > 8] or a.budgets
    off = run_budget(path, f"{min(low)}%", a.tokens, prefetch=False)
    on = next(r for r in runs if r["budget"] == f"{min(low)}%")
    for label, run in (("on", on), ("off", off)):
        w = run["windows"][-1]
        print(
            f"prefetch {label:>3} at {run['budget']}: {w['tok_s']:.3f} tok/s, "
            f"hit {w['hit_rate']:.0%}, stall {w['stall_s_per_tok']:.2f} s/tok, "
            f"prefetched {w['prefetched']} (used {w['prefetch_used']})"
        )
    results["runs"] = [{k: v for k, v in r.items() if k != "trace"} for r in runs]
    results["prefetch_off"] = {k: v for k, v in off.items() if k != "trace"}

    print("\npolicies replayed on routing traces (hit rate):")
    traces = {"synthetic (random router)": first["trace"], "demo (trained router)": demo_trace()}
    results["policies"] = {}
    for name, trace in traces.items():
        E = a.experts if name.startswith("synthetic") else 8
        k = 8 if name.startswith("synthetic") else 2
        for pct in (25, 50, 75):
            slots = max(k, E * pct // 100)
            rates = {pol: replay(trace, slots, pol) for pol in ("lru", "lfu", "belady")}
            results["policies"][f"{name} {pct}%"] = rates
            print(
                f"  {name}, {slots}/{E} slots: "
                + ", ".join(f"{pol} {r:.0%}" for pol, r in rates.items())
            )

    print("\nextrapolation (see README for the assumptions):")
    results["extrapolation"] = []
    for model in REAL:
        for mac in (64, 128):
            for ssd in (4.7, 17.5):
                for locality in (False, True):
                    r = extrapolate(model, mac, ssd, locality)
                    r.update(model=model.name, mac_gb=mac, ssd_gb_s=ssd)
                    results["extrapolation"].append(r)
                    print(
                        f"  {model.name}, {mac} GB Mac, {ssd} GB/s: budget "
                        f"{r['budget_gb']:.0f} GB ({r['share']:.0%} of experts), hit "
                        f"{r['hit_rate']:.0%}, {r['read_gb_per_token']:.2f} GB/tok -> "
                        f"{r['tok_s']:.2f} tok/s"
                    )
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
