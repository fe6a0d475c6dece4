"""Self-speculative decoding with the MTP head vs plain decoding, in one run.

    python scripts/bench_mtp.py [MODEL] [--draft-tokens 1,2] [--max-tokens 64] [--repeats 3]

For each prompt, greedy answers are generated plainly and with MTP drafting, interleaved
and repeated; it prints the acceptance rate, tokens per verification step, decode tok/s
of both and their ratio (median over repeats), and checks the outputs are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek import load, stream_generate

PROMPTS = [
    "What is 23 + 45?",
    "What is 71 - 38?",
    "What is 452 + 379?",
    "Spell 'planet' backwards.",
    "Count from 3 to 9.",
    "Hello! Who are you?",
]


def decode(model, tokenizer, prompt: str, max_tokens: int, mtp: bool, draft: int):
    messages = [{"role": "user", "content": prompt}]
    tokens, last = [], None
    t0 = time.perf_counter()
    first = None
    for r in stream_generate(
        model, tokenizer, messages, max_tokens, temperature=0.0, mtp=mtp, draft_tokens=draft
    ):
        if first is None:
            first = time.perf_counter()
        tokens.append(r.token)
        last = r
    seconds = time.perf_counter() - (first or t0)
    return tokens, last, (len(tokens) - 1) / seconds if seconds > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("--draft-tokens", default="1,2")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, tokenizer = load(args.model)
    if not model.mtp:
        raise SystemExit(f"{args.model}: this checkpoint has no MTP layer")
    decode(model, tokenizer, PROMPTS[0], 8, False, 1)  # warm up (compilation)
    decode(model, tokenizer, PROMPTS[0], 8, True, 1)
    print(f"model {args.model}; greedy; {args.max_tokens} max tokens; {args.repeats} repeats")
    print(
        f"{'drafts':>6} {'accept':>7} {'tok/step':>9} {'plain tok/s':>12} {'mtp tok/s':>10} "
        f"{'speed-up':>9} {'identical':>10}"
    )
    for draft in (int(d) for d in args.draft_tokens.split(",")):
        ratios, plain_tps, mtp_tps, acc, tps_step, same = [], [], [], [], [], True
        for _ in range(args.repeats):
            for prompt in PROMPTS:
                a, _, tp = decode(model, tokenizer, prompt, args.max_tokens, False, draft)
                b, last, tm = decode(model, tokenizer, prompt, args.max_tokens, True, draft)
                same &= a == b
                plain_tps.append(tp)
                mtp_tps.append(tm)
                ratios.append(tm / tp)
                acc.append(last.acceptance_rate)
                tps_step.append(last.tokens_per_step)
        print(
            f"{draft:>6} {statistics.mean(acc):>7.0%} {statistics.mean(tps_step):>9.2f} "
            f"{statistics.median(plain_tps):>12.1f} {statistics.median(mtp_tps):>10.1f} "
            f"{statistics.median(ratios):>8.2f}x {str(same):>10}"
        )


if __name__ == "__main__":
    main()
