"""Pipeline parallelism: each rank runs a contiguous range of decoder layers.

Rank 0 embeds the tokens and runs its layers; each rank sends the residual stream on to the
next, whole, so that the next rank's first layer sees exactly what one process's does (V2/V3:
both halves (h, m) of the deferred add, [B, L, 2D]; V4: the hyper-connected copies
[B, L, hc, D]); the last rank runs the final norm, the LM head and the MTP module, and every
rank receives the logits (`comm.share`), so every rank samples the same token and runs the
same generation loop. Every rank is called with the same token ids, so a layer that routes
by token id (V4's hash layers) reads them wherever it runs. The caches stay with their
layers: each rank's `make_cache()` holds its own layers' caches (the MTP layer's on the last
rank; the others keep a stand-in of the same length, so every rank sees the same offsets and
trims the same way).

Every rank builds the same sequence of collectives per call, in one order that dependencies
fix: recv, layers, send, then the logits' all_sum (the zeros a rank adds depend on its send).
A stage's send is evaluated where it is built: a prefill chunk's logits are never read, and a
lazy graph spanning several steps' sends can deadlock the ring backend.

`PipelineStage` holds this logic once; a family's stage (`PipelineModel` for V2/V3,
`V4PipelineModel`) adds how its residual is embedded, carried over the wire and finished.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..models import deepseek_v3, deepseek_v4
from ..models.config import ModelArgs
from ..models.deepseek_v3 import attention_mask
from ..models.v4_cache import V4Cache
from . import comm
from .plan import Plan


class RemoteMTP(nn.Module):
    """Stands in for an MTP layer that the last rank holds (no parameters)."""


class RemoteMTPCache:
    """Stands in for the MTP layer's cache on the ranks that do not hold the layer: its
    length only (the last rank's real cache grows and trims the same way)."""

    def __init__(self) -> None:
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        return []

    @property
    def nbytes(self) -> int:
        return 0

    def advance(self, n: int) -> None:
        self.offset += n

    def empty(self) -> bool:
        return self.offset == 0

    def is_trimmable(self) -> bool:
        return True

    def can_trim(self, n: int) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = max(min(n, self.offset), 0)
        self.offset -= n
        return n

    def fresh(self) -> RemoteMTPCache:
        return RemoteMTPCache()


class PipelineStage:
    """The model's interface on one rank of a pipeline (see the module docstring), mixed into
    a family's Model.

    Its `layers` are this rank's; `hidden` and the MTP module's hidden states are real on the
    last rank and zeros of the same shape elsewhere (only the last rank reads them); logits
    are real on every rank.
    """

    args: Any
    model: nn.Module

    def _cut(self, plan: Plan, rank: int, mtp_layers: int, last_embeds: bool) -> None:
        """Keep this rank's layers and parts. last_embeds: the last rank keeps the embedding
        (the MTP layer reads it, or the head is tied to it)."""
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

    # ---- what a family defines -------------------------------------------------------------

    def _embed(self, inputs: mx.array) -> Any:
        """The first rank's residual before its first layer."""
        raise NotImplementedError

    def _wire_shape(self, B: int, L: int) -> tuple[int, ...]:
        """The shape of the residual as sent between ranks."""
        raise NotImplementedError

    def _to_wire(self, state: Any) -> mx.array:
        raise NotImplementedError

    def _from_wire(self, x: mx.array) -> Any:
        raise NotImplementedError

    def _run(self, state: Any, inputs: mx.array, cache: list) -> Any:
        """This rank's layers over the residual (inputs: the token ids)."""
        raise NotImplementedError

    def _fresh_cache(self) -> list:
        """Per layer what a call without a cache uses."""
        raise NotImplementedError

    def _hidden_of(self, state: Any) -> mx.array:
        """The last rank's residual -> what `hidden` returns (what MTP drafts from)."""
        raise NotImplementedError

    def _hidden_and_normed(self, state: Any) -> tuple[mx.array, mx.array]:
        """The last rank's residual -> (hidden, final-normed [B, L, D])."""
        raise NotImplementedError

    def _hidden_shape(self, B: int, L: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _stand_in_mtp(self, cache: Any, B: int, L: int) -> None:
        """Advance the stand-in of the MTP cache by L tokens (ranks without the layer)."""
        raise NotImplementedError

    # ---- this rank's stage -----------------------------------------------------------------

    def _zeros(self, shape: tuple[int, ...], after: mx.array) -> mx.array:
        """Zeros that are computed only after `after` (e.g. this rank's send)."""
        return mx.depends(mx.zeros(shape, self.dtype), after)

    def _stage(self, inputs: mx.array, cache: list | None) -> Any:
        """This rank's layers: the last rank's residual; on the other ranks the send, done."""
        if cache is None:
            cache = self._fresh_cache()
        B, L = inputs.shape[:2]
        if self.first:
            state = self._embed(inputs)
        else:
            received = comm.recv(self._wire_shape(B, L), self.dtype, self.rank - 1)
            state = self._from_wire(received)
        state = self._run(state, inputs, cache)
        if self.last:
            return state
        wire = self._to_wire(state).astype(self.dtype)
        sent = comm.send(wire, self.rank + 1)
        mx.eval(sent)
        return sent

    # ---- the model interface ---------------------------------------------------------------

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.forward_with_hidden(inputs, cache)[0]

    def hidden(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        state = self._stage(inputs, cache)
        if self.last:
            return self._hidden_of(state)
        return self._zeros(self._hidden_shape(*inputs.shape[:2]), state)

    def forward_with_hidden(
        self, inputs: mx.array, cache: list | None = None
    ) -> tuple[mx.array, mx.array]:
        state = self._stage(inputs, cache)
        B, L = inputs.shape[:2]
        if self.last:
            hidden, normed = self._hidden_and_normed(state)
            logits = self.head(normed).astype(self.dtype)
        else:
            hidden = self._zeros(self._hidden_shape(B, L), state)
            logits = self._zeros((B, L, self.args.vocab_size), state)
        return comm.share(logits), hidden

    def logits(self, hidden: mx.array) -> mx.array:
        if self.last:
            out = super().logits(hidden).astype(self.dtype)
        else:
            out = self._zeros((*hidden.shape[:2], self.args.vocab_size), hidden)
        return comm.share(out)

    def mtp_hidden(
        self, hidden: mx.array, next_tokens: mx.array, depth: int = 0, cache: Any = None
    ) -> mx.array:
        if self.last:
            return super().mtp_hidden(hidden, next_tokens, depth, cache)
        B, L = next_tokens.shape[:2]
        if cache is not None:  # the same offsets as the last rank's MTP cache, no data
            self._stand_in_mtp(cache, B, L)
        return self._zeros(self._hidden_shape(B, L), hidden)

    def mtp_logits(self, h: mx.array, depth: int = 0) -> mx.array:
        if self.last:
            out = super().mtp_logits(h, depth).astype(self.dtype)
        else:
            out = self._zeros((*h.shape[:2], self.args.vocab_size), h)
        return comm.share(out)


class PipelineModel(PipelineStage, deepseek_v3.Model):
    """A V2 / V3 stage: the residual is (h, m), the deferred add's two halves."""

    def __init__(self, args: ModelArgs, plan: Plan, rank: int, mtp_layers: int, last_embeds: bool):
        deepseek_v3.Model.__init__(self, args)
        self._cut(plan, rank, mtp_layers, last_embeds)

    def _embed(self, inputs: mx.array) -> Any:
        first = self.model.layers[0].input_layernorm
        h, normed = ops.embed(self.model.embed_tokens, inputs, first)
        return h, None, normed

    def _wire_shape(self, B: int, L: int) -> tuple[int, ...]:
        return (B, L, 2 * self.args.hidden_size)  # (h, m)

    def _to_wire(self, state: Any) -> mx.array:
        return mx.concatenate(state, axis=-1)

    def _from_wire(self, x: mx.array) -> Any:
        D = self.args.hidden_size
        return x[..., :D], x[..., D:], None

    def _run(self, state: Any, inputs: mx.array, cache: list) -> Any:
        h, m, normed = state
        mask = attention_mask(inputs.shape[1], cache[0])
        for layer, c in zip(self.model.layers, cache, strict=True):
            h, m = layer.forward(h, m, mask, c, normed)
            normed = None
        return h, m

    def _fresh_cache(self) -> list:
        return [None] * len(self.model.layers)

    def _hidden_of(self, state: Any) -> mx.array:
        h, m = state
        return h + m

    def _hidden_and_normed(self, state: Any) -> tuple[mx.array, mx.array]:
        return ops.add_rms_norm(*state, self.model.norm)

    def _hidden_shape(self, B: int, L: int) -> tuple[int, ...]:
        return (B, L, self.args.hidden_size)

    def _stand_in_mtp(self, cache: Any, B: int, L: int) -> None:
        empty = mx.zeros((B, 1, L, 0), self.dtype)  # a latent cache of no width
        cache.update_and_fetch(empty, empty)


class V4PipelineModel(PipelineStage, deepseek_v4.Model):
    """A DeepSeek V4 stage: the residual is the hyper-connected copies [B, L, hc, D]; each
    rank's layers route by the token ids they are called with (the hash layers)."""

    def __init__(self, args: Any, plan: Plan, rank: int, mtp_layers: int, last_embeds: bool):
        deepseek_v4.Model.__init__(self, args)
        self._cut(plan, rank, mtp_layers, last_embeds)

    def _embed(self, inputs: mx.array) -> Any:
        h = self.model.embed_tokens(inputs)
        return mx.broadcast_to(h[:, :, None], (*h.shape[:2], self.args.hc_mult, h.shape[-1]))

    def _wire_shape(self, B: int, L: int) -> tuple[int, ...]:
        return self._hidden_shape(B, L)

    def _to_wire(self, state: Any) -> mx.array:
        return state

    def _from_wire(self, x: mx.array) -> Any:
        return x

    def _run(self, state: Any, inputs: mx.array, cache: list) -> Any:
        for layer, c in zip(self.model.layers, cache, strict=True):
            state = layer(state, inputs, c)
        return state

    def _fresh_cache(self) -> list:
        return [layer.attn.make_cache() for layer in self.model.layers]

    def _hidden_of(self, state: Any) -> mx.array:
        return state

    def _hidden_and_normed(self, state: Any) -> tuple[mx.array, mx.array]:
        return state, self.model.norm(state)

    def _hidden_shape(self, B: int, L: int) -> tuple[int, ...]:
        return (B, L, self.args.hc_mult, self.args.hidden_size)

    def _stand_in_mtp(self, cache: Any, B: int, L: int) -> None:
        cache.advance(L)

    def make_cache(self) -> V4Cache:
        mtp = [layer.attn.make_cache() if self.last else RemoteMTPCache() for layer in self.mtp]
        return V4Cache(self._fresh_cache(), mtp)

    def make_mtp_cache(self) -> list:
        return self.make_cache().mtp
