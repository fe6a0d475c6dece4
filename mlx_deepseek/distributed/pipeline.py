"""Pipeline parallelism: each rank runs a contiguous range of decoder layers.

Rank 0 embeds the tokens and runs its layers; each rank sends the residual stream (h, m) on
to the next (both halves, so that the next rank's first add and norm are exactly the one
process's); the last rank runs the final norm, the LM head and the MTP module, and every
rank receives the logits (`comm.share`), so every rank samples the same token and runs the
same generation loop. The latent caches stay with their layers: each rank's `make_cache()`
holds its own layers' caches (the MTP layer's on the last rank; the others keep an empty
stand-in of the same length so that every rank sees the same offsets).

Every rank builds the same sequence of collectives per call, in one order that dependencies
fix: recv, layers, send, then the logits' all_sum (the zeros a rank adds depend on its send).
A stage's send is also made a dependency of its last cache, so evaluating the caches after a
prefill chunk runs the sends (the caller never evaluates a prefill's logits).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..models.cache import check_layer_cache
from ..models.config import ModelArgs
from ..models.deepseek_v3 import Model, attention_mask
from . import comm
from .plan import Plan


class RemoteMTP(nn.Module):
    """Stands in for an MTP layer that the last rank holds (no parameters)."""


class PipelineModel(Model):
    """The model's interface on one rank of a pipeline (see the module docstring).

    Its `layers` are this rank's; `hidden` and the MTP module's hidden states are real on the
    last rank and zeros of the same shape elsewhere (only the last rank reads them); logits
    are real on every rank.
    """

    def __init__(self, args: ModelArgs, plan: Plan, rank: int, mtp_layers: int, last_embeds: bool):
        """last_embeds: the last rank keeps the embedding (the MTP layer reads it, or the
        head is tied to it)."""
        super().__init__(args)
        lo, hi = plan.layers[rank]
        self.rank, self.size = rank, plan.size
        self.first, self.last = rank == 0, rank == plan.size - 1
        self.layer_offset = lo
        self.dtype = mx.float32  # the compute dtype; the loader sets it
        self.model.layers = self.model.layers[lo:hi]
        if not (self.first or (self.last and last_embeds)):
            self.model.pop("embed_tokens")
        if not self.last:
            self.model.pop("norm")
            if "lm_head" in self:
                self.pop("lm_head")
            self.mtp = [RemoteMTP() for _ in range(mtp_layers)]
        else:
            self.mtp = self.mtp[:mtp_layers]

    # ---- this rank's stage -----------------------------------------------------------------

    def _zeros(self, shape: tuple[int, ...], after: mx.array) -> mx.array:
        """Zeros that are computed only after `after` (e.g. this rank's send)."""
        return mx.depends(mx.zeros(shape, self.dtype), after)

    def _stage(self, inputs: mx.array, cache: list | None) -> tuple[mx.array, mx.array]:
        """This rank's layers: the last rank's residual stream (h, m); on the other ranks
        (None-like zeros, the send's marker)."""
        layers = self.model.layers
        if cache is None:
            cache = [None] * len(layers)
        check_layer_cache(cache[0])
        B, L = inputs.shape[:2]
        D = self.args.hidden_size
        mask = attention_mask(L, cache[0])
        if self.first:
            h, normed = ops.embed(self.model.embed_tokens, inputs, layers[0].input_layernorm)
            m = None
        else:
            hm = comm.recv((B, L, 2 * D), self.dtype, self.rank - 1)  # [B, L, 2D]: (h, m)
            h, m = hm[..., :D], hm[..., D:]
            normed = None
        for layer, c in zip(layers, cache, strict=True):
            h, m = layer.forward(h, m, mask, c, normed)
            normed = None
        if self.last:
            return h, m
        sent = comm.send(mx.concatenate([h, m], axis=-1), self.rank + 1)
        last_cache = cache[-1]
        if last_cache is not None and getattr(last_cache, "keys", None) is not None:
            last_cache.keys = mx.depends(last_cache.keys, sent)
        return sent, sent

    # ---- the model interface ---------------------------------------------------------------

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.forward_with_hidden(inputs, cache)[0]

    def hidden(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        h, m = self._stage(inputs, cache)
        if self.last:
            return h + m
        return self._zeros((*inputs.shape[:2], self.args.hidden_size), m)

    def forward_with_hidden(
        self, inputs: mx.array, cache: list | None = None
    ) -> tuple[mx.array, mx.array]:
        h, m = self._stage(inputs, cache)
        B, L = inputs.shape[:2]
        if self.last:
            hidden, normed = ops.add_rms_norm(h, m, self.model.norm)
            logits = self.head(normed).astype(self.dtype)
        else:
            hidden = self._zeros((B, L, self.args.hidden_size), m)
            logits = self._zeros((B, L, self.args.vocab_size), m)
        return comm.share(logits), hidden

    def logits(self, hidden: mx.array) -> mx.array:
        if self.last:
            out = self.head(self.model.norm(hidden)).astype(self.dtype)
        else:
            out = self._zeros((*hidden.shape[:-1], self.args.vocab_size), hidden)
        return comm.share(out)

    def mtp_hidden(
        self, hidden: mx.array, next_tokens: mx.array, depth: int = 0, cache: Any = None
    ) -> mx.array:
        if self.last:
            return super().mtp_hidden(hidden, next_tokens, depth, cache)
        B, L = next_tokens.shape[:2]
        if cache is not None:  # the same offsets as the last rank's MTP cache, no data
            empty = mx.zeros((B, 1, L, 0), self.dtype)
            cache.update_and_fetch(empty, empty)
        return self._zeros((B, L, self.args.hidden_size), hidden)

    def mtp_logits(self, h: mx.array, depth: int = 0) -> mx.array:
        if self.last:
            out = super().mtp_logits(h, depth).astype(self.dtype)
        else:
            out = self._zeros((*h.shape[:-1], self.args.vocab_size), h)
        return comm.share(out)
