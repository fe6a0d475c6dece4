"""Evaluate demo checkpoints: ``python -m mlx_deepseek.demo_train.evaluate [MODEL ...]``.

For each model (a folder, or ``demo`` for the bundled 4-bit one):
- exact-match accuracy on every held-out 2-digit addition and subtraction question, asked
  as "What is a + b?" / "What is a - b?" through the chat template, answered greedily; the
  reply must be exactly "a + b = c." (after any <think> block);
- the MTP module's next-next-token accuracy on held-out dialogues (assistant tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

# (mlx_deepseek/__init__ has already preloaded OpenBLAS: this module lives inside it)
import mlx.core as mx
import numpy as np

from .config import TRAIN_CONTEXT
from .data import Split, add_answer, make_split, sub_answer

EVAL_SEED = 4242


def chat_prompt(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def greedy_generate(
    model, prompts: list[list[int]], eos_id: int, max_tokens: int = 64, batch: int = 512
) -> list[list[int]]:
    """Greedy continuations (without the eos) of each prompt, batched by prompt length."""
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for idx_all in by_len.values():
        for s in range(0, len(idx_all), batch):
            idx = idx_all[s : s + batch]
            cache = model.make_cache()
            logits = model(mx.array([prompts[i] for i in idx]), cache=cache)
            done = np.zeros(len(idx), dtype=bool)
            for _ in range(max_tokens):
                nxt = logits[:, -1].argmax(-1)
                toks = np.array(nxt)
                for j, t in enumerate(toks):
                    if not done[j]:
                        if t == eos_id:
                            done[j] = True
                        else:
                            out[idx[j]].append(int(t))
                if done.all():
                    break
                logits = model(nxt[:, None], cache=cache)
    return out


def answer_text(tokenizer, ids: list[int]) -> str:
    """The reply as the chat shows it: the text after any </think>, stripped."""
    return tokenizer.decode(ids).split("</think>")[-1].strip()


def arithmetic_questions(split: Split, limit: int | None = None) -> list[tuple[str, str, str]]:
    """(op, question, expected reply) for the held-out 2-digit pairs."""
    qs = [("+", f"What is {a} + {b}?", add_answer(a, b)) for a, b in split.held_add_questions()]
    qs += [("-", f"What is {a} - {b}?", sub_answer(a, b)) for a, b in split.held_sub_questions()]
    if limit is not None:
        qs = random.Random(EVAL_SEED).sample(qs, limit)
    return qs


def arithmetic_accuracy(model, tokenizer, split: Split, limit: int | None = None) -> dict:
    qs = arithmetic_questions(split, limit)
    prompts = [chat_prompt(tokenizer, q) for _, q, _ in qs]
    outs = greedy_generate(model, prompts, tokenizer.eos_token_id)
    right = defaultdict(int)
    count = defaultdict(int)
    failures = []
    for (op, q, expected), ids in zip(qs, outs, strict=True):
        got = answer_text(tokenizer, ids)
        count[op] += 1
        if got == expected:
            right[op] += 1
        elif len(failures) < 5:
            failures.append(f"{q} -> {got!r}")
    result = {
        "add": right["+"] / max(count["+"], 1),
        "sub": right["-"] / max(count["-"], 1),
        "all": (right["+"] + right["-"]) / max(1, count["+"] + count["-"]),
        "n": count["+"] + count["-"],
        "failures": failures,
    }
    return result


def mtp_accuracy(model, tokenizer_json: Path, split: Split, rows: int = 256) -> dict:
    """Next-token and MTP next-next-token accuracy on held-out dialogues' assistant tokens."""
    from tokenizers import Tokenizer

    from .packing import Packer

    packer = Packer(Tokenizer.from_file(str(tokenizer_json)), TRAIN_CONTEXT + 1)
    ids_np, mask_np = packer.batch(random.Random(EVAL_SEED), split, rows, held=True)
    ids, mask = mx.array(ids_np), mx.array(mask_np)
    right_main = right_mtp = 0.0
    for s in range(0, rows, 64):
        x = ids[s : s + 64, :-1]
        logits, h = model.forward_with_hidden(x)
        mtp_logits, _ = model.mtp_forward(h[:, :-1], x[:, 1:])
        m1, m2 = mask[s : s + 64, 1:], mask[s : s + 64, 2:]
        right_main += ((logits.argmax(-1) == ids[s : s + 64, 1:]) * m1).sum().item()
        right_mtp += ((mtp_logits.argmax(-1) == ids[s : s + 64, 2:]) * m2).sum().item()
    return {
        "next_token": right_main / float(mask_np[:, 1:].sum()),
        "mtp_next_next_token": right_mtp / float(mask_np[:, 2:].sum()),
        "tokens": int(mask_np[:, 2:].sum()),
    }


def evaluate(name: str, limit: int | None = None) -> dict:
    from mlx_deepseek import load
    from mlx_deepseek.loading import resolve_model_path

    model, tokenizer = load(name)
    split = make_split()
    result = {"model": name, "arithmetic": arithmetic_accuracy(model, tokenizer, split, limit)}
    result["mtp"] = mtp_accuracy(model, resolve_model_path(name) / "tokenizer.json", split)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="*", default=["demo"], help="folders, or `demo`")
    p.add_argument("--limit", type=int, default=None, help="evaluate a random sample only")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    results = []
    for name in a.models:
        r = evaluate(name, a.limit)
        ar, mt = r["arithmetic"], r["mtp"]
        print(
            f"{name}: held-out 2-digit exact match {ar['all']:.1%} (add {ar['add']:.1%}, "
            f"sub {ar['sub']:.1%}, n={ar['n']}); MTP next-next-token "
            f"{mt['mtp_next_next_token']:.1%} (next-token {mt['next_token']:.1%}, "
            f"{mt['tokens']} tokens)"
        )
        for f in ar["failures"]:
            print(f"  miss: {f}")
        results.append(r)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if len(results) == 2:
        gap = results[0]["arithmetic"]["all"] - results[1]["arithmetic"]["all"]
        print(f"accuracy gap ({results[0]['model']} - {results[1]['model']}): {gap:+.1%}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
