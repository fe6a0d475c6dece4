"""Self-speculative decoding with DeepSeek's own MTP head.

Each step drafts `draft_tokens` tokens with the MTP module (the first from the main model's
pre-norm hidden state, further ones by applying the module to its own output), verifies
them all with ONE forward of the main model, keeps the longest accepted prefix plus one
token from the main model, and trims the rejected drafts from both latent caches.

- Greedy (temperature 0): a draft is accepted when it equals the main model's argmax, so
  the output is token-for-token the plain greedy output.
- Sampling: the standard speculative-sampling rule (accept d with probability
  min(1, p(d)/q(d)), otherwise sample from max(0, p - q) renormalised), with p and q the
  main model's and the MTP head's distributions after the same temperature / top-p / top-k /
  min-p filtering, so the output distribution is that of plain sampling.

State between calls lives on the `ModelCache`: the MTP layers' caches. MTP entry i pairs the
main model's h_i with token i+1; when a call ends, the pairs not yet entered are re-derived
on the next call by re-feeding the last few cached tokens (they come from
`StepOptions.prior_tokens`); without them the call falls back to plain decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .decoding import Step, StepOptions, decode_steps, trim_cache
from .errors import ArgumentTypeError, ArgumentValueError, DeepSeekError
from .models.cache import ModelCache
from .sampling import SamplingSettings, filter_logprobs


@dataclass(frozen=True)
class Drafting:
    """Self-speculative decoding with the checkpoint's MTP head: `mtp` on, off, or None (on
    where `mtp_by_default` says it pays), `draft_tokens` drafts per step (1 to 8)."""

    mtp: bool | None = None
    draft_tokens: int = 1

    def validated(self) -> Drafting:
        """Self, or an ArgumentTypeError / ArgumentValueError naming the bad field."""
        if not (self.mtp is None or isinstance(self.mtp, bool)):
            raise ArgumentTypeError(
                f"mtp={self.mtp!r}: must be True or False, or None for the default"
            )
        n = self.draft_tokens
        if isinstance(n, bool) or not isinstance(n, int):
            raise ArgumentTypeError(f"draft_tokens={n!r}: must be an integer from 1 to 8")
        if not 1 <= n <= 8:
            raise ArgumentValueError(f"draft_tokens={n!r}: must be an integer from 1 to 8")
        return self


def mtp_by_default(model: nn.Module) -> bool:
    """Whether drafting with the MTP head is on when the user does not say: whenever the
    checkpoint has an MTP layer. Verifying 2 tokens costs about what decoding 1 does where
    decode is bound by memory traffic (a GPU), and even on this project's CPU the bundled demo
    decodes 1.09x faster with 1 draft (100% accepted) and 1.14x with 2
    (scripts/bench_mtp.py). `--no-mtp` / mtp=False turns it off."""
    return bool(getattr(model, "mtp", None))


def mtp_step_fn(
    model: nn.Module,
    cache: list,
    mtp: bool | None,
    draft_tokens: int,
    settings: SamplingSettings | None,
):
    """The step function `stream_generate` should use: an MTPDecoder, or None (plain)."""
    if mtp is None:
        mtp = mtp_by_default(model)
    if not mtp:
        return None
    if not getattr(model, "mtp", None):
        raise DeepSeekError(
            "this checkpoint has no MTP layer, so it cannot draft tokens: drop --mtp (DeepSeek "
            "V3/R1/V3.1 ship one; convert with --mtp to keep it)"
        )
    if not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= 8:
        raise DeepSeekError(f"draft_tokens={draft_tokens!r}: must be an integer from 1 to 8")
    if not isinstance(cache, ModelCache):
        return None  # a cache without MTP state (e.g. a plain list): plain decoding
    return MTPDecoder(draft_tokens, settings)


@dataclass
class DraftStats:
    steps: int = 0  # verification forwards of the main model
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens produced by the decode steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def speculative_accept(p: mx.array, q: mx.array, draft: int) -> tuple[bool, int]:
    """The speculative-sampling rule for a draft drawn from q, target distribution p ([V]).

    Accept with probability min(1, p/q) at the draft; otherwise draw from max(0, p - q)
    renormalised. The token returned is distributed exactly as p.
    """
    ratio = (p[draft] / q[draft]).item()
    if mx.random.uniform().item() < ratio:
        return True, draft
    residual = mx.maximum(p - q, 0.0)
    return False, int(mx.random.categorical(mx.log(residual / residual.sum())).item())


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class MTPDecoder:
    """A step function for `stream_generate(..., step_fn=MTPDecoder(...))`.

    settings: the sampling settings (None or temperature 0: greedy). `stats` accumulates
    drafted / accepted counts over the decoder's lifetime.
    """

    def __init__(self, draft_tokens: int = 1, settings: SamplingSettings | None = None):
        if draft_tokens < 1:
            raise ValueError("draft_tokens must be >= 1")
        self.draft_tokens = draft_tokens
        self.settings = settings
        self.greedy = settings is None or settings.temperature == 0
        self.stats = DraftStats()

    # ---- distributions ---------------------------------------------------------------------

    def _probs(self, logprobs: mx.array) -> mx.array:
        """The distribution plain sampling draws from: filtered, tempered, normalised."""
        filtered = filter_logprobs(logprobs, self.settings)
        return mx.softmax(filtered / self.settings.temperature, axis=-1)

    def _process(self, logits: mx.array, history: list[int], opts: StepOptions) -> mx.array:
        """Logits [1, V] -> log-probabilities after the logits processors (repetition penalty)."""
        if opts.logits_processors:
            hist = mx.array(history)
            for p in opts.logits_processors:
                logits = p(hist, logits)
        return _log_softmax(logits)

    def _draw(self, logprobs: mx.array) -> tuple[int, mx.array | None]:
        """A token from log-probabilities [1, V], and the distribution it came from."""
        if self.greedy:
            return int(mx.argmax(logprobs, axis=-1).item()), None
        probs = self._probs(logprobs)
        return int(mx.random.categorical(mx.log(probs)).item()), probs

    # ---- the step function -----------------------------------------------------------------

    def __call__(
        self, model: nn.Module, prompt: mx.array, cache: list, opts: StepOptions
    ) -> Iterator[Step]:
        mtp_layers = getattr(model, "mtp", None)
        if not mtp_layers or not isinstance(cache, ModelCache) or not cache.mtp:
            yield from decode_steps(model, prompt, cache, opts)
            return
        tokens = prompt.tolist()
        prior = list(opts.prior_tokens)
        main_len = cache.length
        mtp_cache = cache.mtp[0]
        if main_len == 0:
            cache.trim_mtp(0)
        else:
            # MTP entries exist for positions < mtp_cache.offset; re-feed the cached tokens
            # after that point so their hidden states (and MTP pairs) are computed again
            valid = min(mtp_cache.offset, main_len - 1)
            need = main_len - valid
            if need > len(prior):
                yield from decode_steps(model, prompt, cache, opts)
                return
            cache.trim_mtp(valid)
            trim_cache(cache, valid)
            tokens = prior[len(prior) - need :] + tokens
        history = prior[: len(prior) - (main_len - cache.length)] + tokens
        start = cache.length
        base = len(history)  # history grows by each token as it is yielded
        yielded = 0
        try:
            h_last = self._prefill(model, tokens, cache, mtp_cache, opts)
            logprobs = self._process(model.logits(h_last)[:, -1], history, opts)
            token, _ = self._draw(logprobs)
            pend_h, pend_t = h_last, [token]
            history.append(token)
            yielded += 1
            self.stats.tokens += 1
            yield Step(token, logprobs[0])
            while yielded < opts.max_tokens:
                out, pend_h = yield from self._speculate(
                    model, cache, mtp_cache, pend_h, pend_t, history, opts, yielded
                )
                pend_t = out
                yielded += len(out)
        finally:
            # the cache holds exactly the prompt and the yielded tokens but the last one (also
            # when the consumer stops in the middle of a round of drafts)
            keep = start + len(tokens) + (len(history) - base) - 1
            if cache.length > keep:
                trim_cache(cache, keep)
            cache.trim_mtp(max(keep - 1, 0))

    def _prefill(
        self, model, tokens: list[int], cache: ModelCache, mtp_cache, opts: StepOptions
    ) -> mx.array:
        """Main model and MTP module over the prompt, in chunks; returns h at the last position."""
        x = mx.array(tokens)[None]
        total, done = len(tokens), 0
        pend_h = None  # h at the last position of the previous chunk, waiting for its token
        while done < total:
            n = min(opts.prefill_step_size, total - done)
            h = model.hidden(x[:, done : done + n], cache)  # [1, n, D]
            # MTP pairs (h_i, t_{i+1}) for the positions whose next token is known
            hs = h[:, :-1] if pend_h is None else mx.concatenate([pend_h, h[:, :-1]], axis=1)
            ts = x[:, done + 1 : done + n] if pend_h is None else x[:, done : done + n]
            if hs.shape[1] > 0:
                model.mtp_hidden(hs, ts, 0, mtp_cache)
            pend_h = h[:, -1:]
            mx.eval(pend_h, [c.state for c in cache], mtp_cache.state)
            done += n
            if opts.prefill_progress is not None:
                opts.prefill_progress(done, total)
        return pend_h

    def _speculate(self, model, cache, mtp_cache, pend_h, pend_t, history, opts, yielded):
        """One draft + verify round; yields its Steps, returns (new tokens, their hidden states)."""
        k = min(self.draft_tokens, opts.max_tokens - yielded - 1)
        # 1. enter the pending pairs into the MTP cache; the last one's output drafts
        mtp_len = mtp_cache.offset + len(pend_t)
        h_d = model.mtp_hidden(pend_h, mx.array(pend_t)[None], 0, mtp_cache)[:, -1:]
        drafts: list[int] = []
        qs: list[mx.array | None] = []
        for j in range(k):
            lp = self._process(model.mtp_logits(h_d)[:, -1], history + drafts, opts)
            d, q = self._draw(lp)
            drafts.append(d)
            qs.append(q)
            if j + 1 < k:  # recursive draft: the module applied to its own output
                h_d = model.mtp_hidden(h_d, mx.array([[d]]), 0, mtp_cache)
        cache.trim_mtp(mtp_len)

        # 2. verify all drafts with one forward of the main model
        h_v = model.hidden(mx.array([[pend_t[-1]] + drafts]), cache)  # [1, k+1, D]
        logits_v = model.logits(h_v)
        out: list[int] = []
        steps: list[Step] = []
        for j in range(k + 1):
            lp = self._process(logits_v[:, j], history + out, opts)
            if j == k:  # every draft accepted: the last position gives one more token
                token, _ = self._draw(lp)
                out.append(token)
                steps.append(Step(token, lp[0]))
                break
            d = drafts[j]
            if self.greedy:
                token = int(mx.argmax(lp, axis=-1).item())
                accepted = token == d
            else:
                accepted, token = speculative_accept(self._probs(lp)[0], qs[j][0], d)
            if accepted:
                out.append(d)
                steps.append(Step(d, lp[0], from_draft=True))
                continue
            out.append(token)
            steps.append(Step(token, lp[0]))
            break
        n_acc = len(out) - 1
        self.stats.steps += 1
        self.stats.drafted += k
        self.stats.accepted += n_acc
        self.stats.tokens += len(out)
        if k > n_acc:  # drop the rejected drafts from the main cache
            trim_cache(cache, cache.length - (k - n_acc))
        for step in steps:
            history.append(step.token)
            yield step
        return out, h_v[:, : n_acc + 1]
