"""Quantization quality: KL(unquantized || quantized) and bits per weight, uniform vs mixed.

    python scripts/quant_quality.py [MODEL] [--text FILE] [--bits 4 3] [--group-size 64]

MODEL is a Hugging Face DeepSeek checkpoint folder (bf16 or FP8); without one, a small
random DeepSeek-V3-shaped model is built whose routed experts hold most of the weights, as
in the real models. Each recipe is converted with `mlx-deepseek convert` and compared with
the unquantized float32 conversion on held-out tokens: from --text (tokenized with the
model's tokenizer) or random token ids. Also prints, from the real configs alone, the
size and per-token bytes the recipes give V2-Lite and V3.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_deepseek.convert.plan as plan_module
import numpy as np
from mlx_deepseek.convert.layout import expected_entries, kv_b_outputs
from mlx_deepseek.convert.pipeline import convert
from mlx_deepseek.convert.plan import Options
from mlx_deepseek.convert.recipe import QuantSpec, Recipe
from mlx_deepseek.convert.synthetic import write_checkpoint

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx)
from mlx_deepseek.loading import load_model
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.tiny import RELEASES, convertible_config

# experts ~90% of the weights, 6 of 64 routed per token (V2-Lite's proportions, scaled down)
DEMO = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=1024,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=4,
    kv_lora_rank=128,
    q_lora_rank=192,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
)


class LatentKept(Recipe):
    """Ablation: the mixed recipe with embed_q / unembed_out (kv_b_proj) unquantized."""

    def spec(self, role: str, in_dim: int) -> QuantSpec | None:
        return None if role == "attention_latent" else super().spec(role, in_dim)


def log_probs(path: Path, tokens: np.ndarray) -> np.ndarray:
    model = load_model(path, dtype="float32")
    out = []
    for row in tokens:  # one sequence at a time keeps memory flat
        logits = model(mx.array(row[None])).astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0])
    return np.stack(out)


def held_out_tokens(
    src: Path, text: Path | None, n_seq: int, length: int, vocab: int
) -> np.ndarray:
    if text is None:
        return np.random.default_rng(123).integers(2, vocab, size=(n_seq, length))
    from mlx_lm.utils import load_tokenizer

    ids = load_tokenizer(src).encode(text.read_text())
    need = n_seq * length
    if len(ids) < need:
        raise SystemExit(f"{text}: {len(ids)} tokens, need {need} (lower --seqs / --length)")
    return np.array(ids[-need:]).reshape(n_seq, length)  # the end of the text: held out


def estimate(config: dict, recipe: str, bits: int, group_size: int) -> tuple[float, float, float]:
    """(bits per weight, GB, GB read per decoded token) for a config, without weights."""
    args = ModelArgs.from_dict(config)
    rec = Recipe(recipe, bits, group_size)
    params = total = per_token = 0.0
    k_over_e = args.num_experts_per_tok / args.n_routed_experts
    for e in expected_entries(args, keep_mtp=False):
        n = math.prod(e.shape)
        if e.kind == "vector":
            b = n * (4 if e.role == "router_bias" else 2)
        else:
            parts = kv_b_outputs(args, e.out) if e.kind == "kv_b" else ((e.out, e.shape),)
            b = 0.0
            for _, shape in parts:
                spec = rec.spec(e.role, shape[-1])
                m = math.prod(shape)
                b += 2 * m if spec is None else m * spec.bits / 8 + 4 * m / spec.group_size
        params += n
        total += b
        frac = (
            k_over_e
            if e.role == "routed_expert"
            else 1 / args.vocab_size
            if e.role == "embedding"
            else 1
        )
        per_token += b * frac
    return total * 8 / params, total / 1e9, per_token / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="HF checkpoint folder (default: random)")
    ap.add_argument("--text", type=Path, help="held-out text (default: random token ids)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    try:
        src = args.model
        if src is None:
            src = work / "src"
            write_checkpoint(src, convertible_config("deepseek_v3", **DEMO), fmt="bf16", seed=7)
        vocab = json.loads((src / "config.json").read_text())["vocab_size"]
        tokens = held_out_tokens(src, args.text, args.seqs, args.length, vocab)
        convert(src, work / "ref", Options(quantize=False, dtype="float32"))
        ref = log_probs(work / "ref", tokens)
        print(
            f"model: {args.model or 'random V3-shaped (experts ~90% of weights)'}; "
            f"{tokens.size} held-out tokens ({'text' if args.text else 'random ids'})"
        )
        head = ("recipe", "bits/weight", "size MB", "KL(ref||q)", "top-1 agree")
        print(" ".join(f"{h:>{w}}" for h, w in zip(head, (26, 11, 8, 11, 11), strict=True)))
        runs = [
            (f"{r} {b}-bit", Options(bits=b, group_size=args.group_size, recipe=r), None)
            for b in args.bits
            for r in ("uniform", "mixed")
        ]
        runs.append(
            (
                f"mixed {args.bits[0]}-bit, kv_b bf16",
                Options(bits=args.bits[0], group_size=args.group_size, recipe="mixed"),
                LatentKept,
            )
        )
        for label, options, recipe_cls in runs:
            dst = work / "q"
            original = plan_module.Recipe
            if recipe_cls is not None:  # ablation only: swap the recipe class the plan uses
                plan_module.Recipe = recipe_cls
            try:
                s = convert(src, dst, options)
            finally:
                plan_module.Recipe = original
            q = log_probs(dst, tokens)
            kl = float((np.exp(ref) * (ref - q)).sum(-1).mean())
            agree = float((ref.argmax(-1) == q.argmax(-1)).mean())
            print(
                f"{label:>26} {s.bits_per_weight:>11.3f} {s.write_bytes / 1e6:>8.2f} "
                f"{kl:>11.5f} {agree:>11.3f}"
            )
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nfrom the real configs (bf16 scales, MTP excluded):")
    print(f"{'model':>8} {'recipe':>14} {'bits/weight':>11} {'size GB':>8} {'GB/token':>9}")
    for name, cfg in RELEASES.items():
        for b in args.bits:
            for r in ("uniform", "mixed"):
                bpw, gb, tok = estimate(cfg, r, b, args.group_size)
                print(f"{name:>8} {f'{r} {b}-bit':>14} {bpw:>11.3f} {gb:>8.1f} {tok:>9.2f}")


if __name__ == "__main__":
    main()
