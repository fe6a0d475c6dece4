"""Step functions: prompt tokens + a cache in, one sampled token per `Step` out.

`decode_steps` is the plain loop (prefill in chunks, then one token per forward pass);
speculative.py's MTP decoder is another step function with the same signature.

Cache contract for step functions: when the consumer stops after a step, the cache holds
the prompt and the tokens yielded so far, possibly except the last one (the plain loop
computes one step ahead, so the last yielded token is usually already in the cache).
Callers that continue from the cache (the chat) trim it to what they keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from numbers import Integral
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from . import compiled
from .errors import ArgumentTypeError, ArgumentValueError
from .sampling import LogitsProcessor, Sampler

DEFAULT_PREFILL_STEP_SIZE = 2048


class Step(NamedTuple):
    token: int
    logprobs: mx.array  # [vocab]
    from_draft: bool = False


@dataclass
class StepOptions:
    sampler: Sampler
    logits_processors: list[LogitsProcessor]
    max_tokens: int
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE
    prior_tokens: Sequence[int] = ()  # already in the cache; seen by the repetition penalty
    prefill_progress: Callable[[int, int], None] | None = None


StepFn = Callable[[nn.Module, mx.array, list, StepOptions], Iterator[Step]]


# ---- caches --------------------------------------------------------------------------------


def make_cache(model: nn.Module) -> list:
    if hasattr(model, "make_cache"):
        return model.make_cache()
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def cache_length(cache: list) -> int:
    """Tokens held by a per-layer cache list (the least-filled layer)."""
    return min((c.offset for c in cache), default=0)


def can_trim_cache(cache: list, length: int) -> bool:
    """Whether every layer can be cut back to its first `length` tokens exactly (a V4 cache
    keeps a bounded past: its window and compressor state; see models/v4_cache.py)."""
    return all(
        c.can_trim(c.offset - length) for c in cache if c.offset > length and hasattr(c, "can_trim")
    )


def trim_cache(cache: list, length: int) -> None:
    """Cut every layer back to its first `length` tokens."""
    for c in cache:
        if c.offset > length:
            c.trim(c.offset - length)


def context_length(model: nn.Module) -> int | None:
    args = getattr(model, "args", None)
    return getattr(args, "max_position_embeddings", None)


def vocab_size(model: nn.Module) -> int | None:
    return getattr(getattr(model, "args", None), "vocab_size", None)


# ---- token ids from outside ----------------------------------------------------------------


def check_token_ids(
    ids: Any, vocab: int | None, what: str = "prompt", check_range: bool = True
) -> list[int]:
    """`ids` (a sequence of integers, or an integer mx / NumPy array) as a list of ints, each in
    [0, vocab); else ArgumentTypeError / ArgumentValueError naming `what`, the first bad id
    and its position (check_range=False: types only). Every id that comes from outside the
    process (the API, a saved session, a server request) passes here before it can reach the
    embedding's gather, which does not check its indices."""
    if isinstance(ids, mx.array):
        if ids.dtype == mx.bool_ or not mx.issubdtype(ids.dtype, mx.integer):
            raise ArgumentTypeError(
                f"{what}: token ids must be integers, got an array of {ids.dtype}"
            )
        ids = ids.reshape(-1).tolist()
    elif hasattr(ids, "dtype") and hasattr(ids, "tolist"):  # a NumPy array
        if getattr(ids.dtype, "kind", None) not in ("i", "u"):
            raise ArgumentTypeError(
                f"{what}: token ids must be integers, got an array of {ids.dtype}"
            )
        ids = ids.reshape(-1).tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ArgumentTypeError(f"{what}: give a list of token ids, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, Integral):
            raise ArgumentTypeError(
                f"{what}: token ids must be integers, got {type(t).__name__} {t!r} at position {i}"
            )
        t = int(t)
        if check_range and (t < 0 or (vocab is not None and t >= vocab)):
            where = f"[0, {vocab})" if vocab is not None else "[0, vocab_size)"
            raise ArgumentValueError(
                f"{what}: token id {t} at position {i} is outside the model's vocabulary "
                f"{where}: use ids from this model's tokenizer"
            )
        out.append(t)
    return out


# ---- the plain step function ---------------------------------------------------------------


def _last_logits(model: nn.Module, caches: list) -> Callable[[mx.array], mx.array]:
    """The compiled step's body: tokens [1, L] -> logits at the last position [1, V]."""
    return lambda tokens: model(tokens, cache=caches)[:, -1, :]


def decode_steps(
    model: nn.Module, prompt: mx.array, cache: list, opts: StepOptions
) -> Iterator[Step]:
    """Prefill `prompt` [L] in chunks, then sample one token per forward pass.

    Each prefill chunk is evaluated before the next starts, so `prefill_progress` may raise
    (e.g. on Ctrl-C) and leave the cache holding whole chunks only.
    """
    processors = opts.logits_processors
    history = mx.array(list(opts.prior_tokens) + prompt.tolist()) if processors else None
    use_compiled = False  # decided once the prefill has filled the cache

    def step(inputs: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history, use_compiled
        use_compiled = use_compiled or compiled.enabled(model, cache)
        if use_compiled:
            L = inputs.size
            group = compiled.Group(cache, L, L)
            logits = compiled.run(model, "step", partial(_last_logits, model), [inputs[None]],
                                  [group])  # fmt: skip
        else:
            logits = model(inputs[None], cache=cache)[:, -1, :]
        if processors:
            for p in processors:
                logits = p(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = opts.sampler(logprobs)
        if processors:
            history = mx.concatenate([history, token])
        return token, logprobs.squeeze(0)

    total, done = prompt.size, 0
    while total - done > 1:
        n = min(opts.prefill_step_size, total - done - 1)
        model(prompt[done : done + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        if opts.prefill_progress is not None:
            opts.prefill_progress(done, total)
        mx.clear_cache()

    y, logprobs = step(prompt[done:])
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        if n + 1 < opts.max_tokens:  # compute the next step while the caller handles this one
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        if n == 0 and opts.prefill_progress is not None:
            mx.eval(y)
            opts.prefill_progress(total, total)
        yield Step(y.item(), logprobs)
        n += 1
        if n >= opts.max_tokens:
            return
        if n % 256 == 0:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs
