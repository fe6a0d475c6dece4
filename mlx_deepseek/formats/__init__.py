"""Chat formats: every family's prompt encoding, reasoning and tool calls; tokenizers.

Public API (what the chat, the CLI and the server use):

    fmt = chat_format(tokenizer, config, name)       # ChatFormat for a checkpoint
    fmt.family, fmt.temperature, fmt.top_p, fmt.has_thinking_switch, fmt.tool_format
    text = fmt.render(tokenizer, messages, add_generation_prompt=True, thinking=False,
                      tools=None)                     # OpenAI-style messages and tools
    parser = fmt.output_parser(starts_in_reasoning(text))
    parser.feed(chunk) -> list[Event]; parser.finish() -> list[Event]
        Event.kind: "reasoning" | "content" | "tool_call" (Event.name, Event.arguments: a
        JSON object as text, Event.id)
    load_tokenizer(path)                              # HF or Kimi tiktoken, one-line errors

messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str | None,
"reasoning_content": str (assistant), "tool_calls": [{"id", "type": "function",
"function": {"name", "arguments": JSON text}}] (assistant), "tool_call_id" (tool)}].
Bad messages raise DeepSeekError naming the field; a failing or runaway checkpoint
template raises TemplateRenderError (a CheckpointError).

Modules: families (detection, sampling defaults), templates (built-in Jinja formats),
dsml (V3.2 / V4 encoders), toolcalls (call syntax per format), parser (streaming parser),
sandbox (limited Jinja rendering), chat (ChatFormat), tokenizer / tiktoken_tokenizer.
"""

from .chat import (
    ChatFormat,
    chat_format,
    normalize_messages,
    normalize_tools,
    read_model_config,
    starts_in_reasoning,
)
from .families import FAMILIES, THINK_END, THINK_START, detect_family
from .parser import Event, OutputParser
from .sandbox import Limits, TemplateRenderError
from .templates import BUILTIN_TEMPLATES
from .tokenizer import load_tokenizer

__all__ = [
    "BUILTIN_TEMPLATES",
    "FAMILIES",
    "THINK_END",
    "THINK_START",
    "ChatFormat",
    "Event",
    "Limits",
    "OutputParser",
    "TemplateRenderError",
    "chat_format",
    "detect_family",
    "load_tokenizer",
    "normalize_messages",
    "normalize_tools",
    "read_model_config",
    "starts_in_reasoning",
]
