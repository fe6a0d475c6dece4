"""Between the HTTP messages and the model: prompts from OpenAI-style messages, and the model's
text split into reasoning, answer and tool calls, through the checkpoint's chat format
(mlx_deepseek.formats: the family's encoder or the checkpoint's own template).

A thin adapter: where the format offers a streaming output parser (`fmt.output_parser`),
its events are used as they are; otherwise the text is split at `<think>`/`</think>` only
(chat.session.ReasoningSplitter) and no tool calls are recognised.
"""

from __future__ import annotations

import inspect
import json
import uuid
from dataclasses import dataclass
from typing import Any

from ..chat.session import ReasoningSplitter
from ..errors import DeepSeekError
from ..formats.templates import ChatFormat, starts_in_reasoning
from .protocol import Message, RequestError


@dataclass
class Event:
    """A piece of the answer: kind "reasoning" / "content" (text), or "tool_call"."""

    kind: str
    text: str = ""
    name: str = ""
    arguments: str = ""  # a JSON object, as text
    id: str = ""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def to_template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI / Ollama messages -> the dicts chat templates read (tool-call arguments as
    JSON text, Ollama's `thinking` as `reasoning_content`, `developer` as `system`)."""
    out = []
    for i, m in enumerate(messages):
        if m.images:
            raise RequestError(
                "this model reads text only: images are not supported", f"messages[{i}].images"
            )
        d: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.content or "",
        }
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id or ""
            if m.name:
                d["name"] = m.name
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args = c.function.arguments
                if isinstance(args, dict):
                    args = json.dumps(args, ensure_ascii=False)
                calls.append(
                    {
                        "id": c.id or new_call_id(),
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": args},
                    }
                )
            d["tool_calls"] = calls
        reasoning = m.reasoning_content or m.thinking
        if reasoning and m.role == "assistant":
            d["reasoning_content"] = reasoning
        out.append(d)
    return out


class ChatAdapter:
    """One checkpoint's format: `render` builds prompts, `parser` splits the output."""

    def __init__(self, tokenizer: Any, fmt: ChatFormat):
        self.tokenizer = tokenizer
        self.fmt = fmt
        params = inspect.signature(fmt.render).parameters
        self.renders_tools = "tools" in params
        self.parses_tools = hasattr(fmt, "output_parser")

    @property
    def has_thinking_switch(self) -> bool:
        return bool(getattr(self.fmt, "has_thinking_switch", False))

    def render(
        self,
        messages: list[dict[str, Any]],
        thinking: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text; RequestError naming `messages` / `tools` when it cannot be built."""
        kwargs: dict[str, Any] = {"thinking": thinking}
        if tools:
            if not self.renders_tools:
                raise RequestError(
                    f"tools: this server cannot write tool definitions into a {self.fmt.family} "
                    "prompt yet; send the request without tools",
                    "tools",
                )
            kwargs["tools"] = tools
        try:
            return self.fmt.render(self.tokenizer, messages, True, **kwargs)
        except DeepSeekError as e:
            raise RequestError(str(e), "messages") from None

    def parser(self, prompt_text: str) -> OutputParser:
        return OutputParser(self.fmt, starts_in_reasoning(prompt_text), self.parses_tools)


class OutputParser:
    """Streaming: feed(text) -> Events, finish() -> the rest. Never raises on odd text."""

    def __init__(self, fmt: ChatFormat, in_reasoning: bool, use_format: bool):
        self._inner = fmt.output_parser(in_reasoning) if use_format else None
        self._split = None if use_format else ReasoningSplitter(in_reasoning, detect=True)

    def feed(self, text: str) -> list[Event]:
        if self._inner is not None:
            return [_event(e) for e in self._inner.feed(text)]
        return [_chunk(c) for c in self._split.feed(text)]

    def finish(self) -> list[Event]:
        if self._inner is not None:
            return [_event(e) for e in self._inner.finish()]
        return [_chunk(c) for c in self._split.flush()]


def _chunk(chunk: Any) -> Event:
    return Event("reasoning" if chunk.kind == "reasoning" else "content", chunk.text)


def _event(e: Any) -> Event:
    """The format's event -> ours (attribute names as the formats package defines them)."""
    kind = getattr(e, "kind", "content")
    if kind == "tool_call":
        args = getattr(e, "arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        return Event(
            "tool_call", name=getattr(e, "name", ""), arguments=args, id=getattr(e, "id", "") or ""
        )
    return Event(kind, getattr(e, "text", ""))
