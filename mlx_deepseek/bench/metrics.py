"""What the benchmark derives from a model and its timings: bytes read per token, the
machine's read bandwidth, summary statistics."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def summary(samples: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    med = statistics.median(samples)
    return {
        "median": med,
        "min": min(samples),
        "max": max(samples),
        "spread_pct": 100.0 * (max(samples) - min(samples)) / med if med else 0.0,
        "samples": samples,
    }


def weight_bytes_per_token(model: nn.Module, config: dict[str, Any]) -> dict[str, int]:
    """Bytes of weights one decoded token reads, by part, from the model's actual arrays.

    Routed experts (`switch_mlp`, stacked [E, ...]): top-k of E experts' bytes per layer;
    the embedding and V4's hash table (`tid2eid`): one row; everything else (attention,
    dense MLPs, shared experts, router, norms, the LM head): all of it. MTP modules are not
    read when decoding.
    """
    top_k = config.get("num_experts_per_tok") or 1
    parts = {"attention": 0, "dense_mlp": 0, "shared_experts": 0, "routed_experts": 0}
    parts |= {"router": 0, "embedding": 0, "lm_head": 0, "other": 0}
    for name, v in tree_flatten(model.parameters()):
        if name.startswith("mtp.") or not isinstance(v, mx.array):
            continue
        n = v.nbytes
        if ".switch_mlp." in name:
            parts["routed_experts"] += n * top_k // v.shape[0]
        elif "embed_tokens" in name or name.endswith(".tid2eid"):  # one row per token
            parts["embedding" if "embed_tokens" in name else "router"] += n // v.shape[0]
        elif ".self_attn." in name or ".attn." in name:  # V4: attn
            parts["attention"] += n
        elif ".shared_experts." in name:
            parts["shared_experts"] += n
        elif ".mlp.gate." in name or ".ffn.gate." in name:
            parts["router"] += n
        elif ".mlp." in name:
            parts["dense_mlp"] += n
        elif name.startswith("lm_head"):
            parts["lm_head"] += n
        else:
            parts["other"] += n  # norms
    parts["total"] = sum(parts.values())
    return parts


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array))


def _timed(fn: Callable[[], None], repeats: int) -> list[float]:
    fn()  # warm up (first-touch page faults, allocation)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _mlx_sum_seconds(n: int, repeats: int) -> list[float]:
    a = mx.random.uniform(shape=(n,))
    mx.eval(a)
    return _timed(lambda: mx.eval(a.sum()), repeats)


def _numpy_sum_seconds(n: int, repeats: int) -> list[float]:
    import numpy as np

    b = np.ones(n, dtype=np.float32)
    return _timed(lambda: b.sum(), repeats)


def read_bandwidth(gigabytes: float = 2.0, repeats: int = 3) -> dict[str, Any]:
    """The machine's read bandwidth (GB/s): sum a `gigabytes` float32 array with MLX and with
    NumPy; the faster is the reference a decode's effective GB/s is compared with."""
    n = int(gigabytes * 1e9) // 4
    nbytes = 4 * n
    t_mx = _mlx_sum_seconds(n, repeats)
    mx.clear_cache()
    t_np = _numpy_sum_seconds(n, repeats)
    mlx_gbps = nbytes / statistics.median(t_mx) / 1e9
    numpy_gbps = nbytes / statistics.median(t_np) / 1e9
    return {
        "bytes": nbytes,
        "mlx_gbps": mlx_gbps,
        "numpy_gbps": numpy_gbps,
        "read_gbps": max(mlx_gbps, numpy_gbps),
        "method": f"sum of a {nbytes / 1e9:.1f} GB float32 array, median of {repeats}",
    }
