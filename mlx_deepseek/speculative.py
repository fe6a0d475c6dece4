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
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from . import compiled
from .decoding import Step, StepOptions, decode_steps, trim_cache
from .errors import ArgumentTypeError, ArgumentValueError, DeepSeekError
from .models.cache import ModelCache
from .sampling import SamplingSettings, filter_logprobs


@dataclass(frozen=True)
class Drafting:
    """Self-speculative decoding with the checkpoint's MTP head: `mtp` on, off, or None (on
    where `mtp_by_default` says it pays), `draft_tokens` drafts per step (1 to 8, or None:
    `default_draft_tokens`)."""

    mtp: bool | None = None
    draft_tokens: int | None = None

    def validated(self) -> Drafting:
        """Self, or an ArgumentTypeError / ArgumentValueError naming the bad field."""
        if not (self.mtp is None or isinstance(self.mtp, bool)):
            raise ArgumentTypeError(
                f"mtp={self.mtp!r}: must be True or False, or None for the default"
            )
        n = self.draft_tokens
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int):
            raise ArgumentTypeError(f"draft_tokens={n!r}: must be an integer from 1 to 8")
        if not 1 <= n <= 8:
            raise ArgumentValueError(f"draft_tokens={n!r}: must be an integer from 1 to 8")
        return self


def mtp_by_default(model: nn.Module) -> bool:
    """Whether drafting with the MTP head is on when the user does not say: whenever the
    checkpoint has an MTP layer. Verifying 2 tokens costs about what decoding 1 does where
    decode is bound by memory traffic (a GPU), or where the weights are float (the CPU runs
    small models from float weights: ops/cpu.py); a round costs that plus the MTP layer and
    head per draft (~0.45 of a step on the bundled demo: `default_draft_tokens`).
    `--no-mtp` / mtp=False turns it off."""
    return bool(getattr(model, "mtp", None))


def default_draft_tokens(model: nn.Module) -> int:
    """Drafts per step when the user does not say: 2 for a model with float weights on the
    CPU, 1 (DeepSeek's own) otherwise. From float weights verifying 3 tokens costs about
    what 1 does (~1.1 steps), and the second draft (the MTP module applied to its own
    output, ~0.45 of a step on the demo) is accepted often enough to pay: on this project's
    CPU two drafts decode the demo as fast as one on an idle machine (1.13x vs 1.14x plain,
    with less CPU per token) and faster compiled (1.18x vs 1.12x) or under load (1.27-1.39x
    vs 1.07-1.21x; at temperature 0.6, 1.07x vs 0.99x). MLX's quantized matmul on the
    CPU decodes its weights once per input row, so there each verified token costs more and
    one draft is the safer default; on a GPU, unmeasured here, DeepSeek's one."""
    if mx.default_device() != mx.cpu:
        return 1
    quantized = any("scales" in m for _, m in model.named_modules())
    return 1 if quantized else 2


def mtp_step_fn(
    model: nn.Module,
    cache: list,
    mtp: bool | None,
    draft_tokens: int | None,
    settings: SamplingSettings | None,
):
    """The step function `stream_generate` should use: an MTPDecoder, or None (plain).
    draft_tokens None: `default_draft_tokens`."""
    if mtp is None:
        mtp = mtp_by_default(model)
    if not mtp:
        return None
    if draft_tokens is None:
        draft_tokens = default_draft_tokens(model)
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
    accepted, other = _accept_rule(p[None], q[None], mx.array([draft]))
    if accepted.item():
        return True, draft
    return False, int(other.item())


def _accept_rule(p: mx.array, q: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """The rule for several positions at once, lazily: p, q [n, V], drafts [n] ->
    (accepted [n] bool, the token to emit instead where rejected [n])."""
    at = drafts[:, None]
    ratio = mx.take_along_axis(p, at, axis=-1) / mx.take_along_axis(q, at, axis=-1)
    accepted = mx.random.uniform(shape=ratio.shape) < ratio
    residual = mx.maximum(p - q, 0.0)
    other = mx.random.categorical(mx.log(residual / residual.sum(axis=-1, keepdims=True)))
    return accepted[:, 0], other


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


SPECULATE_ABOVE = 0.5  # build the next round before this one is read when this many of the
# recent rounds had every draft accepted (a round built on a rejected draft is thrown away)


class MTPDecoder:
    """A step function for `stream_generate(..., step_fn=MTPDecoder(...))`.

    settings: the sampling settings (None or temperature 0: greedy). `stats` accumulates
    drafted / accepted counts over the decoder's lifetime. speculate: build each round before
    the previous one is read, guessing its drafts all accepted (default: on a GPU).
    """

    def __init__(
        self,
        draft_tokens: int = 1,
        settings: SamplingSettings | None = None,
        speculate: bool | None = None,
    ):
        if draft_tokens < 1:
            raise ValueError("draft_tokens must be >= 1")
        self.draft_tokens = draft_tokens
        self.settings = settings
        self.greedy = settings is None or settings.temperature == 0
        self.stats = DraftStats()
        self._full_rate = 1.0  # how often recent rounds had every draft accepted
        # building the next round while one computes pays where MLX evaluates asynchronously
        # (a GPU); on MLX's CPU back-end async_eval returns only when the work is nearly done,
        # so a round built ahead would only be lost work when a draft is rejected
        self.speculate = mx.default_device() == mx.gpu if speculate is None else speculate

    # ---- distributions ---------------------------------------------------------------------

    def _process(self, logits: mx.array, history: list[int], opts: StepOptions) -> mx.array:
        """Logits [1, V] -> log-probabilities after the logits processors (repetition penalty)."""
        if opts.logits_processors:
            hist = mx.array(history)
            for p in opts.logits_processors:
                logits = p(hist, logits)
        return _log_softmax(logits)

    def _draw(self, logprobs: mx.array) -> tuple[int, mx.array | None]:
        """A token from log-probabilities [1, V], and the distribution it came from."""
        token, probs = _draw_lazy(logprobs, None if self.greedy else self.settings)
        return int(token.item()), probs

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
        emitted = 0  # tokens yielded
        try:
            h_last = self._prefill(model, tokens, cache, mtp_cache, opts)
            logprobs = self._process(model.logits(h_last)[:, -1], history, opts)
            token, _ = self._draw(logprobs)
            history.append(token)
            self.stats.tokens += 1
            steps = [Step(token, logprobs[0])]
            # One host sync per round (`_settle`). Rounds are queued (async_eval) before the
            # tokens they follow are yielded, so the consumer's work overlaps their compute;
            # and while a round computes, the next one is built on the guess that all its
            # drafts will be accepted (its graph reads the drafts on the device), dropped
            # when one is not: the Python that builds a round overlaps the previous round.
            round_ = None
            if opts.max_tokens > 1:
                round_ = self._launch(model, cache, mtp_cache, h_last, mx.array([token]),
                                      history, None, opts, 1)  # fmt: skip
            for step in steps:
                emitted += 1
                yield step
            while round_ is not None:
                nxt = None
                ahead = round_.known_after
                if (
                    self.speculate
                    and ahead < opts.max_tokens
                    and self._full_rate >= SPECULATE_ABOVE
                ):
                    nxt = self._launch(model, cache, mtp_cache, round_.hidden, round_.tokens,
                                       history, round_.tokens, opts, ahead)  # fmt: skip
                steps, n_acc = self._settle(round_)
                history.extend(step.token for step in steps)
                if n_acc < round_.k:  # drop the rejected drafts, and the round built on them
                    trim_cache(cache, round_.main_end - (round_.k - n_acc))
                    if nxt is not None:
                        cache.trim_mtp(nxt.mtp_start)
                        nxt = None
                known = round_.known + len(steps)
                if nxt is None and known < opts.max_tokens:
                    pend_t = mx.array([step.token for step in steps])
                    nxt = self._launch(model, cache, mtp_cache, round_.hidden[:, : n_acc + 1],
                                       pend_t, history, None, opts, known)  # fmt: skip
                for step in steps:
                    emitted += 1
                    yield step
                round_ = nxt
        finally:
            # the cache holds exactly the prompt and the yielded tokens but the last one (also
            # when the consumer stops in the middle of a round, or with one in flight)
            keep = start + len(tokens) + emitted - 1
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

    def _launch(
        self, model, cache, mtp_cache, pend_h, pend_t, history, guessed, opts, known
    ) -> Round:
        """Build one draft + verify round's graph (nothing read back) and queue it.

        pend_h [1, n, D], pend_t [n]: the hidden states and next tokens the MTP cache has yet
        to pair (device arrays); history: the tokens so far (host), followed by `guessed`
        (device, or None) for the logits processors; known: tokens before this round.
        Without logits processors the round is one compiled function where that pays
        (compiled.py); the processors see a history that grows, so theirs is built here."""
        k = min(self.draft_tokens, opts.max_tokens - known - 1)
        processors = opts.logits_processors
        mtp_start, n = mtp_cache.offset, pend_t.size
        settings = None if self.greedy else self.settings
        if not processors and compiled.enabled(model, [*cache, mtp_cache]):
            groups = [
                compiled.Group(cache, k + 1, k + 1),  # the verified inputs
                compiled.Group([mtp_cache], n + max(k - 1, 0), n),  # drop the recursive ones
            ]
            packed, lp_v, h_v = compiled.run(
                model, ("mtp_round", k, settings), partial(_compiled_round, model, k, settings),
                [pend_h, pend_t], groups, random=settings is not None,
            )  # fmt: skip
        else:
            hist = None
            if processors:
                hist = mx.array(history)
                hist = hist if guessed is None else mx.concatenate([hist, guessed])
            packed, lp_v, h_v = round_graph(
                model, cache, mtp_cache, pend_h, pend_t, k, settings, processors, hist
            )
            cache.trim_mtp(mtp_start + n)
        mx.async_eval(packed, lp_v, h_v)
        # the round's tokens if every draft is accepted: the drafts, the bonus pick
        tokens = mx.concatenate([packed[:k], packed[3 * k :]])
        return Round(k, known, packed, lp_v, h_v, tokens, cache.length, mtp_start)

    def _settle(self, round_: Round) -> tuple[list[Step], int]:
        """Read a round back (the one sync): its Steps and how many drafts were accepted."""
        k = round_.k
        values = round_.packed.tolist()
        drafts, accepted, picks = values[:k], values[k : 2 * k], values[2 * k :]
        n_acc = next((j for j in range(k) if not accepted[j]), k)
        steps = [Step(drafts[j], round_.logprobs[j], from_draft=True) for j in range(n_acc)]
        steps.append(Step(picks[n_acc], round_.logprobs[n_acc]))
        self.stats.steps += 1
        self.stats.drafted += k
        self.stats.accepted += n_acc
        self.stats.tokens += len(steps)
        full = 1.0 if n_acc == k else 0.0
        self._full_rate += (full - self._full_rate) / 4  # recent rounds weigh most
        return steps, n_acc


class Round(NamedTuple):
    """One draft + verify round in flight."""

    k: int  # drafts
    known: int  # tokens before this round
    packed: mx.array  # [3k + 1]: drafts, accepted (0/1), the main model's tokens (k + 1)
    logprobs: mx.array  # [k + 1, V] at each verified position
    hidden: mx.array  # [1, k + 1, D] pre-norm hidden states of the verified inputs
    tokens: mx.array  # [k + 1] the round's tokens if every draft is accepted
    main_end: int  # the main cache's length with every verified input in it
    mtp_start: int  # the MTP cache's length before the round

    @property
    def known_after(self) -> int:
        """Tokens known after this round if every draft is accepted."""
        return self.known + self.k + 1


# ---- one round's graph -----------------------------------------------------------------------


def round_graph(
    model: nn.Module,
    cache: list,
    mtp_cache,
    pend_h: mx.array,
    pend_t: mx.array,
    k: int,
    settings: SamplingSettings | None,
    processors: list | None = None,
    hist: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Draft k tokens and verify them, lazily: the caches (real, or compiled.TracedCache)
    take the pending MTP pairs, the recursive drafts' MTP entries and the k + 1 verified
    inputs. settings None: greedy. Returns (packed [3k + 1]: drafts, accepted 0/1, the main
    model's picks; log-probabilities [k + 1, V] at the verified positions; their pre-norm
    hidden states [1, k + 1, D])."""
    # 1. enter the pending pairs into the MTP cache; the last one's output drafts
    h_d = model.mtp_hidden(pend_h, pend_t[None], 0, mtp_cache)[:, -1:]
    drafts: list[mx.array] = []  # each [1]
    qs: list[mx.array] = []
    for j in range(k):
        logits_d = model.mtp_logits(h_d)[:, -1]
        if settings is None and not processors:  # the argmax of the logits: no softmax needed
            d, q = mx.argmax(logits_d, axis=-1), None
        else:
            d, q = _draw_lazy(_process_lazy(logits_d, hist, drafts, processors), settings)
        drafts.append(d)
        qs.append(q)
        if j + 1 < k:  # recursive draft: the module applied to its own output
            h_d = model.mtp_hidden(h_d, d[None], 0, mtp_cache)

    # 2. verify all drafts with one forward of the main model
    inputs = mx.concatenate([pend_t[-1:], *drafts])[None]  # [1, k+1]
    h_v = model.hidden(inputs, cache)  # [1, k+1, D]
    logits_v = model.logits(h_v)[0]  # [k+1, V]
    if processors:  # position j sees the drafts before it: used only when all accepted
        lps = [
            _process_lazy(logits_v[j : j + 1], hist, drafts[:j], processors) for j in range(k + 1)
        ]
        lp_v = mx.concatenate(lps)  # [k+1, V]
    else:  # every position at once (fewer operations per round: they cost on the CPU)
        lp_v = _log_softmax(logits_v)
    draft_arr = mx.concatenate(drafts) if k else mx.zeros((0,), mx.uint32)
    if settings is None:
        picks = mx.argmax(lp_v, axis=-1)  # [k+1]: the main model's tokens
        accepted = picks[:k] == draft_arr
    else:
        p = _probs(lp_v, settings)
        bonus = mx.random.categorical(mx.log(p[k:]))  # after every draft accepted
        if k:
            accepted, other = _accept_rule(p[:k], mx.concatenate(qs), draft_arr)
            picks = mx.concatenate([other, bonus])
        else:
            accepted, picks = mx.zeros((0,), mx.bool_), bonus
    picks = picks.astype(mx.uint32)
    draft_arr = draft_arr.astype(mx.uint32)
    # what the host reads back, in one array: drafts, accepted, the main model's picks
    packed = mx.concatenate([draft_arr, accepted.astype(mx.uint32), picks])
    return packed, lp_v, h_v


def _compiled_round(model: nn.Module, k: int, settings: SamplingSettings | None, main, mtp):
    """The compiled round's body over traced caches (compiled.run's `build`)."""
    return lambda pend_h, pend_t: round_graph(model, main, mtp[0], pend_h, pend_t, k, settings)


def _probs(logprobs: mx.array, settings: SamplingSettings) -> mx.array:
    """The distribution plain sampling draws from: filtered, tempered, normalised."""
    filtered = filter_logprobs(logprobs, settings)
    return mx.softmax(filtered / settings.temperature, axis=-1)


def _draw_lazy(
    logprobs: mx.array, settings: SamplingSettings | None
) -> tuple[mx.array, mx.array | None]:
    """A token from log-probabilities [1, V], unevaluated: (token [1], the distribution
    [1, V] it came from, or None when greedy)."""
    if settings is None:
        return mx.argmax(logprobs, axis=-1), None
    probs = _probs(logprobs, settings)
    return mx.random.categorical(mx.log(probs)), probs


def _process_lazy(logits, hist, drafts, processors) -> mx.array:
    """Logits [1, V] -> log-probabilities after the logits processors, which see the
    history and then `drafts` ([1] arrays)."""
    if processors:
        seen = mx.concatenate([hist, *drafts]) if drafts else hist
        for p in processors:
            logits = p(seen, logits)
    return _log_softmax(logits)
