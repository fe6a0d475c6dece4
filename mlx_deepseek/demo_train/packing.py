"""Conversations -> the text chat_format renders -> training rows (token ids + loss mask).

A row is one conversation rendered by mlx_deepseek.formats' V3.1 format, exactly as the
chat and the server render it (`chat_format(...).render(messages, tools=...)`): the system
prompt with the tools block, then `<｜User｜>u<｜Assistant｜></think>a<eos>` per turn, tool
calls and `<｜tool▁output▁begin｜>result<｜tool▁output▁end｜>` in between. What is learnt is
what the model writes at each point where it is asked to generate:

- after `<｜Assistant｜></think>` (the thinking-off prompt, which is also how every past
  answer is written): the answer or the tool-call block, through `<eos>`;
- after the last `<｜tool▁output▁end｜>` of a tool round (the template opens no new turn
  there): the answer from the results, through `<eos>`;
- for a conversation whose last turn is in thinking mode: that turn's prompt is rendered
  with thinking on (it ends `<｜Assistant｜><think>`) and the model writes its reasoning,
  `</think>`, then the answer or the tool-call block (a tool round in thinking mode ends the
  row: the next prompt is rendered with the reasoning dropped).

tests/test_demo_data.py checks these spans against rendering every prefix of the
conversation with add_generation_prompt, as the server does at each step.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import numpy as np
from tokenizers import Tokenizer

from mlx_deepseek.formats import chat_format

from .arch import ARCHS
from .data import make_split
from .dialogues import NO_DRILLS, Conversation, Drills, TurnSampler, sample_conversation
from .tokenizer import ASSISTANT, END_THINK, EOS, PAD, THINK, USER
from .tools import make_tool_split

OFF_PROMPT = ASSISTANT + END_THINK
ON_PROMPT = ASSISTANT + THINK
_OUTPUT_END = "<｜tool▁output▁end｜>"
_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
# learnt: after an answer's prompt (V4 with tools declared opens every turn in thinking
# mode), or after a tool round's last output (V3.1), through <eos>
_LEARNT = re.compile(
    f"(?:{re.escape(OFF_PROMPT)}|{re.escape(ON_PROMPT)}"
    f"|{re.escape(_OUTPUT_END)}(?!{re.escape(_OUTPUT_BEGIN)}))"
    f"(.*?{re.escape(EOS)})",
    re.S,
)

Segments = list[tuple[str, bool]]  # (text, learnt)


def learnt_spans(text: str) -> Segments:
    """A rendered conversation cut into (text, learnt) pieces."""
    out: Segments = []
    pos = 0
    for m in _LEARNT.finditer(text):
        out.append((text[pos : m.start(1)], False))
        out.append((m.group(1), True))
        pos = m.end(1)
    if pos < len(text):
        out.append((text[pos:], False))
    return [(t, learn) for t, learn in out if t]


class Renderer:
    """Samples conversations and renders them with the demo's own chat format (V3.1's, or
    V4's for arch "v4")."""

    def __init__(
        self,
        held: bool = False,
        arch: str = "v3",
        boost: dict | None = None,
        drills: Drills = NO_DRILLS,
    ):
        a = ARCHS[arch]
        self.arch = a
        self.tokenizer = a.template_tokenizer()
        self.fmt = chat_format(self.tokenizer, a.config, a.package)
        if self.fmt.family != a.family or not self.fmt.has_thinking_switch:
            raise RuntimeError(f"the demo template reads as {self.fmt.family}, not {a.family}")
        self.sampler = TurnSampler(make_split(), make_tool_split(), held, arch, boost, drills)

    def sample(self, rng: random.Random, max_chars: int, **kw) -> Conversation:
        return sample_conversation(rng, self.sampler, max_chars, **kw)

    def render(self, conv: Conversation, messages: list, generation: bool, thinking: bool) -> str:
        return self.fmt.render(self.tokenizer, messages, generation, thinking, conv.tools)

    def segments(self, conv: Conversation) -> Segments:
        messages = conv.messages()
        if not conv.thinking:
            return learnt_spans(self.render(conv, messages, False, False))
        last = conv.turns[-1].messages()
        head = messages[: len(messages) - len(last) + 1]  # through the last user message
        if self.arch.name == "v4":
            # V4 renders the reasoning itself (and, with tools declared, every turn in
            # thinking mode): the row ends after the last turn's first answer or call block
            answer = {**last[1], "reasoning_content": conv.turns[-1].reasoning}
            return learnt_spans(self.render(conv, head + [answer], False, True))
        prompt = self.render(conv, head, True, True)
        # the last turn's first answer (or call block) as the template writes it
        written = self.render(conv, head + [last[1]], False, False)
        cut = written.rindex(OFF_PROMPT)
        if prompt != written[:cut] + ON_PROMPT:
            raise RuntimeError("the thinking prompt does not extend the rendered history")
        body = written[cut + len(OFF_PROMPT) :]
        return [*learnt_spans(prompt), (conv.turns[-1].reasoning + END_THINK + body, True)]


class Packer:
    """Rendered conversations -> padded rows of token ids and a mask of the learnt tokens."""

    def __init__(self, tok: Tokenizer, renderer: Renderer | None = None):
        self.tok = tok
        self.renderer = renderer or Renderer()
        self.pad, self.user = tok.token_to_id(PAD), tok.token_to_id(USER)
        self.chars_per_token = 2.6

    def encode(self, segments: Segments) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for text, learn in segments:
            piece = self.tok.encode(text, add_special_tokens=False).ids
            ids += piece
            mask += [int(learn)] * len(piece)
        return ids, mask

    def conversation(
        self,
        rng: random.Random,
        length: int,
        allow_tools: bool = True,
        thinking=None,
        tool_focus: bool = False,
    ) -> tuple[Conversation, list[int], list[int]]:
        """A conversation of as many turns as fit in `length` tokens, and its ids and mask
        (tool_focus: dialogues.sample_conversation's)."""
        budget = int(length * self.chars_per_token)
        conv = self.renderer.sample(
            rng, budget, allow_tools=allow_tools, thinking=thinking, tool_focus=tool_focus
        )
        while True:
            ids, mask = self.encode(self.renderer.segments(conv))
            if len(ids) <= length:
                return conv, ids, mask
            starts = [i for i, t in enumerate(ids) if t == self.user] + [len(ids)]
            # the turns that end well inside the row (room for a last turn's reasoning)
            fit = sum(1 for end in starts[1:] if end <= length - 48)
            # (V4's tool results open user turns too: always drop at least one turn)
            fit = min(fit, len(conv.turns) - 1)
            if fit == 0:  # one turn is already too long here (the tools block, say)
                conv = self.renderer.sample(rng, budget, allow_tools=False, thinking=thinking)
            else:
                conv.turns = conv.turns[:fit]

    def row(
        self, rng: random.Random, length: int, allow_tools: bool = True, tool_focus: bool = False
    ):
        """One padded row: (ids [length] int32, mask [length] float32)."""
        _, ids, mask = self.conversation(rng, length, allow_tools, tool_focus=tool_focus)
        pad = length - len(ids)
        return (
            np.array(ids + [self.pad] * pad, dtype=np.int32),
            np.array(mask + [0] * pad, dtype=np.float32),
        )

    def batch(
        self,
        rng: random.Random,
        size: int,
        length: int,
        allow_tools: bool = True,
        tool_focus: bool = False,
    ):
        rows = [self.row(rng, length, allow_tools, tool_focus) for _ in range(size)]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def corpus(n: int = 3000, seed: int = 7, arch: str = "v3") -> Iterator[str]:
    """Rendered training conversations with the markers cut out (the BPE merges' texts)."""
    renderer = Renderer(arch=arch)
    rng = random.Random(seed)
    split_on = re.compile("|".join(re.escape(m) for m in renderer.arch.markers))
    for _ in range(n):
        conv = renderer.sample(rng, rng.choice([400, 1200, 2400]))
        for text, _ in renderer.segments(conv):
            yield from (p for p in split_on.split(text) if p)
