"""The server across ranks (--parallel): rank 0 serves HTTP, every rank runs the engine.

At the start of each engine step rank 0 shares what arrived since the last one: new requests
(prompt ids, parameters, token budget) and cancellations; at shutdown, a stop. Every rank
applies the same inputs and runs the same step, so batches, prefix-cache choices and sampled
tokens agree everywhere (the logits are the same on every rank, and the generators are
seeded alike). Rank 0's engine admits only requests it has announced; the other ranks'
handles drop their events (only rank 0 answers). The prefix cache counts an entry's bytes
from its token capacity and the whole model's cache width, so that every rank evicts the
same entries whatever part of the cache it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mlx.nn as nn

from ..distributed import World, is_peer_error
from ..sampling import SamplingSettings
from .engine import Engine, Handle, _Seq
from .prefix_cache import PrefixCache
from .sampler import GenParams, RowSampler

log = logging.getLogger("mlx_deepseek.serve")


def params_to_json(p: GenParams) -> dict[str, Any]:
    return {
        "max_tokens": p.max_tokens,
        "settings": vars(p.settings),
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "logit_bias": [[int(k), float(v)] for k, v in (p.logit_bias or {}).items()],
        "logprobs": p.logprobs,
        "top_logprobs": p.top_logprobs,
        "stop_ids": sorted(p.stop_ids),
    }


def params_from_json(d: dict[str, Any]) -> GenParams:
    return GenParams(
        max_tokens=d["max_tokens"],
        settings=SamplingSettings(**d["settings"]),
        presence_penalty=d["presence_penalty"],
        frequency_penalty=d["frequency_penalty"],
        logit_bias={int(k): float(v) for k, v in d["logit_bias"]} or None,
        logprobs=d["logprobs"],
        top_logprobs=d["top_logprobs"],
        stop_ids=frozenset(d["stop_ids"]),
    )


def agreed_measure(model: nn.Module):
    """Prefix-cache bytes every rank agrees on: buffer capacity (tokens) x the whole model's
    latent width per token (all layers), whatever part of the cache this rank holds."""
    args = model.args
    width = args.kv_lora_rank + args.qk_rope_head_dim

    def capacity(caches: Sequence[Any]) -> tuple[int, int]:
        for c in caches:
            keys = getattr(c, "keys", None)
            if keys is not None:
                return keys.shape[2], keys.dtype.size
        return 0, 0

    def measure(caches: Sequence[Any], mtp: Sequence[Any]) -> int:
        tokens, size = capacity(caches)
        mtp_tokens, mtp_size = capacity(mtp)
        main = tokens * args.num_hidden_layers * width * size
        return main + mtp_tokens * len(mtp) * width * mtp_size

    return measure


class _Replicated(Engine):
    """What rank 0's and the other ranks' engines share: cancellations as announced."""

    def __init__(self, model: nn.Module, *, world: World, **options: Any):
        super().__init__(model, **options)
        self.world = world
        self._cancel_ids: set[int] = set()
        self.prefix_cache = PrefixCache(self.prefix_cache.max_bytes, agreed_measure(model))

    def _cancelled(self, seq: _Seq) -> bool:
        return seq.handle.id in self._cancel_ids

    def _end(self, seq: _Seq, finish: str, store: bool = True, error: str | None = None) -> None:
        super()._end(seq, finish, store, error)
        self._cancel_ids.discard(seq.handle.id)

    def _step(self) -> None:
        try:
            self._iteration()
        except Exception as e:
            if is_peer_error(e):
                self.world.peer_lost(e)  # another rank went away: end all (no return)
            raise


class LeaderEngine(_Replicated):
    """Rank 0's engine: announces each step's inputs before running it."""

    def __init__(self, model: nn.Module, *, world: World, **options: Any):
        super().__init__(model, world=world, **options)
        self._announced: set[int] = set()

    def _iteration(self) -> None:
        with self._cv:
            new = [s for s in self._waiting if s.handle.id not in self._announced]
            live = [*self._waiting, *self._prefilling, *self._rows]
            if self._solo is not None:
                live.append(self._solo[0])
        cancel = [
            s.handle.id
            for s in live
            if s.handle.cancelled.is_set()
            and s.handle.id not in self._cancel_ids
            and (s.handle.id in self._announced or s in new)
        ]
        message = {
            "new": [[s.handle.id, s.prompt, params_to_json(s.params), s.max_tokens] for s in new],
            "cancel": cancel,
        }
        try:
            self.world.share(message)
            self._announced.update(s.handle.id for s in new)
            self._cancel_ids.update(cancel)
            super()._iteration()
        except Exception as e:
            if is_peer_error(e):
                self.world.peer_lost(e)  # another rank went away: end all (no return)
            raise

    def _admit(self) -> None:
        """Engine._admit over the announced requests only (one may arrive meanwhile)."""
        with self._cv:
            while (
                self._waiting
                and self._busy() < self.max_batch
                and self._waiting[0].handle.id in self._announced
            ):
                self._prefilling.append(self._waiting.popleft())
        for seq in self._prefilling:
            if seq.cache is None:
                self._start(seq)

    def _end(self, seq: _Seq, finish: str, store: bool = True, error: str | None = None) -> None:
        super()._end(seq, finish, store, error)
        self._announced.discard(seq.handle.id)

    def close(self) -> None:
        super().close()
        self.world.share({"stop": True})


class _QuietHandle(Handle):
    """A request's handle on a rank other than 0: rank 0's id, events dropped."""

    def __init__(self, handle_id: int):
        self.id = handle_id

    def _put(self, event: Any) -> None:
        pass


class FollowerEngine(_Replicated):
    """The engine on a rank other than 0: runs rank 0's steps until it says stop."""

    def run(self) -> None:
        while True:
            message = self.world.share(None)
            if message.get("stop"):
                self._fail_all("the server is shutting down", finish="cancelled")
                return
            for handle_id, prompt, params, max_tokens in message["new"]:
                p = params_from_json(params)
                seq = _Seq(_QuietHandle(handle_id), prompt, p, RowSampler(p), max_tokens=max_tokens)
                self._waiting.append(seq)
            self._cancel_ids.update(message["cancel"])
            try:
                self._step()
            except Exception as e:  # as Engine._run: end what runs, keep serving
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
