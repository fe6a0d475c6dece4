"""From the engine's tokens to text pieces: the streaming detokenizer, stop strings, the chat
parser (reasoning / content / tool calls) and log-probabilities, per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..generation import StopStrings
from .chat import Event, OutputParser
from .engine import Handle, Usage


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class Piece:
    """What one token added: events (possibly none: text held back) and its logprob."""

    events: list[Event] = field(default_factory=list)
    logprob: TokenLogprob | None = None


@dataclass
class Done:
    finish_reason: str  # "stop", "length", "tool_calls", "cancelled" or "error"
    usage: Usage
    error: str | None = None


class _Framing:
    """Drops the line breaks that frame the blocks, as DeepSeek's API does: at the start of
    the reasoning and of the answer, and before `</think>` ("<think>\\n...\\n</think>\\n\\n").
    Trailing line breaks of the reasoning are held until more reasoning follows them."""

    def __init__(self) -> None:
        self.started: set[str] = set()
        self.held = ""  # line breaks at the end of the reasoning so far

    def __call__(self, events: list[Event]) -> list[Event]:
        out = []
        for e in events:
            if e.kind in ("reasoning", "content"):
                text = e.text if e.kind in self.started else e.text.lstrip("\r\n")
                if e.kind == "reasoning":
                    text = self.held + text
                    body = text.rstrip("\r\n")
                    self.held, text = text[len(body) :], body
                else:
                    self.held = ""  # the reasoning is over: its last line breaks go
                if not text:
                    continue
                self.started.add(e.kind)
                e = Event(e.kind, text)
            out.append(e)
        return out


class _TokenText:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.memo: dict[int, str] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        text = self.memo.get(token)
        if text is None:
            text = self.tokenizer.decode([token])
            self.memo[token] = text
        return text, list(text.encode("utf-8", errors="replace"))


async def pieces(
    handle: Handle,
    tokenizer: Any,
    stops: list[str],
    parser: OutputParser | None,
    stop_ids: frozenset[int],
) -> AsyncIterator[Piece | Done]:
    """The answer of a submitted request as Pieces, then one Done. A stop string ends it (the
    engine is told to stop); text after it is dropped."""
    detok = tokenizer.detokenizer
    stop = StopStrings(stops)
    token_text = _TokenText(tokenizer)
    completion = 0
    saw_tool = False
    framing = _Framing() if parser is not None else (lambda events: events)

    def parse(text: str) -> list[Event]:
        nonlocal saw_tool
        if not text:
            return []
        events = parser.feed(text) if parser is not None else [Event("content", text)]
        saw_tool = saw_tool or any(e.kind == "tool_call" for e in events)
        return framing(events)

    def tail() -> list[Event]:
        nonlocal saw_tool
        events = parser.finish() if parser is not None else []
        saw_tool = saw_tool or any(e.kind == "tool_call" for e in events)
        return framing(events)

    async for ev in handle:
        if ev.finish is not None:
            detok.finalize()
            text, hit = stop.feed(detok.last_segment)
            text += "" if hit else stop.flush()
            events = parse(text) + tail()
            if events:
                yield Piece(events)
            usage = ev.usage or Usage(0, 0, completion)
            usage.completion_tokens = completion
            finish = "stop" if hit else ev.finish
            if finish == "stop" and saw_tool:
                finish = "tool_calls"
            yield Done(finish, usage, ev.error)
            return
        completion += 1
        lp = None
        if ev.logprob is not None:
            text, raw = token_text(ev.token)
            top = [(*token_text(t), lp_) for t, lp_ in ev.top or []]
            lp = TokenLogprob(text, ev.logprob, raw, [(s, v, b) for s, b, v in top])
        if ev.token in stop_ids:
            continue  # its Done follows: EOS adds no text
        detok.add_token(ev.token)
        text, hit = stop.feed(detok.last_segment)
        if hit:
            handle.cancel()
            events = parse(text) + tail()
            yield Piece(events, lp)
            finish = "tool_calls" if saw_tool else "stop"
            async for last in handle:  # the engine's own end: the usage it counted
                if last.finish is not None:
                    usage = last.usage or Usage(0, 0, completion)
                    usage.completion_tokens = completion
                    yield Done(finish, usage)
            return
        yield Piece(parse(text), lp)
