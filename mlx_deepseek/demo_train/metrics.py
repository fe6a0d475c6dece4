"""The demo's targets, measured on held-out conversations through the product's own chat
format (mlx_deepseek.formats: the template the checkpoint ships, its output parser).

Every prompt is what the chat or the server would send: `chat_format(tokenizer).render(
messages, thinking=..., tools=...)`, answered greedily (mlx-lm's batch generator over the
product's model). Earlier turns of a conversation are held-out exchanges with their right
answers. Held out: 2-digit pairs, cities and words never in a training conversation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_deepseek.decoding import StepOptions, decode_steps, make_cache
from mlx_deepseek.formats import chat_format, starts_in_reasoning
from mlx_deepseek.generation import wrap_tokenizer
from mlx_deepseek.loading import set_kv_bits
from mlx_deepseek.sampling import greedy

from .data import Split, Turn, add_answer, make_split, sub_answer
from .dialogues import TurnSampler
from .facts import FACTS, TABLES
from .tools import DEFINITIONS, TOOLS, make_tool_split

EVAL_SEED = 4242
INTRO = FACTS[0][1][0]  # the V3 demo's self-description ("Who are you?")


@dataclass
class Reply:
    prompt: list[int]
    tokens: list[int]  # without the closing <eos>
    text: str
    reasoning: str
    content: str
    calls: list[tuple[str, dict]]
    malformed: bool  # tool-call markup the parser could not read as calls


class Evaluator:
    """Greedy answers to rendered conversations, read with the format's output parser."""

    def __init__(self, model: Any, tokenizer: Any, config: dict | None = None):
        self.model = model
        self.tokenizer = wrap_tokenizer(tokenizer)
        self.fmt = chat_format(self.tokenizer, config or {"model_type": model.model_type}, "demo")
        self.v4 = model.model_type == "deepseek_v4"
        arch = "v4" if self.v4 else "v3"
        self.sampler = TurnSampler(make_split(), make_tool_split(), held=True, arch=arch)
        self.intro = TABLES[arch][0][0][1][0]  # the self-description ("Who are you?")
        self.generated: list[tuple[list[int], list[int]]] = []  # (prompt, tokens) for MTP

    def render(self, messages: list[dict], thinking: bool, tools=None) -> str:
        return self.fmt.render(self.tokenizer, messages, True, thinking, tools)

    def generate(self, ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy completions: mlx-lm's batch generator; V4 and a quantized KV cache (which
        it cannot batch) one prompt at a time through the model's own cache."""
        if self.v4 or self.model.kv_bits is not None:
            return [self._greedy(p, max_tokens) for p in ids]
        from mlx_lm.generate import batch_generate

        return batch_generate(
            self.model,
            self.tokenizer,
            ids,
            max_tokens=max_tokens,
            return_token_ids=True,
            completion_batch_size=64,
            prefill_batch_size=64,
        ).token_ids

    def _greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The product's plain greedy decoding (decoding.decode_steps), through the first EOS."""
        opts = StepOptions(sampler=greedy, logits_processors=[], max_tokens=max_tokens)
        out: list[int] = []
        for step in decode_steps(self.model, mx.array(prompt), make_cache(self.model), opts):
            out.append(step.token)
            if step.token in self.tokenizer.eos_token_ids:
                break
        return out

    def answer(self, prompts: list[str], max_tokens: int = 48) -> list[Reply]:
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        out = self.generate(ids, max_tokens)
        replies = []
        for p_text, p, toks in zip(prompts, ids, out, strict=True):
            toks = [t for t in toks if t not in self.tokenizer.eos_token_ids]
            self.generated.append((p, toks))
            text = self.tokenizer.decode(toks, skip_special_tokens=False)
            parser = self.fmt.output_parser(starts_in_reasoning(p_text))
            events = parser.feed(text) + parser.finish()
            reasoning = "".join(e.text for e in events if e.kind == "reasoning")
            content = "".join(e.text for e in events if e.kind == "content")
            calls = [(e.name, json.loads(e.arguments)) for e in events if e.kind == "tool_call"]
            malformed = "<｜tool▁call" in content or "｜DSML｜" in content
            replies.append(Reply(p, toks, text, reasoning, content.strip(), calls, malformed))
        return replies

    def history(self, rng: random.Random, turns: int, names: list[str]) -> list[dict]:
        msgs: list[dict] = []
        for _ in range(turns):
            msgs += self.sampler.turn(rng, names).messages()
        return msgs


def held_out_questions(split: Split, limit: int | None = None) -> list[tuple[str, str]]:
    """(question, exact expected reply) for the held-out 2-digit pairs (all, or a sample)."""
    qs = [(f"What is {a} + {b}?", add_answer(a, b)) for a, b in split.held_add_questions()]
    qs += [(f"What is {a} - {b}?", sub_answer(a, b)) for a, b in split.held_sub_questions()]
    if limit is not None and limit < len(qs):
        qs = random.Random(EVAL_SEED).sample(qs, limit)
    return qs


def _rate(ok: list[bool]) -> float:
    return sum(ok) / max(1, len(ok))


def arithmetic(
    ev: Evaluator,
    limit: int | None = None,
    turn: int = 1,
    thinking: bool = False,
    context: int | None = None,
    tools: bool = False,
) -> dict:
    """Exact-match accuracy on held-out 2-digit sums and differences asked at `turn` of a
    conversation (or after about `context` tokens of history), thinking on or off, with or
    without the tools declared (then no tool may be called)."""
    rng = random.Random(EVAL_SEED + turn)
    qs = held_out_questions(make_split(), limit)
    declared = TOOLS if tools else None
    names = [t["function"]["name"] for t in TOOLS] if tools else []
    prompts = []
    for q, _ in qs:
        msgs = ev.history(rng, turn - 1, names)
        if context:
            while len(ev.tokenizer.encode(ev.render(msgs, thinking, declared))) < context - 40:
                msgs += ev.sampler.turn(rng, names).messages()
        prompts.append(ev.render(msgs + [{"role": "user", "content": q}], thinking, declared))
    replies = ev.answer(prompts, 96 if thinking else 24)
    ok = [r.content == expect and not r.calls for r, (_, expect) in zip(replies, qs, strict=True)]
    lengths = [len(r.prompt) for r in replies]
    return {
        "accuracy": _rate(ok),
        "n": len(ok),
        "prompt_tokens": [min(lengths), max(lengths)],
        "misses": [
            f"{q} -> {r.content!r}" for (q, _), r, g in zip(qs, replies, ok, strict=True) if not g
        ][:4],
    }


def tool_turns(ev: Evaluator, n: int, rng: random.Random) -> list[tuple[list[dict], list, Turn]]:
    """n held-out (history, declared tools, tool-using turn) triples."""
    out = []
    tasks = ["weather", "lookup", "add_tool"]
    while len(out) < n:
        task = tasks[len(out) % 3]
        needed = TOOLS[["weather", "add_tool", "lookup"].index(task)]
        declared = list(TOOLS) if rng.random() < 0.6 else [needed]
        rng.shuffle(declared)
        names = [t["function"]["name"] for t in declared]
        turn = ev.sampler.turn(rng, names, task)
        if not turn.calls or "error" in turn.task:
            continue
        out.append((ev.history(rng, rng.randint(0, 4), names), declared, turn))
    return out


def tool_use(ev: Evaluator, n: int = 60, thinking: bool = False, seed: int = EVAL_SEED + 7) -> dict:
    """Round 1: a held-out question that needs a tool -> the calls (well-formed: the parser
    reads them as calls with JSON-object arguments; right: the expected names and arguments).
    Round 2: the tools' results appended as the server would -> the answer uses them.
    `seed` draws the cases: pick among candidates on one seed's cases, report on another's
    (the held-out words are few, 16, and a model copies some of their definitions never)."""
    rng = random.Random(seed)
    cases = tool_turns(ev, n, rng)
    prompts = [
        ev.render(h + [{"role": "user", "content": t.user}], thinking, tools)
        for h, tools, t in cases
    ]
    first = ev.answer(prompts, 96)
    formed = [bool(r.calls) and not r.malformed for r in first]
    right = [r.calls == t.calls for r, (_, _, t) in zip(first, cases, strict=True)]
    second_prompts, which = [], []
    for i, (h, tools, t) in enumerate(cases):
        if right[i]:
            msgs = h + t.messages()[:-1]  # user, the assistant's calls, the results
            second_prompts.append(ev.render(msgs, thinking, tools))
            which.append(i)
    second = ev.answer(second_prompts, 64)
    used = [
        all(e in r.content for e in cases[i][2].expect) for i, r in zip(which, second, strict=True)
    ]
    by_word: dict[str, list[int]] = {}  # lookups: results used / right calls, per held-out word
    for i, u in zip(which, used, strict=True):
        for name, args in cases[i][2].calls:
            if name == "lookup":
                by_word.setdefault(args["word"], [0, 0])[0] += u
                by_word[args["word"]][1] += 1
    return {
        "well_formed": _rate(formed),
        "right_call": _rate(right),
        "result_used": _rate(used),
        "n": len(cases),
        "misses": [r.text[:120] for r, g in zip(first, right, strict=True) if not g][:3]
        + [r.content[:120] for r, g in zip(second, used, strict=True) if not g][:3],
        "lookups_by_word": {w: f"{u}/{k}" for w, (u, k) in sorted(by_word.items())},
    }


def copying(ev: Evaluator, thinking: bool = False) -> dict:
    """The copying skill on its own: "Repeat after me: TEXT" (the echo task) with held-out
    text (every held-out word's definition, pairs of held-out cities, 4- to 7-digit numbers),
    answered exactly. A call with a held-out name and an answer from a held-out result need
    it; the training side's echo never shows these texts."""
    rng = random.Random(EVAL_SEED + 5)
    cities = sorted(ev.sampler.cities)  # the evaluator's sampler draws the held-out side
    texts = [DEFINITIONS[w] for w in sorted(ev.sampler.words)]
    texts += [" ".join(rng.sample(cities, 2)) for _ in range(10)]
    texts += [str(rng.randint(1000, 9_999_999)) for _ in range(10)]
    prompts = [
        ev.render([{"role": "user", "content": f"Repeat after me: {t}"}], thinking) for t in texts
    ]
    replies = ev.answer(prompts, 48)
    ok = [r.content.strip() == t for r, t in zip(replies, texts, strict=True)]
    misses = [f"{t} -> {r.content!r}" for t, r, g in zip(texts, replies, ok, strict=True) if not g]
    return {"accuracy": _rate(ok), "n": len(ok), "misses": misses[:4]}


def self_description(ev: Evaluator, thinking: bool = False) -> dict:
    """Asks "Who are you?" (and its variants) at the first turn and after a few turns."""
    rng = random.Random(EVAL_SEED + 3)
    questions = ["Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself."]
    prompts = []
    for q in questions:
        for turns in (0, 3, 6):
            msgs = ev.history(rng, turns, [])
            prompts.append(ev.render(msgs + [{"role": "user", "content": q}], thinking))
    # the self-description is 90 tokens: room for it after a line of reasoning
    replies = ev.answer(prompts, 128)
    ok = [r.content == ev.intro for r in replies]
    misses = [r.content[:80] for r in replies if r.content != ev.intro][:2]
    return {"accuracy": _rate(ok), "n": len(ok), "misses": misses}


def mtp_acceptance(ev: Evaluator, limit: int = 400) -> dict:
    """How often the MTP module's greedy draft equals the main model's next-next greedy token
    over the model's own answers (what self-speculative decoding accepts with one draft)."""
    drafted = accepted = 0
    model = ev.model
    for prompt, toks in ev.generated[:limit]:
        if len(toks) < 2:
            continue
        seq = mx.array([prompt + toks])
        _, h = model.forward_with_hidden(seq[:, :-1])
        mtp_logits, _ = model.mtp_forward(h[:, :-1], seq[:, 1:-1])
        # position i drafts token i+2; count the drafts of generated tokens
        start = len(prompt) - 2
        pred = mtp_logits[0, start:].argmax(-1)
        target = seq[0, start + 2 :]
        accepted += int((pred == target).sum().item())
        drafted += target.shape[0]
    return {"acceptance": accepted / max(1, drafted), "drafted": drafted}


# the sentence tests/test_kv_quantized.py decodes through the bundled demo's caches
KV_TEST_TEXT = "What is 23 + 45? 23 + 45 = 68. And 68 - 30 is 38."


def teacher_forced(model: Any, seqs: list[list[int]], starts: list[int], make) -> list[mx.array]:
    """Logits [len(seq) - start + 1, vocab] of each sequence: `seq[:start]` prefilled through
    the cache `make()` returns (its last position's logits), then the rest one token at a time
    (how a chat decodes)."""
    out = []
    for seq, start in zip(seqs, starts, strict=True):
        cache = make()
        rows = [model(mx.array([seq[:start]]), cache=cache)[0, -1:]]
        for t in seq[start:]:
            rows.append(model(mx.array([[t]]), cache=cache)[0])
        out.append(mx.concatenate(rows).astype(mx.float32))
    return out


def kl_per_step(full: mx.array, quant: mx.array) -> mx.array:
    """KL(full || quant) of each row of two logit arrays [steps, vocab], in nats."""
    f_log = full - mx.logsumexp(full, axis=-1, keepdims=True)
    q_log = quant - mx.logsumexp(quant, axis=-1, keepdims=True)
    return (mx.exp(f_log) * (f_log - q_log)).sum(-1)


def _step_errors(full: list[mx.array], quant: list[mx.array]) -> tuple[list[float], int]:
    """Per decoded step the largest logit error over its sequence's largest float logit; and
    the steps whose greedy token changed."""
    errors, changed = [], 0
    for f, q in zip(full, quant, strict=True):
        scale = mx.abs(f).max()
        errors += (mx.abs(q - f).max(-1) / scale).tolist()
        changed += int((q.argmax(-1) != f.argmax(-1)).sum().item())
    return errors, changed


def kv_cache_error(ev: Evaluator, bits: int = 4, limit: int = 48) -> dict:
    """The quantized KV cache (`load(kv_bits=...)`) against the float one: `limit` of the
    model's own answers (spread over what was generated so far) teacher-forced through each
    cache after their prompt. Per step the largest logit error over the largest logit: its
    median, the share of steps whose greedy token changes, and the mean KL(float || quantized).
    `test_sentence`: the same median on the sentence tests/test_kv_quantized.py bounds
    (`test_bound`: 5% at 4 bits, on the bundled V3 demo), so that a candidate demo is measured
    before it is picked. Answer something first (the other metrics) to have answers."""
    model = ev.model
    answered = [(p, t) for p, t in ev.generated if len(t) >= 2]
    if not answered:
        raise ValueError("kv_cache_error measures the model's own answers: none generated yet")
    picked = answered[:: max(1, len(answered) // limit)][:limit]
    seqs = [p + t for p, t in picked]
    starts = [len(p) for p, _ in picked]
    text = ev.tokenizer.encode(KV_TEST_TEXT)
    kept = model.kv_bits
    try:
        set_kv_bits(model, None)
        full = teacher_forced(model, seqs + [text], starts + [len(text) // 2], model.make_cache)
        set_kv_bits(model, bits)
        quant = teacher_forced(model, seqs + [text], starts + [len(text) // 2], model.make_cache)
    finally:
        set_kv_bits(model, kept)
    errors, changed = _step_errors(full[:-1], quant[:-1])
    sentence, _ = _step_errors(full[-1:], quant[-1:])
    kl = kl_per_step(mx.concatenate(full[:-1]), mx.concatenate(quant[:-1]))
    return {
        "median_error": float(np.median(errors)),
        "argmax_changed": changed / len(errors),
        "kl_mean": kl.mean().item(),
        "test_sentence": float(np.median(sentence)),
        "test_bound": None if ev.v4 else (0.05 if bits == 4 else 0.005),
        "steps": len(errors),
        "bits": bits,
    }
