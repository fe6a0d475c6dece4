"""Per-request sampling inside a batch: each row keeps its own settings, penalties, logit bias
and random key, so a seeded request samples the same tokens whatever else runs beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from ..sampling import SamplingSettings, filter_logprobs


@dataclass(frozen=True)
class GenParams:
    """What one request asks of the engine (token level; text-level stops live in the app)."""

    max_tokens: int
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop_ids: frozenset[int] = frozenset()  # EOS and other ids that end the answer

    @property
    def needs_key(self) -> bool:
        return self.settings.seed is not None and self.settings.temperature > 0


class RowSampler:
    """Logits [1, V] of one row -> (token [1], log-probabilities [1, V] after the processors)."""

    def __init__(self, params: GenParams):
        s = params.settings
        self.params = params
        self.processors = make_logits_processors(
            logit_bias=params.logit_bias or None,
            repetition_penalty=s.repetition_penalty,
            repetition_context_size=s.repetition_context_size,
            presence_penalty=params.presence_penalty or None,
            presence_context_size=s.repetition_context_size,
            frequency_penalty=params.frequency_penalty or None,
            frequency_context_size=s.repetition_context_size,
        )
        self.key = mx.random.key(s.seed) if params.needs_key else None
        self.temperature = mx.array(s.temperature or 1.0, mx.float32)
        self.context = s.repetition_context_size

    def process(self, logits: mx.array, history: Sequence[int]) -> mx.array:
        """The logits processors (bias, penalties) then log-softmax: [1, V] float32."""
        logits = logits.astype(mx.float32)
        if self.processors:
            hist = mx.array(list(history[-self.context :]), dtype=mx.int32)
            for p in self.processors:
                logits = p(hist, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def draw(self, logprobs: mx.array) -> mx.array:
        s = self.params.settings
        if s.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        filtered = filter_logprobs(logprobs, s) * (1.0 / self.temperature)
        if self.key is None:
            return mx.random.categorical(filtered)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(filtered, key=sub)

    def __call__(self, logits: mx.array, history: Sequence[int]) -> tuple[mx.array, mx.array]:
        logprobs = self.process(logits, history)
        return self.draw(logprobs), logprobs


def top_logprobs(logprobs: mx.array, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of log-probabilities [V], best first."""
    if n <= 0:
        return []
    n = min(n, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, n - 1)[:n]
    vals = logprobs[ids]
    pairs = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return sorted(pairs, key=lambda p: -p[1])
