"""Sampling settings and the token sampler: temperature, top-p, top-k, min-p, repetition penalty.

The filters are compiled (mlx-lm's top-p and top-k, and a min-p taking its threshold as an
array) and applied in mlx-lm's order on the untempered log-probabilities: top-p, then min-p,
then top-k; temperature then scales what is left before the categorical draw. Temperature
0 is greedy (argmax), whatever the filters say. Thresholds and temperature are passed as
arrays: on MLX's CPU backend every new constant would cost a JIT compile of seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from numbers import Integral, Real

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_top_k,
    apply_top_p,
    categorical_sampling,
    make_repetition_penalty,
)

from .errors import ArgumentTypeError, ArgumentValueError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick the next token. Defaults are greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None

    def validated(self, names: Mapping[str, str] | None = None) -> SamplingSettings:
        """Self, or an error naming the bad value and what is accepted: ArgumentTypeError (a
        TypeError) for a wrong type, ArgumentValueError (a ValueError) for a value out of
        range. `names` spells the fields as the caller's user knows them (the CLI's options):
        `--top-p 2.0: ...` instead of `top_p=2.0: ...`."""

        def label(field: str) -> str:
            value = getattr(self, field)
            return f"{names[field]} {value}" if names and field in names else f"{field}={value!r}"

        def number(field: str, rule: str, ok, integer: bool = False, optional: bool = False):
            value = getattr(self, field)
            if value is None and optional:
                return
            kind = Integral if integer else Real
            if isinstance(value, bool) or not isinstance(value, kind):
                what = "an integer" if integer else "a number"
                raise ArgumentTypeError(f"{label(field)}: must be {what} {rule}")
            if not ((integer or math.isfinite(value)) and ok(value)):
                raise ArgumentValueError(f"{label(field)}: must be {rule}")

        number("temperature", ">= 0 (0 = greedy)", lambda v: v >= 0)
        number("top_p", "in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        number("top_k", ">= 0 (0 = off)", lambda v: v >= 0, integer=True)
        number("min_p", "in [0, 1) (0 = off)", lambda v: 0 <= v < 1)
        number("repetition_penalty", "> 0 (1 = off)", lambda v: v > 0, optional=True)
        number("repetition_context_size", "> 0", lambda v: v > 0, integer=True)
        number("seed", "in [0, 2**64)", lambda v: 0 <= v < 2**64, integer=True, optional=True)
        return self

    def with_(self, **changes) -> SamplingSettings:
        """A copy with `changes` applied and validated."""
        return replace(self, **changes).validated()


@mx.compile
def _apply_min_p(logprobs: mx.array, log_min_p: mx.array) -> mx.array:
    # drop tokens whose probability is below min_p times the top token's
    floor = mx.max(logprobs, axis=-1, keepdims=True) + log_min_p
    return mx.where(logprobs < floor, -mx.inf, logprobs)


def filter_logprobs(logprobs: mx.array, settings: SamplingSettings) -> mx.array:
    """Log-probabilities [..., vocab] with the tokens that top-p / min-p / top-k drop set to -inf.

    The survivors keep their values (not renormalised): the categorical draw normalises.
    Thresholds go in as arrays, so changing them does not recompile the compiled filters.
    """
    vocab = logprobs.shape[-1]
    if settings.top_p < 1.0:
        logprobs = apply_top_p(logprobs, mx.array(settings.top_p, mx.float32))
    if settings.min_p > 0.0:
        logprobs = _apply_min_p(logprobs, mx.array(math.log(settings.min_p), mx.float32))
    if 0 < settings.top_k < vocab:  # top_k >= vocab keeps everything
        logprobs = apply_top_k(logprobs, settings.top_k)
    return logprobs


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(settings: SamplingSettings) -> Sampler:
    """A function log-probabilities [B, vocab] -> token ids [B]."""
    settings.validated()
    if settings.temperature == 0:
        return greedy
    temperature = mx.array(settings.temperature, mx.float32)

    def sample(logprobs: mx.array) -> mx.array:
        return categorical_sampling(filter_logprobs(logprobs, settings), temperature)

    return sample


def make_logits_processors(settings: SamplingSettings) -> list[LogitsProcessor]:
    """Processors (tokens so far, logits [B, vocab]) -> logits; the repetition penalty for now.

    The penalty is sign-aware (CTRL's): a positive logit is divided by it, a negative one
    multiplied, for every distinct token among the last `repetition_context_size` ones.
    """
    settings.validated()
    rp = settings.repetition_penalty
    if rp is None or rp == 1.0:
        return []
    return [make_repetition_penalty(float(rp), settings.repetition_context_size)]


def seed(value: int | None) -> None:
    """Seed MLX's global generator (None leaves it alone)."""
    if value is not None:
        mx.random.seed(int(value))
