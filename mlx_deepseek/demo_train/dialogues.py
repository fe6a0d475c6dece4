"""Whole conversations: an optional system prompt, the tools it declares, many turns, and
whether the last turn is answered in thinking mode.

DeepSeek V3.1's template writes every past answer as `<｜Assistant｜></think>answer`, which
is exactly what the model writes with thinking off; so every turn of a conversation is a
thinking-off example, and only its LAST turn can be one in thinking mode (`<think>`, the
reasoning, `</think>`, the answer).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .data import Split, Turn, arith_turn, backwards_turn, count_turn, echo_turn, sample_pair
from .facts import TABLES, facts_turn, greeting_turn, refusal_turn
from .tools import (
    DEFINITIONS,
    FUNCTION_WORDS,
    TASK_TOOL,
    ToolSplit,
    add_tool_turn,
    banned_words,
    echo_text,
    everyday_words,
    lookup_turn,
    made_up,
    made_up_meaning,
    phrase_text,
    punctuate,
    spliced_text,
    token_text,
    tools_subset,
    weather_turn,
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are the mlx-deepseek demo model.",
    "Answer briefly.",
    "Be concise and accurate.",
]

# (task, weight with tools declared, weight without). 2-digit arithmetic dominates: it is
# the measured target; the tool tasks are rarer without tools (they only teach refusing).
# "echo" (repeat the user's text) drills copying, which calls with held-out names and
# answers from held-out results need.
TASKS: list[tuple[str, float, float]] = [
    ("add2", 0.19, 0.23),
    ("sub2", 0.19, 0.23),
    ("arith1", 0.05, 0.06),
    ("arith3", 0.06, 0.08),
    ("count", 0.04, 0.07),
    ("backwards", 0.05, 0.07),
    ("echo", 0.04, 0.04),
    ("facts", 0.05, 0.07),
    ("greet", 0.03, 0.05),
    ("refuse", 0.03, 0.04),
    ("weather", 0.12, 0.02),
    ("lookup", 0.09, 0.02),
    ("add_tool", 0.06, 0.02),
]
# On the training side, this share of the weather and lookup questions name a made-up city
# or word (tools.made_up), so that calls copy names rather than recall them.
MADE_UP_SHARE = 0.4
# Tool-focused conversations (the recipe's third stage, train.py --tool-focus): tools are
# always declared and these shares of the turns need one; the other tasks share the rest in
# their usual proportions. The first two stages saw ~0.4 tool calls per 1,024-token step,
# too few for the model to learn to copy a name from the question into the call.
FOCUS_TASKS = {"weather": 0.3, "lookup": 0.22, "add_tool": 0.12}
# In tool-focused rows, a tool task whose tool the row does not declare (a refusal) keeps
# this share of its weight: with one tool declared, most tool turns then call it. (At full
# weight, two of a one-tool row's three tool tasks refused, and the model learnt to refuse
# when the list is short: 12 of 12 missing calls at stage 3e had one tool declared.)
UNDECLARED_FOCUS = 0.1
# This share of the made-up words' meanings are made up too (tools.made_up_meaning), so
# that an answer quotes the result instead of recalling a trained definition: a held-out
# word's definition (never trained) can only be copied.
MADE_UP_MEANING_SHARE = 0.75


@dataclass(frozen=True)
class Drills:
    """The copying drills (train.py --splice, --token-text, --phrase, --punct): the shares of
    the echo texts and made-up words' meanings that TurnSampler._drill_text draws from each
    kind. Every share at 0 draws exactly what the sampler drew before that option existed."""

    splice: float = 0.0  # spliced words (tools.spliced_text)
    token_share: float = 0.0  # random vocabulary pieces (tools.token_text), from `pieces`
    pieces: tuple[str, ...] = ()  # the tokenizer's word pieces (tools.vocab_pieces)
    phrase: float = 0.0  # short words in random order (tools.phrase_text)
    punct: float = 0.0  # of all those texts, the share punctuated (tools.punctuate)


NO_DRILLS = Drills()  # every share 0: the data as drawn before any drill option existed


@dataclass
class Conversation:
    turns: list[Turn]
    tools: list[dict[str, Any]] | None = None
    system: str | None = None
    thinking: bool = False  # the last turn is answered in thinking mode
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m for t in self.turns for m in t.messages()]

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools or []]


class TurnSampler:
    """Draws exchanges from the training side of the splits, or (held=True) from the held-out
    side: held-out 2-digit pairs, cities and words. `arch`: whose facts the model tells."""

    def __init__(
        self,
        split: Split,
        tool_split: ToolSplit,
        held: bool = False,
        arch: str = "v3",
        boost: dict[str, float] | None = None,
        drills: Drills = NO_DRILLS,
    ):
        self.split, self.held = split, held
        self.boost = boost or {}  # task -> weight multiplier (train.py --boost)
        self.drills = drills
        if drills.token_share and not drills.pieces:
            raise ValueError("token_share needs the tokenizer's pieces (tools.vocab_pieces)")
        self.facts, self.greetings = TABLES[arch]
        self.cities = tool_split.cities(held)
        self.words = tool_split.words(held)
        # made-up words mean what a training word means (never a held-out word's meaning)
        self.meanings = [DEFINITIONS[w] for w in tool_split.words(False)]
        self.meaning_words = sorted({w.strip(",;") for m in self.meanings for w in m.split()})
        self.held_meanings = {DEFINITIONS[w] for w in tool_split.words(True)}
        # the copying drills' everyday words: none of a held-out meaning, word or city
        held_text = self.held_meanings | tool_split.held_words | tool_split.held_cities
        self.everyday = everyday_words(held_text)
        self.banned = banned_words(held_text)
        self.splice_words = self.meaning_words + self.everyday  # spliced words' sources
        self.function_words = [w for w in FUNCTION_WORDS if w in self.meaning_words]
        self.train_cities = tool_split.cities(False)  # echo's, even in a held-out sampler

    def _spliced(self, rng: random.Random) -> str:
        return spliced_text(rng, self.splice_words, self.banned, self.held_meanings)

    def _drill_text(self, rng: random.Random) -> str | None:
        """An echo text or made-up meaning of spliced words (a `splice` share), of random
        vocabulary pieces (a `token_share` share of the rest) or of short words in random
        order (a `phrase` share of what is left), a `punct` share of them punctuated; or None
        for the usual kinds."""
        d = self.drills
        if d.splice and rng.random() < d.splice:
            text = self._spliced(rng)
        elif d.token_share and rng.random() < d.token_share:
            text = token_text(rng, d.pieces, self.banned, self.held_meanings)
        elif d.phrase and rng.random() < d.phrase:
            text = phrase_text(rng, self.function_words, self.splice_words, self.held_meanings)
        else:
            return None
        if d.punct and rng.random() < d.punct:
            text = punctuate(rng, text, self.held_meanings)
        return text

    def task(self, rng: random.Random, names: list[str], focus: bool = False) -> str:
        tasks = [t for t, _, _ in TASKS]
        weights = [
            (w_tools if names else w_plain) * self.boost.get(t, 1.0)
            for t, w_tools, w_plain in TASKS
        ]
        if focus and names:
            rest = sum(w for t, w in zip(tasks, weights, strict=True) if t not in FOCUS_TASKS)
            scale = (1 - sum(FOCUS_TASKS.values())) / rest
            weights = [
                FOCUS_TASKS[t]
                * (1 if TASK_TOOL[t] in names else UNDECLARED_FOCUS)
                * self.boost.get(t, 1.0)
                if t in FOCUS_TASKS
                else w * scale
                for t, w in zip(tasks, weights, strict=True)
            ]
        return rng.choices(tasks, weights=weights)[0]

    def turn(
        self, rng: random.Random, names: list[str], task: str | None = None, focus: bool = False
    ) -> Turn:
        task = task or self.task(rng, names, focus)
        if task in ("add2", "sub2", "arith1", "arith3"):
            op = {"add2": "+", "sub2": "-"}.get(task) or rng.choice("+-")
            digits = {"add2": 2, "sub2": 2, "arith1": 1, "arith3": 3}[task]
            a, b = sample_pair(rng, op, digits, self.split, self.held)
            return arith_turn(rng, op, a, b)
        made = not self.held and rng.random() < MADE_UP_SHARE
        if task == "weather":
            cities = [made_up(rng, True) for _ in range(2)] if made else self.cities
            return weather_turn(rng, names, cities)
        if task == "lookup":
            if made:
                word = made_up(rng, False)
                meaning = self._drill_text(rng)
                if meaning is None:
                    meaning = (
                        made_up_meaning(rng, self.meaning_words, self.held_meanings, self.everyday)
                        if rng.random() < MADE_UP_MEANING_SHARE
                        else rng.choice(self.meanings)
                    )
                return lookup_turn(rng, names, [word], {word: meaning})
            return lookup_turn(rng, names, self.words)
        if task == "add_tool":
            return add_tool_turn(rng, names)
        if task == "echo":
            if (drill := self._drill_text(rng)) is not None:
                return echo_turn(rng, drill)
            text = echo_text(
                rng, self.train_cities, self.meaning_words, self.held_meanings, self.everyday
            )
            return echo_turn(rng, text)
        if task == "facts":
            return facts_turn(rng, self.facts)
        if task == "greet":
            return greeting_turn(rng, self.greetings)
        return {
            "count": count_turn,
            "backwards": backwards_turn,
            "refuse": refusal_turn,
        }[task](rng)


def parse_boost(text: str) -> dict[str, float]:
    """train.py --boost "sub2=2,add2=1.5" -> {"sub2": 2.0, "add2": 1.5} (task weight factors)."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        task, _, factor = item.partition("=")
        if task not in {t for t, _, _ in TASKS} or not factor:
            known = ", ".join(t for t, _, _ in TASKS)
            raise ValueError(f"--boost {item!r}: write TASK=FACTOR with TASK one of {known}")
        out[task] = float(factor)
    return out


def sample_conversation(
    rng: random.Random,
    sampler: TurnSampler,
    max_chars: int,
    allow_tools: bool = True,
    thinking: bool | None = None,
    tool_focus: bool = False,
) -> Conversation:
    """Turns until about `max_chars` characters of user and assistant text (at least one).
    thinking None: the last turn is in thinking mode half of the time. tool_focus: tools
    declared (all of them where the usual draw declares none) and most turns need one
    (FOCUS_TASKS)."""
    tools = tools_subset(rng, tool_focus) if allow_tools or tool_focus else None
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.2 else None
    conv = Conversation([], tools, system, rng.random() < 0.5 if thinking is None else thinking)
    used = 0
    while not conv.turns or used < max_chars:
        t = sampler.turn(rng, conv.tool_names, focus=tool_focus)
        conv.turns.append(t)
        used += len(t.user) + len(t.answer) + sum(len(r) + 40 for r in t.results) + 24
    return conv
