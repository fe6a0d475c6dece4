"""Dialogues -> fixed-length training rows (token ids + a mask of the tokens to learn).

A row is one conversation rendered exactly as the chat template renders it:
``<bos><｜User｜>u1<｜Assistant｜>a1<eos><｜User｜>u2<｜Assistant｜>a2<eos>...``, with exchanges
added until the next one would not fit, then padded. As in the template, an answer with a
``<think>`` trace keeps its trace only as the LAST turn of a row; in earlier turns it shows
just the text after ``</think>`` and is not learnt there (the model must not learn to skip
the trace). The loss mask marks every learnt assistant token and its closing ``<eos>``.
"""

from __future__ import annotations

import random

import numpy as np
from tokenizers import Tokenizer

from .data import Split, sample_turn
from .tokenizer import ASSISTANT, BOS, EOS, PAD, USER


class Packer:
    def __init__(self, tok: Tokenizer, length: int):
        self.tok = tok
        self.length = length  # tokens per row, including the one extra target position
        self.bos, self.eos, self.pad = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
        self.user, self.assistant = tok.token_to_id(USER), tok.token_to_id(ASSISTANT)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def turn(self, user: str, answer: str, last: bool) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of one exchange as it appears in a conversation."""
        learn = 1
        if not last and "</think>" in answer:
            answer, learn = answer.split("</think>")[-1].lstrip(), 0
        head = [self.user, *self.encode(user), self.assistant]
        body = [*self.encode(answer), self.eos]
        return head + body, [0] * len(head) + [learn] * len(body)

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids, mask = [self.bos], [0]
        for i, (user, answer) in enumerate(turns):
            t_ids, t_mask = self.turn(user, answer, last=i == len(turns) - 1)
            ids += t_ids
            mask += t_mask
        return ids, mask

    def row(self, rng: random.Random, split: Split, held: bool = False):
        """One padded row: (ids [length] int32, mask [length] float32)."""
        # The last exchange is drawn first, so that what is learnt with its <think> trace
        # is not biased towards short answers; history is then put in front while it fits.
        while True:
            turns = [sample_turn(rng, split, held)]
            ids, mask = self.conversation(turns)
            if len(ids) <= self.length:
                break
        while True:
            candidate = [sample_turn(rng, split, held), *turns]
            cand_ids, cand_mask = self.conversation(candidate)
            if len(cand_ids) > self.length:
                break
            turns, ids, mask = candidate, cand_ids, cand_mask
        pad = self.length - len(ids)
        return (
            np.array(ids + [self.pad] * pad, dtype=np.int32),
            np.array(mask + [0] * pad, dtype=np.float32),
        )

    def batch(self, rng: random.Random, split: Split, size: int, held: bool = False):
        rows = [self.row(rng, split, held) for _ in range(size)]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
