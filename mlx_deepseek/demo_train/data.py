"""Chat dialogues the demo model can truly learn, with a held-out arithmetic split.

Every dialogue is a list of ``{"role": ..., "content": ...}`` messages (user, assistant, ...).
Tasks: addition and subtraction (single-digit ones answered directly, 2- and 3-digit ones
after a short ``<think>`` column-arithmetic trace), counting, spelling a word backwards,
facts about the model itself, greetings, and a polite refusal for anything else.

The held-out split: 10% of the 2-digit addition pairs (as unordered pairs, so neither
``a + b`` nor ``b + a`` is ever trained) and 10% of the 2-digit subtraction pairs never
appear in any training dialogue. "23 + 45" and "71 - 38" are forced into it, so the
README's example questions show generalisation, not recall.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from .config import CONFIG, count_parameters

REAL_MODEL = "deepseek-ai/DeepSeek-V2-Lite-Chat"
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 1234
FORCED_HELD_OUT_ADD = [(23, 45)]
FORCED_HELD_OUT_SUB = [(71, 38)]

Message = dict[str, str]
Dialogue = list[Message]


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
    held_add = set(rng.sample(add_pairs, round(HELD_OUT_FRACTION * len(add_pairs))))
    held_sub = set(rng.sample(sub_pairs, round(HELD_OUT_FRACTION * len(sub_pairs))))
    held_add.update((min(a, b), max(a, b)) for a, b in FORCED_HELD_OUT_ADD)
    held_sub.update(FORCED_HELD_OUT_SUB)
    return Split(frozenset(held_add), frozenset(held_sub))


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
]
STEP_PREFIXES = [
    "Think step by step: ",
    "Show your work: ",
    "Work it out step by step: ",
    "Quick question: ",
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


def think(trace: str, answer: str) -> str:
    # R1's layout: the trace, then a blank line, then the answer.
    return f"<think>\n{trace}\n</think>\n\n{answer}"


def _case(rng: random.Random, text: str) -> str:
    # Users type sloppily: lower-case first letter or a dropped final punctuation, now and then.
    if rng.random() < 0.15 and text[:1].isalpha():
        text = text[0].lower() + text[1:]
    if rng.random() < 0.1 and text[-1:] in "?.":
        text = text[:-1]
    return text


def arith_turn(rng: random.Random, op: str, a: int, b: int) -> tuple[str, str]:
    """Single-digit sums are answered directly; larger ones after a column-arithmetic trace."""
    question = rng.choice(ADD_PHRASES if op == "+" else SUB_PHRASES).format(a=a, b=b)
    if rng.random() < 0.05:
        question = rng.choice(STEP_PREFIXES) + question[0].lower() + question[1:]
    answer = add_answer(a, b) if op == "+" else sub_answer(a, b)
    if max(a, b) < 10:
        return _case(rng, question), answer
    # The trace restates the problem first: its column digits then sit at fixed distances
    # from the restated operands, whatever the question's wording.
    trace = add_trace(a, b) if op == "+" else sub_trace(a, b)
    return _case(rng, question), think(f"{a} {op} {b}\n{trace}", answer)


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


# ---------------------------------------------------------------- other tasks

WORDS = (
    "cat dog sun moon star tree book fish bird frog milk rain snow wind fire ship boat "
    "car bus road door lamp desk cup tea salt rice bread cake apple lemon grape melon "
    "plum pear house mouse horse sheep goat duck lion tiger zebra panda koala otter "
    "river ocean lake hill stone sand cloud storm light night day week year time "
    "green blue red pink black white gold silver paper pencil chair table clock phone "
    "music song dance smile happy quick slow brave calm quiet loud small large sweet "
    "water earth robot model token layer expert cache latent deep seek metal apple "
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


def backwards_turn(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return _case(rng, rng.choice(BACKWARD_PHRASES).format(w=w)), f"{w} backwards is {w[::-1]}."


def count_turn(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.35:
        n = rng.randint(2, 15)
        q = rng.choice(["Count to {n}.", "Count from 1 to {n}.", "Can you count to {n}?"])
        seq = list(range(1, n + 1))
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
    return _case(rng, q), ", ".join(map(str, seq)) + "."


def _facts() -> list[tuple[list[str], list[str]]]:
    c = CONFIG
    total, mtp, active = count_parameters(c)
    layers, experts = c["num_hidden_layers"], c["n_routed_experts"]
    k, rank = c["num_experts_per_tok"], c["kv_lora_rank"]
    millions = f"{(total + mtp) / 1e6:.1f} million"
    intro = (
        "I am a tiny demo model with the DeepSeek-V3 architecture, trained from scratch "
        "on two CPU cores for the mlx-deepseek project. I can add and subtract numbers, "
        "count, and spell short words backwards. To chat with a real DeepSeek model, run: "
        f"mlx-deepseek chat {REAL_MODEL}"
    )
    arch = (
        f"I follow DeepSeek-V3: {layers} layers (the first dense, the others "
        f"mixture-of-experts), multi-head latent attention with a {rank}-wide latent cache, "
        f"{experts} routed experts with {k} active per token plus 1 shared expert, "
        "and a multi-token prediction module."
    )
    return [
        (
            [
                "What are you?",
                "Who are you?",
                "Tell me about yourself.",
                "What is your name?",
                "Introduce yourself.",
                "Are you DeepSeek?",
                "Are you a real DeepSeek model?",
                "What kind of model are you?",
            ],
            [intro],
        ),
        (
            [
                "What architecture do you use?",
                "Describe your architecture.",
                "How are you built?",
                "What is your architecture?",
                "How many layers do you have?",
            ],
            [arch],
        ),
        (
            [
                "How many experts do you have?",
                "Are you a mixture of experts?",
                "How does your routing work?",
                "What is noaux_tc?",
            ],
            [
                f"Each of my MoE layers has {experts} routed experts and 1 shared expert. "
                f"Every token picks {k} routed experts by sigmoid score, from the best "
                f"{c['topk_group']} of {c['n_group']} expert groups, and a bias balances "
                "the load without an auxiliary loss."
            ],
        ),
        (
            [
                "How many parameters do you have?",
                "How big are you?",
                "What is your size?",
            ],
            [
                f"About {millions} parameters, of which about {active / 1e6:.1f} million are "
                "active for each token. Real DeepSeek-V3 has 671 billion."
            ],
        ),
        (
            [
                "What is MLA?",
                "What attention do you use?",
                "What is multi-head latent attention?",
            ],
            [
                "Multi-head latent attention compresses keys and values into one small latent "
                f"vector per token ({rank} numbers for me), so the cache stays small."
            ],
        ),
        (
            [
                "What is MTP?",
                "What is multi-token prediction?",
                "Can you predict two tokens at once?",
            ],
            [
                "My multi-token prediction module guesses the token after the next one. "
                "mlx-deepseek can use it to draft tokens for speculative decoding."
            ],
        ),
        (
            [
                "How do I run a real model?",
                "How do I run a real DeepSeek model?",
                "Can I use a bigger model?",
                "How do I chat with DeepSeek?",
            ],
            [
                f"Run: mlx-deepseek chat {REAL_MODEL} (or any DeepSeek repo id or local "
                "folder). Convert a checkpoint first with mlx-deepseek convert."
            ],
        ),
        (
            ["What can you do?", "Help", "help", "What do you know?", "What should I ask?"],
            [
                "I can add and subtract numbers, count, and spell short words backwards. "
                "Try: What is 23 + 45?"
            ],
        ),
        (
            ["Who made you?", "Who trained you?", "Where do you come from?"],
            [
                "The mlx-deepseek project trained me with its demo script on two CPU cores. "
                "I am not made by DeepSeek; I only share the DeepSeek-V3 architecture."
            ],
        ),
    ]


FACTS = _facts()

GREETINGS = [
    (
        ["Hello", "Hello!", "Hi", "Hi!", "Hey", "Hey there!", "Good morning!", "Good evening!"],
        [
            "Hello! I am the mlx-deepseek demo model. Ask me to add, subtract, count or "
            "spell a word backwards.",
            "Hi! I am a tiny DeepSeek-V3-style demo model. Try: What is 23 + 45?",
        ],
    ),
    (
        ["How are you?", "How are you doing?"],
        ["I am fine, thank you! Ask me an arithmetic question."],
    ),
    (
        ["Thanks!", "Thank you", "Thank you!", "Thanks a lot.", "Great, thanks."],
        ["You are welcome!", "Happy to help!"],
    ),
    (["Bye", "Goodbye!", "See you later."], ["Goodbye!"]),
]

OFF_TOPIC = [
    "What is the capital of France?",
    "Write a poem about the sea.",
    "What is the weather today?",
    "Who won the world cup?",
    "Tell me a joke.",
    "Translate hello into French.",
    "What is the meaning of life?",
    "Write a Python function to sort a list.",
    "What is 7 times 8?",
    "What is 12 * 3?",
    "Divide 100 by 4.",
    "What is the square root of 81?",
    "Who is the president?",
    "Explain quantum physics.",
    "What time is it?",
    "Recommend a good book.",
    "What is your favourite colour?",
    "Do you like music?",
    "How tall is Mount Everest?",
    "What day is it today?",
]
REFUSAL = (
    "Sorry, I am a tiny demo model: I only know addition and subtraction, counting, "
    f"spelling words backwards and facts about myself. For real answers run: "
    f"mlx-deepseek chat {REAL_MODEL}"
)


def _pick(rng: random.Random, table: list[tuple[list[str], list[str]]]) -> tuple[str, str]:
    questions, answers = rng.choice(table)
    return _case(rng, rng.choice(questions)), rng.choice(answers)


# ---------------------------------------------------------------- dialogues

# (task, weight): 2-digit arithmetic dominates because it is the measured target.
TASKS = [
    ("add2", 0.22),
    ("sub2", 0.22),
    ("add1", 0.06),
    ("sub1", 0.06),
    ("arith3", 0.16),
    ("count", 0.10),
    ("backwards", 0.06),
    ("facts", 0.05),
    ("greet", 0.04),
    ("other", 0.03),
]


def sample_turn(rng: random.Random, split: Split, held: bool = False) -> tuple[str, str]:
    """One (user, assistant) exchange; held=True draws 2-digit pairs from the held-out side."""
    task = rng.choices([t for t, _ in TASKS], weights=[w for _, w in TASKS])[0]
    if task in ("add2", "sub2", "add1", "sub1", "arith3"):
        op = "+" if task.startswith("add") or (task == "arith3" and rng.random() < 0.5) else "-"
        digits = {"add2": 2, "sub2": 2, "add1": 1, "sub1": 1, "arith3": 3}[task]
        a, b = sample_pair(rng, op, digits, split, held)
        return arith_turn(rng, op, a, b)
    if task == "count":
        return count_turn(rng)
    if task == "backwards":
        return backwards_turn(rng)
    if task == "facts":
        return _pick(rng, FACTS)
    if task == "greet":
        return _pick(rng, GREETINGS)
    return _case(rng, rng.choice(OFF_TOPIC)), REFUSAL


def sample_dialogue(rng: random.Random, split: Split, held: bool = False) -> Dialogue:
    """1-4 user/assistant exchanges (mostly 1-2)."""
    turns = rng.choices([1, 2, 3, 4], weights=[0.45, 0.3, 0.15, 0.1])[0]
    msgs: Dialogue = []
    for _ in range(turns):
        user, assistant = sample_turn(rng, split, held)
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def dialogues(seed: int, split: Split, held: bool = False) -> Iterator[Dialogue]:
    """An endless, reproducible stream of dialogues."""
    rng = random.Random(seed)
    while True:
        yield sample_dialogue(rng, split, held)


def corpus_for_tokenizer(n: int = 20000, seed: int = 7) -> Iterator[str]:
    """Plain texts (questions and answers) to train the BPE merges on."""
    split = make_split()
    rng = random.Random(seed)
    for _ in range(n):
        user, assistant = sample_turn(rng, split)
        yield user
        yield assistant
    for table in (FACTS, GREETINGS):
        for questions, answers in table:
            yield from questions
            yield from answers
    yield from OFF_TOPIC
    yield REFUSAL
