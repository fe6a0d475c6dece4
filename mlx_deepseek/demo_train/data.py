"""The demo's skills, one exchange at a time, and the held-out split.

A `Turn` is one user message and everything the assistant does about it: its reasoning
(what it writes after `<think>` in thinking mode), its tool calls with their results, and
its answer. Skills: addition and subtraction (up to three digits), counting, spelling a
word backwards, facts about itself, greetings, polite refusals (facts.py), and tool use:
the weather, exact sums of big numbers, word meanings (tools.py).

The held-out split: 10% of the 2-digit addition pairs (unordered, so neither `a + b` nor
`b + a` is trained), 10% of the 2-digit subtraction pairs, and (tools.py) 15% of the
cities and of the looked-up words never appear in a training conversation. "23 + 45" and
"71 - 38" are forced into it, so the README's questions show generalisation, not recall.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 1234
FORCED_HELD_OUT_ADD = [(23, 45)]
FORCED_HELD_OUT_SUB = [(71, 38)]


@dataclass
class Turn:
    """One exchange. `calls` are (tool name, arguments) made before answering; `results`
    the tools' outputs (text, one per call); `answer` what the user reads at the end."""

    user: str
    answer: str
    reasoning: str
    task: str
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)  # strings a correct answer contains

    def messages(self) -> list[dict[str, Any]]:
        """The exchange as OpenAI-style messages (what chat_format(...).render takes)."""
        out: list[dict[str, Any]] = [{"role": "user", "content": self.user}]
        if self.calls:
            out.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"type": "function", "function": {"name": name, "arguments": args}}
                        for name, args in self.calls
                    ],
                }
            )
            out += [{"role": "tool", "content": r} for r in self.results]
        out.append({"role": "assistant", "content": self.answer})
        return out


# ---------------------------------------------------------------- held-out split


@dataclass(frozen=True)
class Split:
    """2-digit operand pairs: add pairs are unordered (a <= b); sub pairs have a >= b."""

    held_add: frozenset[tuple[int, int]]
    held_sub: frozenset[tuple[int, int]]

    def add_is_held(self, a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in self.held_add

    def sub_is_held(self, a: int, b: int) -> bool:
        return (a, b) in self.held_sub

    def held_add_questions(self) -> list[tuple[int, int]]:
        """Both orders of every held-out addition pair."""
        out = set()
        for a, b in self.held_add:
            out.add((a, b))
            out.add((b, a))
        return sorted(out)

    def held_sub_questions(self) -> list[tuple[int, int]]:
        return sorted(self.held_sub)


def make_split(seed: int = SPLIT_SEED) -> Split:
    rng = random.Random(seed)
    two = range(10, 100)
    add_pairs = [(a, b) for a in two for b in two if a <= b]
    sub_pairs = [(a, b) for a in two for b in two if a >= b]
    forced_add = [(min(a, b), max(a, b)) for a, b in FORCED_HELD_OUT_ADD]
    return Split(
        held_out(rng, add_pairs, HELD_OUT_FRACTION, forced_add),
        held_out(rng, sub_pairs, HELD_OUT_FRACTION, FORCED_HELD_OUT_SUB),
    )


def held_out(
    rng: random.Random, items: Sequence, share: float, forced: Iterable, of: int | None = None
) -> frozenset:
    """`share` of `items` (of `of` items when given) drawn at random, and the `forced` ones."""
    count = round(share * (len(items) if of is None else of))
    return frozenset(rng.sample(items, count)) | frozenset(forced)


# ---------------------------------------------------------------- arithmetic

ADD_PHRASES = [
    "What is {a} + {b}?",
    "What is {a} + {b}?",
    "What's {a} + {b}?",
    "What is {a} plus {b}?",
    "Compute {a} + {b}.",
    "Calculate {a} + {b}.",
    "{a} + {b} = ?",
    "{a} + {b}?",
    "{a}+{b}",
    "How much is {a} + {b}?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Can you add {a} and {b}?",
    "And {a} + {b}?",
]
SUB_PHRASES = [
    "What is {a} - {b}?",
    "What is {a} - {b}?",
    "What's {a} - {b}?",
    "What is {a} minus {b}?",
    "Compute {a} - {b}.",
    "Calculate {a} - {b}.",
    "{a} - {b} = ?",
    "{a} - {b}?",
    "{a}-{b}",
    "How much is {a} - {b}?",
    "Subtract {b} from {a}.",
    "What is {a} take away {b}?",
    "What is the difference between {a} and {b}?",
    "And {a} - {b}?",
]


def add_answer(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}."


def sub_answer(a: int, b: int) -> str:
    return f"{a} - {b} = {a - b}."


def _digits(n: int, width: int) -> list[int]:
    """Least significant digit first, zero padded to width."""
    return [(n // 10**i) % 10 for i in range(width)]


def add_trace(a: int, b: int) -> str:
    """Column addition, ones first: one line "x + y + carry = sum" per column.

    The answer reads off the last line's sum, then the other lines' last digits upwards.
    """
    width = len(str(max(a, b)))
    da, db = _digits(a, width), _digits(b, width)
    lines, carry = [], 0
    for x, y in zip(da, db, strict=True):
        s = x + y + carry
        lines.append(f"{x} + {y} + {carry} = {s}")
        carry = s // 10
    return "\n".join(lines)


def sub_trace(a: int, b: int) -> str:
    """Column subtraction (a >= b), ones first: "x - y - borrow = d" per column, where x
    gains 10 (written "1x") when the column must borrow from the next one."""
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    lines, borrow = [], 0
    for x, y in zip(da, db, strict=True):
        top = x + 10 if x - y - borrow < 0 else x
        lines.append(f"{top} - {y} - {borrow} = {top - y - borrow}")
        borrow = int(top > x)
    return "\n".join(lines)


def case(rng: random.Random, text: str) -> str:
    """Users type sloppily: a lower-case first letter or a dropped final mark, now and then."""
    if rng.random() < 0.15 and text[:1].isalpha():
        text = text[0].lower() + text[1:]
    if rng.random() < 0.1 and text[-1:] in "?.":
        text = text[:-1]
    return text


def arith_turn(rng: random.Random, op: str, a: int, b: int) -> Turn:
    """Answered directly when thinking is off; in thinking mode after a column trace that
    restates the problem first (its digits then sit at fixed distances from the operands,
    whatever the question's wording)."""
    question = rng.choice(ADD_PHRASES if op == "+" else SUB_PHRASES).format(a=a, b=b)
    answer = add_answer(a, b) if op == "+" else sub_answer(a, b)
    trace = add_trace(a, b) if op == "+" else sub_trace(a, b)
    digits = len(str(max(a, b)))
    task = f"{'add' if op == '+' else 'sub'}{digits}"
    result = str(a + b if op == "+" else a - b)
    return Turn(case(rng, question), answer, f"{a} {op} {b}\n{trace}\n", task, expect=[result])


def sample_pair(rng: random.Random, op: str, digits: int, split: Split, held: bool):
    """A (a, b) pair; 2-digit pairs come from the training or the held-out side of the split."""
    if digits == 1:  # at least one single-digit operand
        lo_a, lo_b = (0, 0) if rng.random() < 0.5 else (0, 10)
        a, b = rng.randint(lo_a, 9), rng.randint(lo_b, 99)
        if rng.random() < 0.5:
            a, b = b, a
    elif digits == 2:
        if held:
            pairs = split.held_add_questions() if op == "+" else split.held_sub_questions()
            return rng.choice(pairs)
        while True:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if op == "-" and a < b:
                a, b = b, a
            held_pair = split.add_is_held(a, b) if op == "+" else split.sub_is_held(a, b)
            if not held_pair:
                return a, b
    else:
        a, b = rng.randint(100, 999), rng.randint(10 if rng.random() < 0.3 else 100, 999)
        if rng.random() < 0.5:
            a, b = b, a
    if op == "-" and a < b:
        a, b = b, a
    return a, b


# ---------------------------------------------------------------- counting, spelling

WORDS = (
    "cat dog sun moon star tree book fish bird frog milk rain snow wind fire ship boat "
    "car bus road door lamp desk cup tea salt rice bread cake apple lemon grape melon "
    "plum pear house mouse horse sheep goat duck lion tiger zebra panda koala otter "
    "river ocean lake hill stone sand cloud storm light night day week year time "
    "green blue red pink black white gold silver paper pencil chair table clock phone "
    "music song dance smile happy quick slow brave calm quiet loud small large sweet "
    "water earth robot model token layer expert cache latent deep seek metal "
    "hello world python magic piano guitar violin drum bell candy honey pizza pasta "
    "train plane rocket planet comet orbit laser pixel"
).split()

BACKWARD_PHRASES = [
    "Spell {w} backwards.",
    "Spell '{w}' backwards.",
    "Write {w} backwards.",
    "Reverse the word {w}.",
    "What is {w} spelled backwards?",
    "How do you spell {w} backwards?",
    "Can you spell {w} in reverse?",
]


def backwards_turn(rng: random.Random) -> Turn:
    w = rng.choice(WORDS)
    q = case(rng, rng.choice(BACKWARD_PHRASES).format(w=w))
    reasoning = f"{w}: {' '.join(w)}\nreversed: {' '.join(w[::-1])}\n"
    return Turn(q, f"{w} backwards is {w[::-1]}.", reasoning, "backwards", expect=[w[::-1]])


ECHO_PHRASES = [
    "Repeat after me: {t}",
    "Say this back to me: {t}",
    "Repeat: {t}",
    "Echo this: {t}",
    "Please repeat exactly: {t}",
    "Copy this: {t}",
]


def echo_turn(rng: random.Random, text: str) -> Turn:
    """The user's text back, exactly: a copy of tokens the model may never have seen in that
    order, the skill that a held-out name in a call and a held-out result in an answer need."""
    q = case(rng, rng.choice(ECHO_PHRASES).format(t=text))
    return Turn(q, text, "I repeat the text exactly.\n", "echo", expect=[text])


def count_turn(rng: random.Random) -> Turn:
    r = rng.random()
    if r < 0.35:
        n = rng.randint(2, 15)
        q = rng.choice(["Count to {n}.", "Count from 1 to {n}.", "Can you count to {n}?"])
        a, b, seq = 1, n, list(range(1, n + 1))
        q = q.format(n=n)
    elif r < 0.8:
        a = rng.randint(0, 90)
        b = a + rng.randint(1, 12)
        q = rng.choice(["Count from {a} to {b}.", "List the numbers from {a} to {b}."])
        q = q.format(a=a, b=b)
        seq = list(range(a, b + 1))
    else:
        b = rng.randint(0, 90)
        a = b + rng.randint(1, 12)
        q = f"Count down from {a} to {b}."
        seq = list(range(a, b - 1, -1))
    step = "up" if a <= b else "down"
    text = ", ".join(map(str, seq)) + "."
    return Turn(case(rng, q), text, f"From {a} {step} to {b}.\n", "count", expect=[text])
