"""Evaluate demo checkpoints: ``python -m mlx_deepseek.demo_train.evaluate [MODEL ...]``.

For each model (a folder, or ``demo`` for the bundled 4-bit one), on held-out data through
the checkpoint's own chat format (metrics.py):

- arithmetic: exact match on the held-out 2-digit sums and differences, thinking off and
  on, at turn 1 and turn 10 of a conversation, after ~1,000 tokens of history, and with the
  tools declared (no call allowed);
- tools: well-formed calls with JSON arguments, the right call, the result used;
- self-description ("Who are you?"), thinking off and on;
- copying: held-out text repeated back exactly (the skill held-out calls and results need);
- MTP: the acceptance of its greedy drafts over the model's own answers;
- the 4-bit KV cache (`--kv-bits 4`): its logit error against the float cache over the model's
  own answers, and on the sentence tests/test_kv_quantized.py bounds.

``--limit N`` samples N questions per arithmetic row (the full split has 1,228).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import metrics


def arithmetic_accuracy(model: Any, tokenizer: Any, limit: int | None = None) -> dict:
    """Held-out 2-digit exact match at turn 1, thinking off (the training log's probe)."""
    return metrics.arithmetic(metrics.Evaluator(model, tokenizer), limit)


def evaluate(
    model: Any,
    tokenizer: Any,
    limit: int | None = None,
    tool_cases: int = 150,
    tool_seed: int = metrics.EVAL_SEED + 7,
) -> dict:
    ev = metrics.Evaluator(model, tokenizer)
    rows: dict[str, Any] = {}
    short = limit or 300
    for thinking in (False, True):
        mode = "on" if thinking else "off"
        rows[f"arith_turn1_think_{mode}"] = metrics.arithmetic(ev, limit, 1, thinking)
        rows[f"arith_turn10_think_{mode}"] = metrics.arithmetic(ev, limit, 10, thinking)
        rows[f"tools_think_{mode}"] = metrics.tool_use(ev, tool_cases, thinking, tool_seed)
        rows[f"who_think_{mode}"] = metrics.self_description(ev, thinking)
    rows["arith_after_1000_tokens"] = metrics.arithmetic(ev, min(short, 200), 1, context=1000)
    rows["arith_with_tools_declared"] = metrics.arithmetic(ev, short, 3, tools=True)
    rows["copy_held_out"] = metrics.copying(ev)
    rows["mtp"] = metrics.mtp_acceptance(ev)
    rows["kv_cache_4bit"] = metrics.kv_cache_error(ev, 4)
    return rows


def _line(name: str, row: dict) -> str:
    if "median_error" in row:
        bound = f", bound {row['test_bound']:.1%}" if row["test_bound"] else ""
        return (
            f"{name:28s} median step's logit error {row['median_error']:6.2%}  greedy token "
            f"changed {row['argmax_changed']:6.1%}  KL {row['kl_mean']:.1e}  (steps "
            f"{row['steps']}; the test's sentence {row['test_sentence']:.2%}{bound})"
        )
    if "acceptance" in row:
        return f"{name:28s} {row['acceptance']:6.1%}  (drafts {row['drafted']})"
    if "well_formed" in row:
        return (
            f"{name:28s} well-formed {row['well_formed']:6.1%}  right call {row['right_call']:6.1%}"
            f"  result used {row['result_used']:6.1%}  (n={row['n']})"
        )
    extra = f", prompts {row['prompt_tokens']} tokens" if "prompt_tokens" in row else ""
    return f"{name:28s} {row['accuracy']:6.1%}  (n={row['n']}{extra})"


def main(argv: list[str] | None = None) -> None:
    from mlx_deepseek import load

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="*", default=["demo"], help="folders, or `demo`")
    p.add_argument("--limit", type=int, default=None, help="questions per arithmetic row")
    p.add_argument("--tool-cases", type=int, default=150)
    p.add_argument(
        "--tool-seed",
        type=int,
        default=metrics.EVAL_SEED + 7,
        help="draws the tool cases: report on a seed the candidates were not picked on",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    results = {}
    for name in a.models:
        t0 = time.time()
        model, tokenizer = load(name)
        rows = evaluate(model, tokenizer, a.limit, a.tool_cases, a.tool_seed)
        print(f"== {name} ({time.time() - t0:.0f} s)")
        for key, row in rows.items():
            print("  " + _line(key, row))
            for miss in row.get("misses", [])[:2]:
                print(f"      miss: {miss!r}")
            if row.get("lookups_by_word"):
                words = ", ".join(f"{w} {r}" for w, r in row["lookups_by_word"].items())
                print(f"      lookups used per held-out word: {words}")
        results[name] = rows
        sys.stdout.flush()
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    if len(results) == 2:
        (n1, r1), (n2, r2) = results.items()
        for key in r1:
            v1, v2 = _headline(r1[key]), _headline(r2[key])
            if v1 is not None and v2 is not None:
                print(f"gap {key:28s} {n1} - {n2}: {100 * (v1 - v2):+.1f} points")


def _headline(row: dict) -> float | None:
    """A row's one rate for the float-vs-4-bit gap (None: a row that has none)."""
    for key in ("accuracy", "right_call", "acceptance"):
        if key in row:
            return row[key]
    return None


if __name__ == "__main__":
    main()
