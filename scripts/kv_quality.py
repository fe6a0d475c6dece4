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
from mlx_deepseek.demo_train.data import make_split
from mlx_deepseek.demo_train.evaluate import arithmetic_accuracy, chat_prompt, greedy_generate
from mlx_deepseek.models.cache import KVCache, QuantizedKVCache, latent_bytes_per_token


def teacher_forced(model, sequences: list[list[int]], starts: list[int], make) -> np.ndarray:
    """Log-probabilities at every position after `start` of each sequence, decoded one token at
    a time through caches from `make()`: [tokens, vocab]."""
    out = []
    for seq, start in zip(sequences, starts, strict=True):
        cache = model.make_cache()
        cache[:] = [make() for _ in cache]
        logits = model(mx.array([seq[:start]]), cache=cache)[0, -1:]
        rows = [logits]
        for t in seq[start:-1]:
            rows.append(model(mx.array([[t]]), cache=cache)[0])
        lp = mx.concatenate(rows).astype(mx.float32)
        out.append(np.array(lp - mx.logsumexp(lp, axis=-1, keepdims=True)))
    return np.concatenate(out)


def kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def demo_quality(limit: int) -> dict:
    model, tokenizer = load("demo")
    split = make_split()
    questions = [f"What is {a} + {b}?" for a, b in split.held_add_questions()[:24]]
    questions += [f"What is {a} - {b}?" for a, b in split.held_sub_questions()[:24]]
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    answers = greedy_generate(model, prompts, tokenizer.eos_token_id)
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    starts = [len(p) for p in prompts]
    full = teacher_forced(model, seqs, starts, KVCache)
    result = {"tokens": int(full.shape[0])}
    g = 64
    for bits in (8, 4):
        q = teacher_forced(model, seqs, starts, lambda b=bits: QuantizedKVCache(g, b))
        d = kl(full, q)
        result[f"kv{bits}"] = {
            "kl_mean": float(d.mean()),
            "kl_max": float(d.max()),
            "argmax_changed": float((full.argmax(-1) != q.argmax(-1)).mean()),
        }
    accuracy = {}
    for bits in (None, 8, 4):
        model.kv_bits, model.kv_group_size = bits, g
        accuracy[str(bits or "float")] = arithmetic_accuracy(model, tokenizer, split, limit)["all"]
    model.kv_bits = None
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
            d = kl(full, teacher_forced(model, seqs, starts, make))
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
    print(f"demo, {d['tokens']} teacher-forced answer tokens:")
    for bits in (8, 4):
        r = d[f"kv{bits}"]
        print(
            f"  c_kv {bits}-bit: KL mean {r['kl_mean']:.2e} max {r['kl_max']:.2e} nats, "
            f"argmax changed at {r['argmax_changed']:.1%} of tokens"
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
