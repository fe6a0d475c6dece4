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

from .data import Split, Turn, arith_turn, backwards_turn, count_turn, sample_pair
from .facts import facts_turn, greeting_turn, refusal_turn
from .tools import ToolSplit, add_tool_turn, lookup_turn, tools_subset, weather_turn

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are the mlx-deepseek demo model.",
    "Answer briefly.",
    "Be concise and accurate.",
]

# (task, weight with tools declared, weight without). 2-digit arithmetic dominates: it is
# the measured target; the tool tasks are rarer without tools (they only teach refusing).
TASKS: list[tuple[str, float, float]] = [
    ("add2", 0.19, 0.23),
    ("sub2", 0.19, 0.23),
    ("arith1", 0.05, 0.06),
    ("arith3", 0.08, 0.10),
    ("count", 0.06, 0.08),
    ("backwards", 0.06, 0.07),
    ("facts", 0.06, 0.08),
    ("greet", 0.04, 0.05),
    ("refuse", 0.03, 0.04),
    ("weather", 0.12, 0.02),
    ("lookup", 0.07, 0.02),
    ("add_tool", 0.05, 0.02),
]


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
    side: held-out 2-digit pairs, cities and words."""

    def __init__(self, split: Split, tool_split: ToolSplit, held: bool = False):
        self.split, self.held = split, held
        self.cities = tool_split.cities(held)
        self.words = tool_split.words(held)

    def task(self, rng: random.Random, names: list[str]) -> str:
        weights = [w_tools if names else w_plain for _, w_tools, w_plain in TASKS]
        return rng.choices([t for t, _, _ in TASKS], weights=weights)[0]

    def turn(self, rng: random.Random, names: list[str], task: str | None = None) -> Turn:
        task = task or self.task(rng, names)
        if task in ("add2", "sub2", "arith1", "arith3"):
            op = {"add2": "+", "sub2": "-"}.get(task) or rng.choice("+-")
            digits = {"add2": 2, "sub2": 2, "arith1": 1, "arith3": 3}[task]
            a, b = sample_pair(rng, op, digits, self.split, self.held)
            return arith_turn(rng, op, a, b)
        if task == "weather":
            return weather_turn(rng, names, self.cities)
        if task == "lookup":
            return lookup_turn(rng, names, self.words)
        if task == "add_tool":
            return add_tool_turn(rng, names)
        return {
            "count": count_turn,
            "backwards": backwards_turn,
            "facts": facts_turn,
            "greet": greeting_turn,
            "refuse": refusal_turn,
        }[task](rng)


def sample_conversation(
    rng: random.Random,
    sampler: TurnSampler,
    max_chars: int,
    allow_tools: bool = True,
    thinking: bool | None = None,
) -> Conversation:
    """Turns until about `max_chars` characters of user and assistant text (at least one).
    thinking None: the last turn is in thinking mode half of the time."""
    tools = tools_subset(rng) if allow_tools else None
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.2 else None
    conv = Conversation([], tools, system, rng.random() < 0.5 if thinking is None else thinking)
    used = 0
    while not conv.turns or used < max_chars:
        t = sampler.turn(rng, conv.tool_names)
        conv.turns.append(t)
        used += len(t.user) + len(t.answer) + sum(len(r) + 40 for r in t.results) + 24
    return conv
