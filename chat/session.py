"""A chat conversation without I/O: messages, the KV cache kept between turns, reasoning, stats.

The cache always holds exactly `session.tokens`. Each turn renders the whole conversation
with the chat template, keeps the longest run of cached tokens whose text is a prefix of
it, trims the cache there, and prefills only the rest. So turn N prefills just the new
user message and the template's glue (no BOS or system prompt again), except where the
history really differs from what the model saw: DeepSeek's templates drop the reasoning
(`<think>...</think>`) from past answers, so after a reasoning turn the cache is cut back
to the start of that answer and the answer alone is prefilled again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_deepseek.decoding import (
    DEFAULT_PREFILL_STEP_SIZE,
    StepFn,
    cache_length,
    can_trim_cache,
    context_length,
    make_cache,
    trim_cache,
    vocab_size,
)
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.formats import (
    ChatFormat,
    OutputParser,
    chat_format,
    starts_in_reasoning,
)
from mlx_deepseek.generation import stream_generate
from mlx_deepseek.models.cache import adopt_cache
from mlx_deepseek.offload import ExpertCacheStats
from mlx_deepseek.sampling import SamplingSettings
from mlx_deepseek.speculative import Drafting

from .session_file import load_source, read_session, save_target, write_session

DEFAULT_MAX_TOKENS = (
    4096  # longest answer unless the user says otherwise (or the context is shorter)
)
_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "kv_lora_rank")


class Interrupted(Exception):
    """Raised by a prefill-progress callback to stop a turn between prefill chunks."""


@dataclass
class Chunk:
    kind: str  # "reasoning" or "answer"
    text: str


@dataclass
class TurnStats:
    prompt_tokens: int  # prefilled this turn
    reused_tokens: int  # kept from the cache
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    context_tokens: int  # in the cache after the turn
    context_limit: int | None
    finish_reason: str  # "stop", "length" or "interrupted"
    seconds: float
    kept: bool = True  # the turn is in the history (an interrupted one without answer is not)
    acceptance_rate: float | None = None  # MTP drafts accepted (None: no drafting)
    tokens_per_step: float | None = None
    expert_cache: ExpertCacheStats | None = None  # streamed experts while decoding


@dataclass
class SessionTotals:
    turns: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


class ReasoningSplitter:
    """Streamed text -> reasoning / answer Chunks, on the formats' OutputParser (one parser).

    in_reasoning: the prompt opened the block (R1, V3.1 thinking). detect: else, treat a
    `<think>` the model writes first as opening it. Tool-call markup stays answer text (the
    chat declares no tools, and the history must keep the model's exact text).
    """

    def __init__(self, in_reasoning: bool, detect: bool = True):
        self.parser = OutputParser(None, in_reasoning, detect_reasoning=detect)

    @property
    def reasoning(self) -> str:
        return self.parser.reasoning

    @property
    def answer(self) -> str:
        return self.parser.content

    def feed(self, text: str) -> list[Chunk]:
        return self._chunks(self.parser.feed(text))

    def flush(self) -> list[Chunk]:
        return self._chunks(self.parser.finish())

    @staticmethod
    def _chunks(events: list) -> list[Chunk]:
        return [Chunk("reasoning" if e.kind == "reasoning" else "answer", e.text) for e in events]


def _prefill_check(
    stop: Callable[[], bool] | None, progress: Callable[[int, int], None] | None
) -> Callable[[int, int], None] | None:
    if stop is None and progress is None:
        return None

    def check(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if stop is not None and done < total and stop():
            raise Interrupted

    return check


def no_thinking_switch(fmt: ChatFormat, asked: str) -> DeepSeekError:
    """Why `asked` (/think, --think) does not apply to this chat format: the same words in
    the chat and in `generate`. A model without a switch may still reason on its own (R1
    always does; fine-tunes and the demo may): the words must not deny it."""
    if fmt.family == "r1":
        why = "always reasons before it answers; there is no switch to turn"
    else:
        why = (
            "has no thinking switch (V3.1's has one); reasoning the model writes on its own "
            "is still shown"
        )
    return DeepSeekError(f"{asked}: this model's chat format ({fmt.family}) {why}")


@dataclass
class _Turn:
    """What one respond() call produced (kept for /stats and save files)."""

    reasoning: str = ""
    answer: str = ""
    tokens: list[int] = field(default_factory=list)


class ChatSession:
    """A conversation with one model: send messages with `respond`, which streams Chunks."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        fmt: ChatFormat | None = None,
        config: dict[str, Any] | None = None,
        name: str = "",
        system: str | None = None,
        settings: SamplingSettings | None = None,
        max_tokens: int | None = None,
        thinking: bool = False,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        step_fn: StepFn | None = None,
        mtp: bool | None = None,
        draft_tokens: int | None = None,
    ):
        from mlx_deepseek.generation import wrap_tokenizer

        self.model = model
        self.tokenizer = wrap_tokenizer(tokenizer)
        self.name = name
        if fmt is None:
            config = dict(config or {})
            config.setdefault(
                "model_type", getattr(getattr(model, "args", None), "model_type", None)
            )
            fmt = chat_format(self.tokenizer, config, name)
        self.fmt = fmt
        self.settings = (
            settings or SamplingSettings(temperature=fmt.temperature, top_p=fmt.top_p)
        ).validated()
        self.system = system
        self.context_limit = context_length(model)
        self.max_tokens = self._max_tokens(max_tokens)
        self.thinking = thinking
        self.prefill_step_size = prefill_step_size
        self.step_fn = step_fn  # replaces the decoding loop (tests); None: stream_generate's
        self.mtp = mtp  # MTP self-speculative decoding: None = the default for this device
        self.draft_tokens = draft_tokens
        self.messages: list[dict[str, str]] = []
        self.reasoning: dict[int, str] = {}  # message index -> its reasoning (display, saves)
        self.tokens: list[int] = []  # exactly what the cache holds
        self.cache = make_cache(model)
        self._text: str | None = ""  # decode(self.tokens), computed lazily
        self.last: TurnStats | None = None
        self.totals = SessionTotals()

    def _max_tokens(self, given: int | None) -> int:
        """`given`, or the default: DEFAULT_MAX_TOKENS, at most the model's context."""
        if given is not None:
            return given
        return min(DEFAULT_MAX_TOKENS, self.context_limit or DEFAULT_MAX_TOKENS)

    # ---- conversation ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self.messages, self.reasoning = [], {}
        self.tokens, self._text = [], ""
        self.cache = make_cache(self.model)
        self.last = None

    def set_system(self, text: str | None) -> None:
        """Change the system prompt; the next turn re-prefills from where it changed."""
        self.system = text or None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the template sees them (system prompt first)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.fmt.render(self.tokenizer, messages, add_generation_prompt, self.thinking)

    def respond(
        self,
        user_text: str,
        stop: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[Chunk]:
        """Send a user message; yields the reply as reasoning / answer Chunks.

        Stop early with `stop` (polled after every prefill chunk and every token; e.g. a
        Ctrl-C flag) or by closing the generator: the partial answer is kept in the history
        and the cache stays consistent with it. When nothing of the answer was produced yet,
        the turn is dropped. `progress(done, total)` follows a long prefill. Stats land in
        `self.last`.
        """
        if not user_text.strip():
            raise DeepSeekError("the message is empty")
        messages = self.conversation() + [{"role": "user", "content": user_text}]
        prompt_text = self.render(messages, add_generation_prompt=True)
        reused, delta = self._sync(prompt_text)
        if self.context_limit is not None and reused + len(delta) >= self.context_limit:
            raise DeepSeekError(
                f"the conversation is {reused + len(delta)} tokens with this message, but the "
                f"model's context holds {self.context_limit}: /reset to start over, or send a "
                "shorter message"
            )
        splitter = self._splitter(prompt_text)
        turn = _Turn()
        finish = "interrupted"
        last = None
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        stream = stream_generate(
            self.model,
            self.tokenizer,
            delta,
            self.max_tokens,
            sampling=self.settings,
            drafting=Drafting(self.mtp, self.draft_tokens),
            prompt_cache=self.cache,
            prior_tokens=self.tokens,  # the repetition penalty and MTP drafting look back
            prefill_step_size=self.prefill_step_size,
            prefill_progress=_prefill_check(stop, progress),
            step_fn=self.step_fn,
        )
        try:
            for r in stream:
                last = r
                turn.tokens.append(r.token)
                yield from splitter.feed(r.text)
                if r.finish_reason is not None:
                    finish = r.finish_reason
                    yield from splitter.flush()
                elif stop is not None and stop():
                    break
        except Interrupted:
            pass
        finally:
            stream.close()
            # The history takes its text from the tokens, not from the streamed pieces: the
            # streaming detokenizer may trim a leading space or mend bytes differently than a
            # full decode, and the cache must match the history's text exactly.
            generated = turn.tokens
            if generated and generated[-1] in self.tokenizer.eos_token_ids:
                generated = generated[:-1]
            split = self._splitter(prompt_text)
            split.feed(self._decode(generated))
            split.flush()
            turn.reasoning, turn.answer = split.reasoning, split.answer
            self._commit(messages, delta, turn, finish, last, reused, t0)

    def _splitter(self, prompt_text: str) -> ReasoningSplitter:
        # any family: an answer that opens with <think> is reasoning (R1-style fine-tunes of
        # V3, the bundled demo), shown apart and kept out of the history
        return ReasoningSplitter(starts_in_reasoning(prompt_text), detect=True)

    # ---- cache bookkeeping -----------------------------------------------------------------

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(
            tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _cached_text(self) -> str:
        if self._text is None:
            self._text = self._decode(self.tokens)
        return self._text

    def _cached_prefix(self, prompt_text: str) -> tuple[int, str]:
        """The longest run of cached tokens whose text `prompt_text` starts with (count, text)."""
        cached = self._cached_text()
        if prompt_text.startswith(cached):
            return len(self.tokens), cached
        lo, hi = 0, len(self.tokens)  # invariant: tokens[:lo] decodes to a prefix
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if prompt_text.startswith(self._decode(self.tokens[:mid])):
                lo = mid
            else:
                hi = mid - 1
        return lo, self._decode(self.tokens[:lo])

    def _sync(self, prompt_text: str) -> tuple[int, list[int]]:
        """Trim the cache to its longest prefix that `prompt_text` continues; the new tokens."""
        keep, keep_text = self._cached_prefix(prompt_text)
        if keep and keep_text == prompt_text:  # nothing new: recompute the last token's logits
            keep -= 1
            keep_text = self._decode(self.tokens[:keep])
        if keep and not can_trim_cache(self.cache, keep):
            keep, keep_text = 0, ""  # the cache cannot roll back that far (V4): prefill anew
        self._truncate(keep, keep_text)
        delta = self.tokenizer.encode(prompt_text[len(keep_text) :], add_special_tokens=False)
        return keep, list(delta)

    def _trim_to_history(self) -> None:
        """Keep in the cache what the next turn will reuse: the tokens the template renders
        the same way in front of any next message (not the reasoning it drops, nor tokens
        it writes differently), so that the stats line's context is the next turn's cached
        count. The probe stands for the next message: a private-use character no cached
        text ends with."""
        probe = [{"role": "user", "content": "\ue000"}]
        keep, text = self._cached_prefix(self.render(self.conversation() + probe, True))
        if keep < len(self.tokens) and not can_trim_cache(self.cache, keep):
            keep, text = 0, ""  # as the next turn will (_sync): the cache cannot roll back
        self._truncate(keep, text)

    def _truncate(self, keep: int, text: str | None = None) -> None:
        trim_cache(self.cache, keep)
        self.tokens = self.tokens[:keep]
        self._text = text

    def _commit(
        self,
        messages: list[dict[str, str]],
        delta: list[int],
        turn: _Turn,
        finish: str,
        last: Any,
        reused: int,
        t0: float,
    ) -> None:
        known = self.tokens + delta + turn.tokens
        keep = min(cache_length(self.cache), len(known))
        self.tokens = known
        self._truncate(keep)
        answered = finish != "interrupted" or turn.answer.strip()
        if answered:
            content = self._pick_content(messages, turn.answer)
            head = 1 if self.system else 0
            self.messages = messages[head:] + [{"role": "assistant", "content": content}]
            if turn.reasoning:
                self.reasoning[len(self.messages) - 1] = turn.reasoning
        prefilled = max(0, min(keep, reused + len(delta)) - reused)
        if answered:  # a dropped turn keeps its prefill for the message sent again
            self._trim_to_history()
        self.totals.prompt_tokens += prefilled
        self.totals.generation_tokens += len(turn.tokens)
        self.totals.turns += 1 if answered else 0
        seconds = time.perf_counter() - t0
        self.last = TurnStats(
            prompt_tokens=prefilled if last is None else last.prompt_tokens,
            reused_tokens=reused,
            prompt_tps=last.prompt_tps if last else prefilled / max(seconds, 1e-9),
            generation_tokens=len(turn.tokens),
            generation_tps=last.generation_tps if last else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            context_tokens=len(self.tokens),
            context_limit=self.context_limit,
            finish_reason=finish,
            seconds=seconds,
            kept=bool(answered),
            acceptance_rate=last.acceptance_rate if last else None,
            tokens_per_step=last.tokens_per_step if last else None,
            expert_cache=last.expert_cache if last else None,
        )

    def _pick_content(self, messages: list[dict[str, str]], answer: str) -> str:
        """The answer as stored in the history: as generated, unless the template adds its own
        separator (V2's 'Assistant: ') so that a stripped copy matches what the model saw."""
        stripped = answer.lstrip()
        if stripped == answer:
            return answer
        cached = self._cached_text()

        def shared(content: str) -> int:
            text = self.render(messages + [{"role": "assistant", "content": content}], False)
            return len(os.path.commonprefix([text, cached]))

        return stripped if shared(stripped) > shared(answer) else answer

    # ---- settings --------------------------------------------------------------------------

    def set_thinking(self, on: bool) -> None:
        if not self.fmt.has_thinking_switch:
            raise no_thinking_switch(self.fmt, "/think")
        self.thinking = on

    # ---- save / load -----------------------------------------------------------------------

    def _arch(self) -> dict[str, Any]:
        args = getattr(self.model, "args", None)
        return {k: getattr(args, k, None) for k in _ARCH_FIELDS}

    def save(self, name: str | os.PathLike) -> Path:
        """Write the conversation and its cache to one .safetensors file (NAME gets the
        suffix unless it has it), atomically: an existing file is replaced whole or not at
        all. Returns the path written."""
        path, _ = save_target(name)
        if not all(getattr(c, "savable", True) for c in self.cache):
            raise DeepSeekError(
                f"{path}: this model's cache (DeepSeek V3.2 / V4) cannot be saved to a session "
                "file yet"
            )
        state = {
            "model": self.name,
            "arch": self._arch(),
            "family": self.fmt.family,
            "system": self.system,
            "messages": self.messages,
            "reasoning": {str(k): v for k, v in self.reasoning.items()},
            "tokens": self.tokens,
            "settings": asdict(self.settings),
            "max_tokens": self.max_tokens,
            "thinking": self.thinking,
            "totals": asdict(self.totals),
        }
        write_session(path, self.cache, state)
        return path

    def load(self, name: str | os.PathLike) -> Path:
        """Replace this conversation with one saved by `save` (same model architecture);
        the file is checked whole first, so a bad one leaves the conversation as it was.
        Returns the path read."""
        path = load_source(name)
        args = getattr(self.model, "args", None)
        dims = (getattr(args, "kv_lora_rank", None), getattr(args, "qk_rope_head_dim", None))
        saved = read_session(path, self._arch(), vocab_size(self.model), dims)
        fresh = make_cache(self.model)  # the model's own cache type (it may carry MTP state)
        if not all(getattr(c, "savable", True) for c in fresh):
            raise DeepSeekError(
                f"{path}: this model's cache (DeepSeek V4) cannot be loaded from a session file yet"
            )
        if len(saved.layers) != len(fresh):
            raise DeepSeekError(
                f"{path}: its cache has {len(saved.layers)} layers, this model {len(fresh)}"
            )
        for i, layer in enumerate(saved.layers):  # full precision or quantized, as this model
            fresh[i] = adopt_cache(fresh[i], *layer)
        trim_cache(fresh, len(saved.tokens))
        self.cache, self.tokens, self._text = fresh, saved.tokens, None
        self.system = saved.system
        self.messages = saved.messages
        self.reasoning = saved.reasoning
        self.settings = saved.settings
        self.max_tokens = self._max_tokens(saved.max_tokens)
        if self.fmt.has_thinking_switch:
            self.thinking = saved.thinking
        known = {f.name for f in fields(SessionTotals)}
        self.totals = SessionTotals(**{k: v for k, v in saved.totals.items() if k in known})
        self.last = None
        return path
