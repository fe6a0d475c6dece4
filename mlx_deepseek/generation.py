"""The generation API: prompt in, streamed text out (`stream_generate`, `generate`).

One loop serves the Python API, `mlx-deepseek generate` and the chat. A *step function*
(decoding.py: plain; speculative.py: MTP drafting) turns the prompt tokens and a cache into
sampled tokens; `stream_generate` owns everything about text: the prompt's encoding, EOS
ids, stop strings, max tokens, the streaming detokenizer (never splits a UTF-8 character),
timings and memory.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from numbers import Integral
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .decoding import (
    DEFAULT_PREFILL_STEP_SIZE,
    StepFn,
    StepOptions,
    cache_length,
    check_token_ids,
    context_length,
    decode_steps,
    make_cache,
    vocab_size,
)
from .errors import ArgumentTypeError, ArgumentValueError
from .sampling import (
    LogitsProcessor,
    Sampler,
    SamplingSettings,
    make_logits_processors,
    make_sampler,
)
from .sampling import seed as seed_rng
from .speculative import Drafting, mtp_step_fn


@dataclass
class GenerationResponse:
    """One streamed piece of output (mirrors mlx-lm's GenerationResponse).

    text: the new text since the previous response (may be empty: held-back bytes of a
    character, or text that might start a stop string); token: the token of this step;
    logprobs: its log-probabilities over the vocabulary [vocab]; from_draft: proposed by a
    draft (speculative decoding); prompt_tokens: tokens prefilled for this request (not
    counting a reused cache); prompt_tps: their tokens/s; generation_tokens: tokens generated
    so far; generation_tps: decode tokens/s; peak_memory: GB; finish_reason: None while
    streaming, then "stop" (EOS or a stop string) or "length" (max tokens or context end).
    """

    text: str
    token: int
    logprobs: mx.array | None
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    acceptance_rate: float | None = None  # MTP drafts accepted / drafted (None: no drafting)
    tokens_per_step: float | None = None  # tokens per main-model forward while drafting


# ---- prompts -------------------------------------------------------------------------------


def wrap_tokenizer(tokenizer: Any) -> TokenizerWrapper:
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: Any, what: str) -> str:
    """`text` if it is a str that UTF-8 can encode; else ArgumentTypeError/ArgumentValueError
    naming `what`. A lone surrogate is what undecodable bytes become under Python's
    surrogateescape (sys.argv, os.listdir): it is not text and no tokenizer can encode it."""
    if not isinstance(text, str):
        raise ArgumentTypeError(f"{what}: must be a string, got {type(text).__name__}")
    m = _LONE_SURROGATE.search(text)
    if m:
        raise ArgumentValueError(
            f"{what}: contains a lone surrogate {m.group()!r} at index {m.start()}, which is not "
            "text (undecodable bytes?): decode the bytes with errors='replace' first"
        )
    return text


def check_int(value: Any, what: str, low: int, high: int | None = None) -> int:
    """`value` if it is an integer in [low, high]; else an error naming `what`."""
    rule = f">= {low}" if high is None else f"from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ArgumentTypeError(f"{what}={value!r}: must be an integer {rule}")
    if value < low or (high is not None and value > high):
        raise ArgumentValueError(f"{what}={value!r}: must be an integer {rule}")
    return int(value)


def _check_messages(messages: list) -> list[dict]:
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and "role" in m and "content" in m):
            raise ArgumentTypeError(
                f"prompt[{i}]: chat messages are dicts like "
                f'{{"role": "user", "content": "..."}}, got {type(m).__name__}'
            )
        check_text(m["role"], f"prompt[{i}]['role']")
        check_text(m["content"], f"prompt[{i}]['content']")
    return messages


def encode_prompt(
    tokenizer: Any,
    prompt: str | Sequence[int] | Sequence[dict] | mx.array,
    *,
    system: str | None = None,
    chat_format: Any = None,
    thinking: bool = False,
    model_config: dict | None = None,
) -> list[int]:
    """Prompt token ids from text (raw: exactly one BOS first when the tokenizer has one),
    ids, or chat messages.

    Messages (a list of {"role", "content"} dicts) go through the chat template: the
    checkpoint's own, else the built-in DeepSeek one (see mlx_deepseek.formats.templates).
    `system` prepends a system message (and turns a text prompt into a one-turn chat).
    Token ids are checked for type here; their range is checked against the model by
    `stream_generate` (decoding.check_token_ids).
    """
    if system is not None:
        check_text(system, "system")
    if isinstance(prompt, mx.array) or (hasattr(prompt, "dtype") and hasattr(prompt, "tolist")):
        return check_token_ids(prompt, None, check_range=False)  # an MLX or NumPy array of ids
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        if system is None:
            return _with_bos(tokenizer, list(tokenizer.encode(prompt, add_special_tokens=False)))
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, bytes) or not isinstance(prompt, Sequence):
        raise ArgumentTypeError(
            "prompt: give a string, a list of token ids, or a list of chat messages "
            f'({{"role": "user", "content": "..."}}), got {type(prompt).__name__}'
        )
    if not prompt or not isinstance(prompt[0], dict):
        return check_token_ids(prompt, None, check_range=False)
    messages = _check_messages(list(prompt))
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if chat_format is None:
        from .formats import chat_format as make_format

        chat_format = make_format(tokenizer, model_config or {})
    text = chat_format.render(tokenizer, messages, add_generation_prompt=True, thinking=thinking)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """Exactly one BOS first when the tokenizer has one (DeepSeek's tokenizer.json loads with
    add_bos_token False in transformers 5, so encode() alone would add none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if isinstance(bos, int) and (not ids or ids[0] != bos):
        return [bos, *ids]
    return ids


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [check_text(stop, "stop")]
    if isinstance(stop, bytes) or not isinstance(stop, Sequence):
        raise ArgumentTypeError(
            f"stop: give a string or a list of strings, got {type(stop).__name__}"
        )
    return [check_text(s, f"stop[{i}]") for i, s in enumerate(stop)]


class StopStrings:
    """Cuts the text at the first stop string; holds back text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---- the API -------------------------------------------------------------------------------


_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingSettings))
_DRAFTING_FIELDS = frozenset(f.name for f in fields(Drafting))


def _with_shorthand(
    sampling: SamplingSettings | None, drafting: Drafting | None, shorthand: dict[str, Any]
) -> tuple[SamplingSettings, Drafting]:
    """`sampling` and `drafting` (defaults when None) with the keyword shorthand applied,
    validated; an unknown keyword is a TypeError naming it and the accepted ones."""
    for name, value, kind in (
        ("sampling", sampling, SamplingSettings),
        ("drafting", drafting, Drafting),
    ):
        if value is not None and not isinstance(value, kind):
            raise ArgumentTypeError(
                f"{name}={value!r}: must be a {kind.__name__} (or None for the defaults)"
            )
    unknown = sorted(set(shorthand) - _SAMPLING_FIELDS - _DRAFTING_FIELDS)
    if unknown:
        accepted = ", ".join(sorted(_SAMPLING_FIELDS | _DRAFTING_FIELDS))
        raise ArgumentTypeError(
            f"stream_generate() got an unexpected keyword argument {unknown[0]!r} "
            f"(sampling and drafting keywords: {accepted})"
        )
    sampling = replace(
        sampling or SamplingSettings(),
        **{k: v for k, v in shorthand.items() if k in _SAMPLING_FIELDS},
    )
    drafting = replace(
        drafting or Drafting(),
        **{k: v for k, v in shorthand.items() if k in _DRAFTING_FIELDS},
    )
    return sampling.validated(), drafting.validated()


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int] | Sequence[dict] | mx.array,
    max_tokens: int = 256,
    *,
    sampling: SamplingSettings | None = None,
    drafting: Drafting | None = None,
    stop: str | Sequence[str] | None = None,
    system: str | None = None,
    thinking: bool = False,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: list | None = None,
    prior_tokens: Sequence[int] = (),
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prefill_progress: Callable[[int, int], None] | None = None,
    step_fn: StepFn | None = None,
    **shorthand: Any,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt`, yielding a GenerationResponse per token.

    prompt: text (used as is; BOS added unless present), token ids, or chat messages (the
    chat template is applied). prompt_cache: a cache from `make_cache(model)` that already
    holds earlier tokens (the prompt continues them) and is updated in place. Sampling:
    `sampling` (a SamplingSettings; greedy by default); `sampler` / `logits_processors`
    replace the ones built from it.
    stop: string(s) that end the answer (not included in the text). Raises DeepSeekError
    when the prompt does not fit the model's context.
    drafting: self-speculative decoding with the checkpoint's MTP head (a Drafting: `mtp`
    None is on where `speculative.mtp_by_default` says it pays off); responses then carry
    the acceptance rate and tokens per step. `step_fn` replaces the decoding loop entirely.
    Shorthand: any field of SamplingSettings or Drafting as a keyword (`temperature=0.6`,
    `mtp=True`) replaces that field of `sampling` / `drafting`.
    """
    max_tokens = check_int(max_tokens, "max_tokens", 1)
    prefill_step_size = check_int(prefill_step_size, "prefill_step_size", 1)
    sampling, drafting = _with_shorthand(sampling, drafting, shorthand)
    if not isinstance(thinking, bool):
        raise ArgumentTypeError(f"thinking={thinking!r}: must be True or False")
    stops = StopStrings(_stop_strings(stop))
    tokenizer = wrap_tokenizer(tokenizer)
    args = getattr(model, "args", None)
    config = {"model_type": getattr(args, "model_type", None)}
    tokens = encode_prompt(tokenizer, prompt, system=system, thinking=thinking, model_config=config)
    if not tokens:
        raise ArgumentValueError("the prompt is empty: give at least one token")
    tokens = check_token_ids(tokens, vocab_size(model), "prompt")
    prior_tokens = check_token_ids(prior_tokens, vocab_size(model), "prior_tokens")

    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    used = cache_length(cache)
    limit = context_length(model)
    if limit is not None:
        if used + len(tokens) >= limit:
            held = f" + {used} already in the conversation" if used else ""
            raise ArgumentValueError(
                f"the prompt is {len(tokens)} tokens{held}, but the model's context holds "
                f"{limit} (max_position_embeddings) and needs room to answer: shorten the "
                "prompt" + (" or start a new conversation" if used else "")
            )
        max_tokens = min(max_tokens, limit - used - len(tokens))

    seed_rng(sampling.seed)
    opts = StepOptions(
        sampler=sampler or make_sampler(sampling),
        logits_processors=(
            logits_processors if logits_processors is not None else make_logits_processors(sampling)
        ),
        max_tokens=max_tokens,
        prefill_step_size=prefill_step_size,
        prior_tokens=prior_tokens,
        prefill_progress=prefill_progress,
    )
    if step_fn is None:
        step_fn = mtp_step_fn(model, cache, drafting.mtp, drafting.draft_tokens, sampling)
    stats = getattr(step_fn, "stats", None)
    steps = (step_fn or decode_steps)(model, mx.array(tokens), cache, opts)
    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer

    tic = time.perf_counter()
    prompt_tps = 0.0
    t_first = tic
    n = 0
    try:
        for step in steps:
            n += 1
            now = time.perf_counter()
            if n == 1:
                prompt_tps = len(tokens) / max(now - tic, 1e-9)
                t_first = now
            finish = None
            if step.token in eos:
                detok.finalize()
                text, _ = stops.feed(detok.last_segment)
                text += stops.flush()
                finish = "stop"
            else:
                detok.add_token(step.token)
                text, hit = stops.feed(detok.last_segment)
                if hit:
                    finish = "stop"
                elif n >= max_tokens:
                    detok.finalize()
                    more, hit = stops.feed(detok.last_segment)
                    text += more + ("" if hit else stops.flush())
                    finish = "stop" if hit else "length"
            yield GenerationResponse(
                text=text,
                token=step.token,
                logprobs=step.logprobs,
                from_draft=step.from_draft,
                prompt_tokens=len(tokens),
                prompt_tps=prompt_tps,
                generation_tokens=n,
                generation_tps=(n - 1) / (now - t_first) if n > 1 and now > t_first else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
                acceptance_rate=stats.acceptance_rate if stats else None,
                tokens_per_step=stats.tokens_per_step if stats else None,
            )
            if finish is not None:
                return
    finally:
        steps.close()


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int] | Sequence[dict] | mx.array,
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """The whole answer as one string (see `stream_generate` for the options)."""
    text = []
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text.append(response.text)
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print()
        print(
            f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s; "
            f"generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.1f} tokens/s; peak memory {response.peak_memory:.2f} GB"
        )
    return "".join(text)
