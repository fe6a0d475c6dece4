"""Between the HTTP messages and the model: prompts from OpenAI-style messages, and the model's
text split into reasoning, answer and tool calls, through the checkpoint's chat format
(mlx_deepseek.formats: the family's encoder or the checkpoint's own template, and its
streaming output parser).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..errors import DeepSeekError
from ..formats import ChatFormat, Event, OutputParser, starts_in_reasoning
from .protocol import Message, RequestError

__all__ = ["ChatAdapter", "Event", "OutputParser", "new_call_id", "to_template_messages"]


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

    @property
    def has_thinking_switch(self) -> bool:
        return bool(self.fmt.has_thinking_switch)

    def render(
        self,
        messages: list[dict[str, Any]],
        thinking: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text; RequestError naming the field when it cannot be built."""
        try:
            return self.fmt.render(self.tokenizer, messages, True, thinking=thinking, tools=tools)
        except DeepSeekError as e:
            text = str(e)
            param = text.split(":", 1)[0] if text.startswith(("messages", "tools")) else "messages"
            raise RequestError(text, param) from None

    def parser(self, prompt_text: str) -> OutputParser:
        """A streaming parser for one answer: feed(text) / finish() -> Events; never raises."""
        return self.fmt.output_parser(starts_in_reasoning(prompt_text))
