"""DeepSeek V4's quantized cache (--kv-bits): KL to the full-precision cache, which parts are
worth quantizing, and bytes per token of V4-Flash.

    python scripts/v4_kv_quality.py [--tokens 160] [--sequences 3] [--json FILE]

1. A random V4 with DeepSeek's widths (head_dim 512 = 448 + 64 RoPE, index_head_dim 128),
   built by transformers' DeepseekV4ForCausalLM (torch, the test extra) with small other
   sizes: layers sliding / compressed sparse (ratio 4) / heavily compressed (ratio 16, so
   that short sequences have rows) / compressed sparse, window 16, index top-k 8. Random
   token sequences are teacher-forced one token at a time through the float cache and the
   quantized one (load(kv_bits=8|4)): KL(float || quantized) per token and the share of
   tokens whose argmax changed.
2. The alternatives, as float caches holding round-tripped rows: the compressed rows' RoPE
   channels quantized too; the indexer's rows quantized too (whole rows).
3. Bytes per token of V4-Flash's real config (43 layers + MTP) at 128K tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.loading import load_model
from mlx_deepseek.models import model_args
from mlx_deepseek.models.v4_cache import RowBuffer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from v4_checkpoints import CSA, HCA, SLIDING, build_v4, save_v4  # noqa: E402

FLASH = {  # DeepSeek-V4-Flash's config.json: the fields the cache's size depends on
    "model_type": "deepseek_v4",
    "num_hidden_layers": 43,
    "num_nextn_predict_layers": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "index_head_dim": 128,
    "sliding_window": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


class RoundTrip(RowBuffer):
    """Float rows holding quantize-then-dequantize of their first d - keep channels."""

    def __init__(self, bits: int, keep: int):
        super().__init__()
        self.bits, self.keep = bits, keep

    def append(self, rows: mx.array) -> None:
        d = rows.shape[-1] - self.keep
        q = mx.quantize(rows[..., :d], group_size=64, bits=self.bits)
        body = mx.dequantize(*q, group_size=64, bits=self.bits).astype(rows.dtype)
        super().append(mx.concatenate([body, rows[..., d:]], axis=-1) if self.keep else body)


def teacher_forced(model, sequences, variant=None) -> np.ndarray:
    """Log-probabilities [tokens, vocab] of each sequence decoded one token at a time."""
    out = []
    for seq in sequences:
        cache = model.make_cache()
        for c in cache:
            for name, (bits, keep) in (variant or {}).items():
                if getattr(c, name) is not None:
                    setattr(c, name, RoundTrip(bits, keep))
        rows = [model(mx.array([[int(t)]]), cache)[0] for t in seq]
        lp = mx.concatenate(rows).astype(mx.float32)
        out.append(np.array(lp - mx.logsumexp(lp, axis=-1, keepdims=True)))
    return np.concatenate(out)


def compare(base: np.ndarray, other: np.ndarray) -> dict:
    kl = (np.exp(base) * (base - other)).sum(-1)
    changed = float((base.argmax(-1) != other.argmax(-1)).mean())
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "argmax_changed": changed}


def quality(tokens: int, sequences: int) -> dict:
    root = Path(tempfile.mkdtemp())
    hf = build_v4(
        "mixed",
        seed=1,
        hidden_size=128,
        head_dim=512,
        partial_rotary_factor=64 / 512,
        index_head_dim=128,
        num_attention_heads=8,
        q_lora_rank=64,
        o_lora_rank=32,
        o_groups=2,
        layer_types=[SLIDING, CSA, HCA, CSA],
        compress_rates={CSA: 4, HCA: 16},
        sliding_window=16,
        index_topk=8,
        vocab_size=256,
    )
    save_v4(hf, root / "v4")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(2, 256, tokens) for _ in range(sequences)]
    model = load_model(root / "v4", dtype="bfloat16")
    base = teacher_forced(model, seqs)
    res = {}
    for bits in (8, 4):
        quantized = load_model(root / "v4", dtype="bfloat16", kv_bits=bits)
        res[f"{bits}-bit"] = compare(base, teacher_forced(quantized, seqs))
        res[f"{bits}-bit, RoPE channels too"] = compare(
            base, teacher_forced(model, seqs, {"compressed": (bits, 0)})
        )
        res[f"{bits}-bit, indexer rows too"] = compare(
            base, teacher_forced(model, seqs, {"compressed": (bits, 64), "indexer": (bits, 0)})
        )
        print(json.dumps({k: v for k, v in res.items() if k.startswith(str(bits))}), flush=True)
    return res


def flash_bytes(context: int = 131072) -> dict:
    args = model_args(FLASH)
    out = {}
    for bits in (None, 8, 4):
        total = args.cache_bytes(context, 2, bits)
        grow = args.cache_bytes(2 * context, 2, bits) - total  # the bounded windows cancel
        out["full" if bits is None else f"{bits}-bit"] = {
            "bytes_per_token": grow / context,
            "bytes_at_context": total,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--sequences", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = {"flash_128k": flash_bytes()}
    print(json.dumps(res), flush=True)
    res["quality"] = quality(a.tokens, a.sequences)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
