"""The engine: one thread that owns the model and runs every request, batched.

Requests wait in a bounded queue and join the running batch at step boundaries; each engine
step (1) drops cancelled requests, (2) admits waiting ones up to `max_batch` (each starting
from the longest prefix the prefix cache holds), (3) prefills one chunk of one newcomer, and
(4) decodes one token for every running row in one batched forward. A request that finishes
or is cancelled leaves at the next boundary and its cache goes to the prefix cache. While a
single request runs alone (nothing waiting) and the checkpoint has an MTP head, it decodes
with MTP drafting (speculative.MTPDecoder) and goes back to the batch when others arrive.

The engine works in token ids; text (detokenizing, stop strings, reasoning and tool calls)
is the app's. Each request gets a `Handle`: its TokenEvents in order (iterate it, sync or
async), and `cancel()`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..decoding import StepOptions, cache_length, context_length, make_cache, trim_cache
from ..errors import DeepSeekError
from ..models.cache import ModelCache
from ..offload import expert_store
from ..sampling import greedy
from ..speculative import MTPDecoder, default_draft_tokens
from .batch import MtpFeed, PaddedBatch, SequentialBatch, prefill_chunk, supports_batching
from .prefix_cache import PrefixCache
from .sampler import GenParams, RowSampler, top_logprobs

log = logging.getLogger("mlx_deepseek.serve")

MTP_MAX_LAG = 32  # re-feed at most this many tokens through the main model to start drafting


class QueueFull(DeepSeekError):
    """The waiting queue is full: the caller should retry later (HTTP 503 + Retry-After)."""


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int  # of the prompt, reused from the prefix cache
    completion_tokens: int


@dataclass
class TokenEvent:
    """One generated token, or the end of a request (finish set; token -1 when it carries none).

    finish: "stop" (a stop id such as EOS), "length" (max_tokens or the context's end),
    "cancelled", or "error" (with `error`)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish: str | None = None
    usage: Usage | None = None
    error: str | None = None


class Handle:
    """A submitted request: iterate its TokenEvents (the last one has `finish`); `cancel()`."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aq: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._aq = None, None
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, event: TokenEvent) -> None:
        if self._aq is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                self.cancel()
        else:
            self._q.put(event)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._q.get()
            yield event
            if event.finish is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._aq is None:
            raise RuntimeError("this handle was submitted outside an event loop: iterate it")
        while True:
            event = await self._aq.get()
            yield event
            if event.finish is not None:
                return


@dataclass
class _Seq:
    handle: Handle
    prompt: list[int]
    params: GenParams
    sampler: RowSampler
    cache: Any = None  # per-layer caches while outside the batch (ModelCache when possible)
    tokens: list[int] = field(default_factory=list)  # everything seen or generated
    done_prefill: int = 0  # prompt tokens in the cache
    cached: int = 0  # prompt tokens that came from the prefix cache
    generated: int = 0
    max_tokens: int = 0
    mtp: list | None = None  # the MTP layer's caches (they stay here while the row is batched)
    mtp_feed: MtpFeed | None = None  # the prefill enters the prompt into the MTP cache too


class Engine:
    """Continuous batching over one model. Start with `start()` (or use as a context manager).

    max_batch: rows decoded together; max_queue: requests allowed to wait beyond those
    (`submit` raises QueueFull past it); prefix_cache_bytes: the prefix cache's size limit
    (0: off); prefill_step_size: prompt tokens per prefill chunk (a long prompt is prefilled
    between decode steps of the others); mtp: draft with the MTP head when one request runs
    alone (None: when the checkpoint has one); batched: use one padded forward per step (None:
    when the model is checked to give the same logits that way).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefix_cache_bytes: int = 2 << 30,
        prefill_step_size: int = 512,
        mtp: bool | None = None,
        draft_tokens: int | None = None,
        batched: bool | None = None,
    ):
        if max_batch < 1 or max_queue < 0 or prefill_step_size < 1:
            raise DeepSeekError(
                f"max_batch={max_batch}, max_queue={max_queue}, prefill_step_size="
                f"{prefill_step_size}: need max_batch >= 1, max_queue >= 0, a step >= 1"
            )
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_step_size = prefill_step_size
        self.context = context_length(model)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        has_mtp = bool(getattr(model, "mtp", None))
        self.mtp = has_mtp if mtp is None else bool(mtp and has_mtp)
        if draft_tokens is None:
            draft_tokens = default_draft_tokens(model) if self.mtp else 1
        self.draft_tokens = draft_tokens
        _eval_constants(model)
        n_layers = len(make_cache(model))
        if batched is None:
            batched = supports_batching(model, lambda: make_cache(model))
        self.batched = batched
        self._batch = PaddedBatch(model, n_layers) if batched else SequentialBatch(model)
        self._rows: list[_Seq] = []  # in batch order
        self._waiting: deque[_Seq] = deque()
        self._prefilling: deque[_Seq] = deque()
        self._solo: tuple[_Seq, Iterator] | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.batch_sizes: list[int] = []  # rows per decode step (stats)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mlx-deepseek-engine")
            self._thread.daemon = True
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        store = expert_store(self.model)
        with self._cv:
            return {
                "kv_bits": getattr(self.model, "kv_bits", None),
                "expert_cache": None
                if store is None
                else {
                    "slots_per_layer": store.slots,
                    "experts_per_layer": store.plan.shape.experts,
                    "budget_bytes": store.budget_bytes,
                    **store.snapshot().as_dict(),
                },
                "running": len(self._rows) + (1 if self._solo else 0),
                "prefilling": len(self._prefilling),
                "waiting": len(self._waiting),
                "max_batch": self.max_batch,
                "batched_forward": self.batched,
                "mtp": self.mtp,
                "prefix_cache": {
                    "entries": len(self.prefix_cache),
                    "bytes": self.prefix_cache.nbytes,
                    "max_bytes": self.prefix_cache.max_bytes,
                    "hits": self.prefix_cache.hits,
                    "lookups": self.prefix_cache.lookups,
                },
            }

    # ---- requests --------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: GenParams) -> Handle:
        """Queue a request; its events come through the returned Handle. Raises QueueFull, or
        DeepSeekError when the prompt is empty or does not fit the context."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise DeepSeekError("the prompt is empty: give at least one token")
        max_tokens = params.max_tokens
        if self.context is not None:
            room = self.context - len(prompt)
            if room < 1:
                raise DeepSeekError(
                    f"the prompt is {len(prompt)} tokens but the model's context holds "
                    f"{self.context}: shorten it"
                )
            max_tokens = min(max_tokens, room)
        handle = Handle()
        seq = _Seq(handle, prompt, params, RowSampler(params), max_tokens=max_tokens)
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            busy = len(self._rows) + len(self._prefilling) + (1 if self._solo else 0)
            free = max(self.max_batch - busy, 0)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting (the queue holds "
                    f"{self.max_queue}): retry later"
                )
            self._waiting.append(seq)
            self._cv.notify_all()
        return handle

    # ---- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._has_work():
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception as e:  # a failure inside the model: end what runs, keep serving
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", finish="cancelled")

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._rows or self._solo)

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._prefilling:
            self._prefill_step()
        if self._solo is not None:
            if self._prefilling or self._waiting or self._rows:
                self._leave_solo()
            else:
                self._solo_step()
                return
        if not self._rows:
            return
        if len(self._rows) == 1 and not (self._prefilling or self._waiting) and self._mtp_ok():
            self._enter_solo()
            self._solo_step()
            return
        self._batch_step()

    def _drop_cancelled(self) -> None:
        with self._cv:
            for q in (self._waiting, self._prefilling):
                for seq in [s for s in q if self._cancelled(s)]:
                    q.remove(seq)
                    self._end(seq, "cancelled", store=False)
        if self._solo is not None and self._cancelled(self._solo[0]):
            self._leave_solo()
        gone = [i for i, s in enumerate(self._rows) if self._cancelled(s)]
        if gone:
            self._finish_rows({i: "cancelled" for i in gone})

    def _cancelled(self, seq: _Seq) -> bool:
        """Whether `seq` was cancelled (a distributed engine answers from what rank 0 said at
        the step's start, so that every rank drops it at the same step)."""
        return seq.handle.cancelled.is_set()

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and self._busy() < self.max_batch:
                seq = self._waiting.popleft()
                self._prefilling.append(seq)
        for seq in self._prefilling:
            if seq.cache is None:
                self._start(seq)

    def _busy(self) -> int:
        return len(self._rows) + len(self._prefilling) + (1 if self._solo else 0)

    def _start(self, seq: _Seq) -> None:
        """A fresh cache for `seq`, continuing the longest prefix the prefix cache holds."""
        cache = make_cache(self.model)
        n, reused, mtp = self.prefix_cache.lookup(seq.prompt)
        if reused is None or len(reused) != len(cache):
            n, reused, mtp = 0, None, None
        for i, c in enumerate(reused or []):
            cache[i] = c
        seq.cached = n
        seq.tokens = list(seq.prompt)
        drafting = self.mtp and isinstance(cache, ModelCache) and bool(cache.mtp)
        if drafting and n and mtp is not None and mtp[0].offset >= n - 1:
            # re-run the last reused token: its hidden state pairs with the next prompt token
            cache.mtp = mtp
            n -= 1
            trim_cache(cache, n)
            cache.trim_mtp(n)
        elif drafting and n:
            drafting = False  # the MTP cache lags the reused prefix: decode plainly
        seq.cache = cache
        seq.done_prefill = n
        if drafting:
            seq.mtp = cache.mtp
            seq.mtp_feed = MtpFeed()

    def _prefill_step(self) -> None:
        seq = self._prefilling[0]
        end = len(seq.prompt) - 1  # the last prompt token is run by the first decode step
        if seq.done_prefill < end:
            stop = min(end, seq.done_prefill + self.prefill_step_size)
            prefill_chunk(self.model, seq.cache, seq.prompt[seq.done_prefill : stop], seq.mtp_feed)
            seq.done_prefill = stop
            if stop < end:
                return
        with self._cv:
            self._prefilling.popleft()
        if self._solo is not None:
            self._leave_solo()
        self._join(seq)

    def _join(self, seq: _Seq) -> None:
        self._batch.add([seq.cache])
        seq.cache, seq.mtp_feed = None, None  # the batch holds the main caches now
        self._rows.append(seq)

    # ---- batched decoding ------------------------------------------------------------------

    def _batch_step(self) -> None:
        rows = self._rows
        logits = self._batch.forward([s.tokens[-1] for s in rows])  # [B, V]
        outs = [s.sampler(logits[i : i + 1], s.tokens) for i, s in enumerate(rows)]
        mx.eval([t for t, _ in outs], [lp for _, lp in outs])
        self.steps += 1
        self.batch_sizes.append(len(rows))
        finished: dict[int, str] = {}
        for i, (seq, (token, logprobs)) in enumerate(zip(rows, outs, strict=True)):
            finish = self._emit(seq, int(token.item()), logprobs[0])
            if finish is not None:
                finished[i] = finish
        if finished:
            self._finish_rows(finished)

    def _emit(self, seq: _Seq, token: int, logprobs: mx.array) -> str | None:
        """Record and send one token; the finish reason when it ends the request."""
        seq.tokens.append(token)
        seq.generated += 1
        p = seq.params
        lp = top = None
        if p.logprobs:
            lp = float(logprobs[token].item())
            top = top_logprobs(logprobs, p.top_logprobs) if p.top_logprobs else []
        finish = None
        if token in p.stop_ids:
            finish = "stop"
        elif seq.generated >= seq.max_tokens:
            finish = "length"
        seq.handle._put(TokenEvent(token, lp, top))
        return finish

    def _finish_rows(self, finished: dict[int, str]) -> None:
        for i, finish in finished.items():
            seq = self._rows[i]
            seq.cache = self._batch.extract(i)
            self._end(seq, finish, store=finish != "cancelled" or seq.generated > 0)
        keep = [i for i in range(len(self._rows)) if i not in finished]
        self._batch.remove(keep)
        self._rows = [self._rows[i] for i in keep]

    def _end(self, seq: _Seq, finish: str, store: bool = True, error: str | None = None) -> None:
        """Send the final event; keep the sequence's cache (all its tokens but the last)."""
        if store and seq.cache is not None:
            held = len(seq.tokens) - 1
            if held > 0 and all(c.offset >= held for c in seq.cache):
                trim_cache(seq.cache, held)
                self.prefix_cache.store(seq.tokens[:held], list(seq.cache), seq.mtp)
        usage = Usage(len(seq.prompt), seq.cached, seq.generated)
        seq.handle._put(TokenEvent(-1, finish=finish, usage=usage, error=error))
        seq.cache = seq.mtp = None

    def _fail_all(self, message: str, finish: str = "error") -> None:
        with self._cv:
            everyone = list(self._waiting) + list(self._prefilling) + list(self._rows)
            if self._solo is not None:
                everyone.append(self._solo[0])
            self._waiting.clear()
            self._prefilling.clear()
        for seq in everyone:
            self._end(seq, finish, store=False, error=message if finish == "error" else None)
        self._rows, self._solo = [], None
        self._batch.remove([])

    # ---- one request alone: MTP drafting ---------------------------------------------------

    def _mtp_ok(self) -> bool:
        seq = self._rows[0]
        if not self.mtp or seq.mtp is None or seq.params.settings.seed is not None:
            return False
        lag = len(seq.tokens) - 1 - seq.mtp[0].offset  # pairs the drafter must re-derive
        return lag <= MTP_MAX_LAG and seq.generated + 1 < seq.max_tokens

    def _enter_solo(self) -> None:
        seq = self._rows[0]
        cache = make_cache(self.model)
        for i, c in enumerate(self._batch.extract(0)):
            cache[i] = c
        cache.mtp = seq.mtp
        self._batch.remove([])
        self._rows = []
        seq.cache = cache
        opts = StepOptions(
            sampler=greedy,  # unused: the decoder draws with the request's settings
            logits_processors=seq.sampler.processors,
            max_tokens=seq.max_tokens - seq.generated,
            prefill_step_size=self.prefill_step_size,
            prior_tokens=seq.tokens[:-1],
        )
        decoder = MTPDecoder(self.draft_tokens, seq.params.settings)
        self._solo = (seq, decoder(self.model, mx.array(seq.tokens[-1:]), cache, opts))

    def _solo_step(self) -> None:
        seq, steps = self._solo
        step = next(steps, None)
        self.steps += 1
        self.batch_sizes.append(1)
        finish = "length" if step is None else self._emit(seq, step.token, step.logprobs)
        if finish is not None:
            steps.close()
            self._solo = None
            self._end(seq, finish)

    def _leave_solo(self) -> None:
        """Back to the batch: the decoder leaves the cache holding all but the last token."""
        seq, steps = self._solo
        steps.close()
        self._solo = None
        if self._cancelled(seq):
            self._end(seq, "cancelled")
            return
        held = len(seq.tokens) - 1
        trim_cache(seq.cache, held)
        have = cache_length(seq.cache)
        if have < held:  # the decoder kept less than it yielded: run the rest again
            prefill_chunk(self.model, seq.cache, seq.tokens[have:held])
        self._join(seq)


def _eval_constants(model: nn.Module) -> None:
    """Evaluate the arrays a model keeps outside its parameters (e.g. RoPE frequencies on a
    plain object): unevaluated, they belong to this thread's MLX stream, which the engine's
    thread cannot run."""
    if not isinstance(model, nn.Module):  # a model-protocol object of another kind
        return
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, mx.array):
                mx.eval(value)
            elif hasattr(value, "__dict__") and not isinstance(value, nn.Module):
                mx.eval([v for v in vars(value).values() if isinstance(v, mx.array)])
    mx.eval(model.parameters())
