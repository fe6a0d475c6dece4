"""The quantized latent KV cache's quality and size: KL to the full-precision cache, the
demo's arithmetic accuracy, and bytes per token.

    python scripts/kv_quality.py [--limit 400] [--json FILE]

1. The bundled demo (a trained 1.2M-parameter V3-architecture model): its greedy answers to
   held-out questions are teacher-forced token by token through a float cache and through
   c_kv at 8 and 4 bits; KL(float || quantized) per decoded token, and the share of tokens
   whose argmax changes. Then the held-out 2-digit arithmetic exact-match accuracy
   (mlx_deepseek.demo_train.evaluate) with each cache.
2. Whether k_pe (the RoPE part) could be quantized too: a random model with DeepSeek's
   latent widths (rank 512, rope 64; the demo's rope of 16 is under MLX's smallest group),
   c_kv only vs c_kv and k_pe (mlx-lm's own QuantizedKVCache quantizes both).
3. Bytes per token per layer and for the whole model (V2-Lite, V3) in bfloat16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_lm_cache

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek import load
from mlx_deepseek.demo_train import metrics
from mlx_deepseek.loading import set_kv_bits
from mlx_deepseek.models.cache import KVCache, QuantizedKVCache, latent_bytes_per_token


def teacher_forced(model, seqs: list[list[int]], starts: list[int], make) -> mx.array:
    """Logits of each decoded step ([steps, vocab]), every layer's cache made by `make()`
    (metrics.teacher_forced with one cache class for all layers)."""

    def caches():
        cache = model.make_cache()
        cache[:] = [make() for _ in cache]
        return cache

    return mx.concatenate(metrics.teacher_forced(model, seqs, starts, caches))


def demo_quality(limit: int) -> dict:
    """The demo's greedy answers to 48 held-out questions teacher-forced through each cache
    (metrics.kv_cache_error), then its held-out arithmetic with each cache."""
    model, tokenizer = load("demo")
    ev = metrics.Evaluator(model, tokenizer)
    metrics.arithmetic(ev, 48, 1)
    result = {f"kv{bits}": metrics.kv_cache_error(ev, bits) for bits in (8, 4)}
    accuracy = {}
    for bits in (None, 8, 4):
        set_kv_bits(model, bits)
        accuracy[str(bits or "float")] = metrics.arithmetic(ev, limit)["accuracy"]
    set_kv_bits(model, None)
    result["arithmetic_accuracy"] = accuracy
    return result


def rope_quality(tmp: Path) -> dict:
    """c_kv only vs c_kv and k_pe quantized, on a random model with DeepSeek's latent widths."""
    from mlx_deepseek.convert.synthetic import random_tensor, write_checkpoint

    from mlx_deepseek.loading import load_model
    from mlx_deepseek.models.tiny import tiny_config

    config = tiny_config(
        "v3_noaux", kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
        hidden_size=256, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4,
        vocab_size=512, max_position_embeddings=4096,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    write_checkpoint(tmp, config, lambda n, s: random_tensor(n, s, rng), tokenizer=False)
    model = load_model(tmp)
    seqs = [np.random.default_rng(i).integers(2, 512, 160).tolist() for i in range(4)]
    starts = [32] * len(seqs)
    full = teacher_forced(model, seqs, starts, KVCache)
    out = {}
    for bits in (8, 4):
        for label, make in (
            ("c_kv", lambda b=bits: QuantizedKVCache(64, b)),
            ("c_kv+k_pe", lambda b=bits: mlx_lm_cache.QuantizedKVCache(64, b)),
        ):
            d = np.array(metrics.kl_per_step(full, teacher_forced(model, seqs, starts, make)))
            out[f"{label} {bits}-bit"] = {"kl_mean": float(d.mean()), "kl_max": float(d.max())}
    return out


def sizes() -> dict:
    models = {"V2-Lite": 27, "V3 (+ MTP layer)": 62}
    out = {}
    for name, layers in models.items():
        for bits in (None, 8, 4):
            per_layer = latent_bytes_per_token(512, 64, mx.bfloat16, bits)
            out[f"{name} {bits or 16}-bit"] = {
                "bytes_per_token_per_layer": per_layer,
                "kb_per_token": per_layer * layers / 1e3,
                "gb_per_128k_tokens": per_layer * layers * 131072 / 1e9,
            }
    return out


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=400, help="arithmetic questions asked")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    results = {"demo": demo_quality(a.limit)}
    d = results["demo"]
    print(f"demo, {d['kv4']['steps']} teacher-forced answer tokens:")
    for bits in (8, 4):
        r = d[f"kv{bits}"]
        print(
            f"  c_kv {bits}-bit: KL mean {r['kl_mean']:.2e} nats, median step's logit error "
            f"{r['median_error']:.2%}, argmax changed at {r['argmax_changed']:.1%} of tokens"
        )
    print("  arithmetic exact match: " + ", ".join(f"{k} {v:.1%}" for k, v in
                                                    d["arithmetic_accuracy"].items()))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        results["rope"] = rope_quality(Path(tmp))
    print("random model, rank 512 / rope 64 (KL to the float cache, nats):")
    for k, v in results["rope"].items():
        print(f"  {k}: mean {v['kl_mean']:.2e}, max {v['kl_max']:.2e}")
    results["sizes"] = sizes()
    print("cache bytes per token (bfloat16):")
    for k, v in results["sizes"].items():
        print(
            f"  {k}: {v['bytes_per_token_per_layer']} B/layer, {v['kb_per_token']:.1f} KB/token,"
            f" {v['gb_per_128k_tokens']:.2f} GB for 128k tokens"
        )
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
