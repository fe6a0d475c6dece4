"""What every family's top-level Model shares: the public passes that generation, MTP
drafting, speculative decoding and training call (hidden, logits, forward_with_hidden,
mtp_forward), written once over the parts each family defines."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


class CausalLM(nn.Module):
    """A family's Model. It defines `self.model` (the decoder: `.layers`, the final `.norm`,
    `hidden(inputs, cache)`, `hidden_and_normed(inputs, cache)` and `__call__` -> normed
    states), `head(normed)` -> logits, and its MTP modules' `mtp_hidden` / `mtp_logits`.

    Hidden states are [B, L, D] for V2/V3, the hc copies [B, L, hc, D] for V4."""

    model: Any

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.head(self.model(inputs, cache))

    def head(self, h: mx.array) -> mx.array:
        """Final-normed hidden states [B, L, D] -> logits [B, L, vocab]."""
        raise NotImplementedError

    def hidden(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """The last hidden states BEFORE the final norm: what MTP drafts from."""
        return self.model.hidden(inputs, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        """Hidden states from `hidden` -> logits [B, L, vocab]."""
        return self.head(self.model.norm(hidden))

    def forward_with_hidden(
        self, inputs: mx.array, cache: list | None = None
    ) -> tuple[mx.array, mx.array]:
        """(logits, the last hidden states before the final norm): what MTP drafting and
        training need."""
        h, normed = self.model.hidden_and_normed(inputs, cache)
        return self.head(normed), h

    def mtp_hidden(
        self, hidden: mx.array, next_tokens: mx.array, depth: int = 0, cache: Any = None
    ) -> mx.array:
        raise NotImplementedError

    def mtp_logits(self, h: mx.array, depth: int = 0) -> mx.array:
        raise NotImplementedError

    def mtp_forward(
        self, hidden: mx.array, next_tokens: mx.array, depth: int = 0, cache: Any = None
    ) -> tuple[mx.array, mx.array]:
        """MTP module `depth`: (logits for t_{i+2} [B, L, vocab], its hidden states).

        hidden: the main model's hidden states h_i (from `hidden`, or the previous MTP
        module's output); next_tokens: t_{i+1} [B, L]; cache: the module's layer cache."""
        h = self.mtp_hidden(hidden, next_tokens, depth, cache)
        return self.mtp_logits(h, depth), h
