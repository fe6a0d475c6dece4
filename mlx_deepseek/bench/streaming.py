"""What the expert-streaming benchmark (scripts/bench_memory.py) needs.

- `write_quantized_synthetic`: a 4-bit MLX checkpoint of any config written directly
  (random packed weights and scales, one layer per shard), for shapes whose bf16 source
  would not fit the disk or the memory (a V3-shaped model with 80 experts per layer);
- `drop_page_cache` / `read_bandwidth`: the OS's cached pages of files dropped
  (posix_fadvise DONTNEED), and the disk's bandwidth for expert-sized positioned reads;
- `replay`: cache policies (LRU, LFU, Belady's optimum) replayed on a routing trace;
- `extrapolate`: the I/O model applied to real models on Macs.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..models import build_model, model_args
from ..offload.reader import ExpertReader, Piece

# ---- a 4-bit checkpoint, written directly ------------------------------------------------


def _quantizable(path: str, module: nn.Module, group_size: int) -> bool:
    # W_uk stays float (as the converter keeps it: it is used transposed); the router is no Linear
    if path.endswith("embed_q") or not hasattr(module, "to_quantized"):
        return False
    return module.weight.shape[-1] % group_size == 0


def write_quantized_synthetic(
    folder: Path,
    config: dict[str, Any],
    bits: int = 4,
    group_size: int = 64,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Write (once: `.complete` marks it) an MLX checkpoint of `config` quantized to `bits`
    with random weights scaled like a trained model's (std ~ 1/sqrt(in)); returns folder."""
    folder = Path(folder)
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    args = model_args(config)
    model = build_model(args)  # lazy: its random init is never evaluated
    skip = {p: False for p, m in model.named_modules() if p.endswith("embed_q")}
    nn.quantize(
        model, group_size, bits, class_predicate=lambda p, m: _quantizable(p, m, group_size)
    )
    rng = np.random.default_rng(seed)
    params = dict(tree_flatten(model.parameters()))
    shards: dict[str, list[str]] = {}
    for name in params:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append(name)
    weight_map = {}
    for i, (key, names) in enumerate(shards.items()):
        file = f"model-{i:05d}.safetensors"
        tensors = {n: _random(n, params, rng, group_size, bits) for n in names}
        mx.save_safetensors(str(folder / file), tensors, metadata={"format": "mlx"})
        weight_map.update({n: file for n in names})
        log(f"  wrote {file} ({key}, {sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB)")
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine", **skip}
    (folder / "config.json").write_text(json.dumps({**config, "quantization": quantization}))
    (folder / ".complete").write_text("")
    return folder


def _random(name: str, params: dict, rng: np.random.Generator, gs: int, bits: int) -> mx.array:
    shape, dtype = params[name].shape, params[name].dtype
    if dtype == mx.uint32:  # packed values: uniform over 0 .. 2^bits - 1
        return mx.array(rng.integers(0, 2**32, size=shape, dtype=np.uint32))
    base = name.rsplit(".", 1)[0]
    if name.endswith(("scales", "biases")):
        fan_in = params[f"{base}.scales"].shape[-1] * gs
        levels = 2**bits - 1  # uniform values of std 1/sqrt(fan_in)
        scale = math.sqrt(12) / (levels * math.sqrt(fan_in))
        value = scale if name.endswith("scales") else -scale * levels / 2
        return mx.full(shape, value, dtype=mx.bfloat16)
    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=mx.bfloat16)
    if name.endswith("e_score_correction_bias"):
        return mx.zeros(shape, dtype=mx.float32)
    w = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[-1]))
    router = name.endswith("mlp.gate.weight")
    return mx.array(w).astype(mx.float32 if router else mx.bfloat16)


# ---- the disk ------------------------------------------------------------------------------


def drop_page_cache(files: Sequence[Path]) -> None:
    """Ask the OS to drop its cached pages of `files` (Linux; a no-op elsewhere)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(files: Sequence[Path], piece_bytes: int, count: int = 24, seed: int = 0) -> dict:
    """GB/s of `count` reads of `piece_bytes` at random offsets of `files` (page cache dropped
    first), through the expert reader (its threads, its chunking) and through one thread."""
    rng = random.Random(seed)
    sizes = [os.path.getsize(f) for f in files]
    pieces = []
    for _ in range(count):
        i = rng.choice([j for j, s in enumerate(sizes) if s > piece_bytes])
        pieces.append(Piece(i, rng.randrange(0, sizes[i] - piece_bytes), piece_bytes, "U32"))
    buffer = bytearray(piece_bytes * count)
    view = memoryview(buffer)
    out = {}
    for label, threads in (("threads", None), ("one_thread", 1)):
        drop_page_cache(files)
        reader = ExpertReader(files, **({} if threads is None else {"threads": threads}))
        t0 = time.perf_counter()
        futures = []
        for k, p in enumerate(pieces):
            futures += reader.read(p, view[k * piece_bytes : (k + 1) * piece_bytes], "U32")
        for f in futures:
            f.result()
        out[label] = piece_bytes * count / (time.perf_counter() - t0) / 1e9
        reader.close()
    drop_page_cache(files)
    return out


# ---- cache policies on a routing trace -----------------------------------------------------


def replay(trace: Sequence[tuple[int, np.ndarray]], slots: int, policy: str) -> float:
    """Hit rate of per-layer banks of `slots` under `policy` ("lru", "lfu", "belady") for a
    trace of (layer, distinct experts of one call)."""
    future: dict[int, dict[int, list[int]]] = {}
    if policy == "belady":
        for t, (layer, chosen) in enumerate(trace):
            for e in chosen.tolist():
                future.setdefault(layer, {}).setdefault(e, []).append(t)
    banks: dict[int, dict[int, float]] = {}  # layer -> expert -> priority (evict lowest)
    counts: dict[tuple[int, int], int] = {}
    hits = total = 0
    for t, (layer, chosen) in enumerate(trace):
        bank = banks.setdefault(layer, {})
        now = chosen.tolist()
        for e in now:
            counts[(layer, e)] = counts.get((layer, e), 0) + 1
            if policy == "belady":
                uses = future[layer][e]
                while uses and uses[0] <= t:
                    uses.pop(0)
        for e in now:
            total += 1
            if e in bank:
                hits += 1
                continue
            if len(bank) >= slots:
                victims = [v for v in bank if v not in now]
                del bank[min(victims, key=bank.__getitem__)]
            bank[e] = t
        for e in now:
            if policy == "lru":
                bank[e] = t
            elif policy == "lfu":
                bank[e] = counts[(layer, e)] + t / (len(trace) + 1)  # ties: least recent
            else:  # belady: evict the expert needed farthest in the future
                uses = future[layer][e]
                bank[e] = -(uses[0] if uses else math.inf)
        if policy == "belady":
            for e in bank:
                uses = future[layer].get(e, [])
                bank[e] = -(uses[0] if uses else math.inf)
    return hits / total if total else 0.0


# ---- the I/O model on real models --------------------------------------------------------


@dataclass(frozen=True)
class RealModel:
    name: str
    moe_layers: int
    experts: int
    top_k: int
    expert_mb: float  # one expert at 4 bits, as read
    resident_gb: float  # everything but the routed experts, at 4 bits


# V3: 58 MoE layers x 256 experts of 3 x 2048 x 7168 (affine 4-bit, bf16 scales and biases
# per 64: 4.5 bits) = 24.8 MB; the rest ~17.1B parameters. V4-Flash: 43 layers x 256 experts
# of 3 x 2048 x 4096 in MXFP4 as released (4.25 bits) = 13.4 MB; the rest ~7B parameters.
REAL = [
    RealModel("DeepSeek-V3 / R1 (4-bit)", 58, 256, 8, 24.8, 9.6),
    RealModel("DeepSeek-V4-Flash (MXFP4 experts)", 43, 256, 6, 13.4, 4.0),
]


# anemll-flash-llama.cpp's measured hit rates for Kimi K2.5 (V3's architecture, 256 experts
# per layer) on an M5 Max, LRU slot banks of 16 / 32 / 64 / 128 experts per layer, top-k cut
# to 4 (README, "Benchmarks — Kimi-K2.5"): trained routers repeat experts. At bank 64 its
# native top-k 8 hit 67.2% instead of 73.7%: that ratio scales the curve for 6-8 experts.
LOCALITY = [(0.0, 0.0), (16 / 256, 0.556), (32 / 256, 0.641), (64 / 256, 0.737), (0.5, 0.764)]
LOCALITY_TOP_K8 = 0.672 / 0.737


def locality_hit_rate(share: float) -> float:
    """The hit rate a trained router's locality gives a bank holding `share` of each layer's
    experts at top-k 6-8: anemll's Kimi K2.5 curve, interpolated (to 100% at share 1)."""
    xs, ys = zip(*LOCALITY, (1.0, 1.0 / LOCALITY_TOP_K8), strict=True)
    return min(1.0, float(np.interp(share, xs, ys)) * LOCALITY_TOP_K8)


def extrapolate(
    model: RealModel,
    mac_gb: int,
    ssd_gb_s: float,
    locality: bool = False,
    usable: float = 0.75,
    other_gb: float = 4.0,
    compute_s: float = 0.1,
) -> dict[str, float]:
    """Decode tok/s of `model` streaming its experts on a Mac of `mac_gb` GB. Assumptions:
    MLX may use `usable` of the memory; `other_gb` goes to the cache, activations and the OS's
    share; the budget is the rest after the resident weights; hit rate = the budget's share of
    the experts (uniform routing, LRU), or with `locality` what a trained router's repeats
    give (locality_hit_rate); misses are read at `ssd_gb_s` and not overlapped with compute
    (`compute_s` per token: the resident part's share)."""
    budget_gb = mac_gb * usable - model.resident_gb - other_gb
    total_gb = model.moe_layers * model.experts * model.expert_mb / 1e3
    share = max(0.0, min(1.0, budget_gb / total_gb))
    hit = max(share, locality_hit_rate(share)) if locality else share
    misses = model.moe_layers * model.top_k * (1 - hit)
    read_gb = misses * model.expert_mb / 1e3
    seconds = compute_s + read_gb / ssd_gb_s
    return {
        "budget_gb": budget_gb,
        "share": share,
        "hit_rate": hit,
        "read_gb_per_token": read_gb,
        "tok_s": 1 / seconds,
    }
