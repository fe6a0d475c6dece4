"""DeepSeek V3.2 and V4 prompt encoders (no Jinja template ships with either).

Written from DeepSeek's documented format (the `encoding/` folder of DeepSeek-V3.2 and
DeepSeek-V4's encoding_dsv4.py), for OpenAI-style messages already checked by
chat.normalize_messages:

V3.2 (`encode_v32`): BOS, the system text (tools appended as a "## Tools" block), each
user turn `<｜User｜>{u}<｜Assistant｜>` then `<think>` (the last user turn, thinking on)
or `</think>`; an assistant turn `{reasoning}</think>` (thinking on, after the last user
turn only: earlier reasoning is dropped) + content + `\\n\\n<｜DSML｜function_calls>...` +
EOS; tool results `\\n\\n<function_results>\\n<result>...</result>...\\n</function_results>`
followed by `\\n\\n<think>` / `\\n\\n</think>`.

V4 (`encode_v4`): BOS, system text (+ "## Tools" block), `<｜User｜>{u}` and after the
last message of a user turn `<｜Assistant｜>` + `<think>` / `</think>`; tool results go
back inside the user turn as `<tool_result>...</tool_result>` blocks (joined by blank
lines, in the order of the calls); assistant turns as V3.2 with `<｜DSML｜tool_calls>`;
reasoning of turns before the last user message is dropped, unless tools are declared
(DeepSeek keeps every turn's reasoning then).

Deliberate leniency: DeepSeek's encoder refuses an assistant turn after the last user
message without reasoning in thinking mode; here it renders with empty reasoning (the
chat renders such turns to compare histories).
"""

from __future__ import annotations

import json
from typing import Any

from mlx_deepseek.errors import DeepSeekError

from .families import THINK_END, THINK_START
from .toolcalls import DSML, dsml_calls

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

_V32_TOOLS = """## Tools
You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{d}function_calls>" block like the following as part \
of your reply to the user:
<{d}function_calls>
<{d}invoke name="$FUNCTION_NAME">
<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>
...
</{d}invoke>
<{d}invoke name="$FUNCTION_NAME2">
...
</{d}invoke>
</{d}function_calls>
String and scalar parameters should be specified as is without any escaping or quotes, while \
lists and objects should use JSON format. The "string" attribute should be set to "true" for \
string type parameters and "false" for other types (numbers, booleans, arrays, objects).
If the thinking_mode is enabled, then after function results you should strongly consider \
outputting a thinking block. Here is an example:
<{d}function_calls>
...
</{d}function_calls>
<function_results>
...
</function_results>
{ts}...thinking about results{te}
Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""

_V4_TOOLS = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools \
by writing a "<{d}tool_calls>" block like the following:

<{d}tool_calls>
<{d}invoke name="$TOOL_NAME">
<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>
...
</{d}invoke>
<{d}invoke name="$TOOL_NAME2">
...
</{d}invoke>
</{d}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types \
(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {ts}), you MUST output your complete reasoning \
inside {ts}...{te} BEFORE any tool calls or final response.

Otherwise, output directly after {te} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


def _system(m: dict[str, Any], template: str) -> str:
    """A system turn: its text, then the tools' section (template) when it carries tools."""
    text = m.get("content") or ""
    if not m.get("tools"):
        return text
    schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in m["tools"])
    return text + "\n\n" + template.format(d=DSML, ts=THINK_START, te=THINK_END, schemas=schemas)


def _last_user(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    return -1


def _with_tools_system(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Tools ride on the first system message (one is added, empty, when there is none)."""
    if not tools:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "tools": tools}, *messages[1:]]
    return [{"role": "system", "content": "", "tools": tools}, *messages]


def _assistant(m: dict[str, Any], reasoning: str | None, block: str) -> str:
    calls = m.get("tool_calls") or []
    think = "" if reasoning is None else reasoning + THINK_END
    tail = f"\n\n{dsml_calls(calls, block)}" if calls else ""
    return f"{think}{m.get('content') or ''}{tail}{EOS}"


def encode_v32(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
) -> str:
    """DeepSeek-V3.2's prompt for `messages` (see the module docstring)."""
    messages = _with_tools_system(messages, tools)
    last_user = _last_user(messages)
    out = [BOS]
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            out.append(_system(m, _V32_TOOLS))
        elif role == "user":
            last = i == last_user and thinking
            out.append(f"{USER}{m.get('content') or ''}{ASSISTANT}")
            out.append(THINK_START if last else THINK_END)
        elif role == "tool":
            j = i - 1
            while j >= 0 and messages[j]["role"] == "tool":
                j -= 1
            calls = messages[j].get("tool_calls") or [] if j >= 0 else []
            order = i - j
            if j < 0 or messages[j]["role"] != "assistant" or len(calls) < order:
                raise DeepSeekError(
                    f"messages[{i}]: a tool result without a matching assistant tool call "
                    "before it (V3.2 needs one call per result)"
                )
            if order == 1:
                out.append("\n\n<function_results>")
            out.append(f"\n<result>{m.get('content') or ''}</result>")
            if order == len(calls):
                out.append("\n</function_results>")
                out.append("\n\n" + (THINK_START if thinking and i >= last_user else THINK_END))
        else:  # assistant
            keep = thinking and i > last_user
            out.append(
                _assistant(
                    m, (m.get("reasoning_content") or "") if keep else None, "function_calls"
                )
            )
    return _prompt(out, add_generation_prompt)


def _merge_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """V4 has no tool role: results (in call order) join the user turn, as content blocks."""
    merged: list[dict[str, Any]] = []
    order: dict[str, int] = {}
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            order = {c["id"]: k for k, c in enumerate(m["tool_calls"]) if c.get("id")}
        if role == "tool":
            block = ("tool", m.get("content") or "", m.get("tool_call_id") or "")
        elif role == "user":
            block = ("text", m.get("content") or "", "")
        else:
            merged.append(m)
            continue
        if merged and merged[-1]["role"] == "user":  # consecutive user-side turns join
            merged[-1]["blocks"].append(block)
            continue
        merged.append({"role": "user", "blocks": [block], "order": order})
    for m in merged:
        tools = [b for b in m.get("blocks", []) if b[0] == "tool"]
        if len(tools) > 1 and m["order"]:
            ranked = iter(sorted(tools, key=lambda b: m["order"].get(b[2], 0)))
            m["blocks"] = [next(ranked) if b[0] == "tool" else b for b in m["blocks"]]
    return merged


def _user_text(m: dict[str, Any]) -> str:
    parts = [
        f"<tool_result>{text}</tool_result>" if kind == "tool" else text
        for kind, text, _ in m["blocks"]
    ]
    return "\n\n".join(parts)


def encode_v4(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
) -> str:
    """DeepSeek-V4's prompt for `messages` (see the module docstring)."""
    messages = _merge_tool_results(_with_tools_system(messages, tools))
    drop = not any(m.get("tools") for m in messages)
    last_user = _last_user(messages)
    out = [BOS]
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            out.append(_system(m, _V4_TOOLS))
        elif role == "user":
            out.append(USER + _user_text(m))
        else:  # assistant
            keep = thinking and (not drop or i > last_user)
            out.append(
                _assistant(m, (m.get("reasoning_content") or "") if keep else None, "tool_calls")
            )
        following = messages[i + 1]["role"] if i + 1 < len(messages) else None
        if role == "user" and following in (None, "assistant"):
            opens = thinking and (not drop or i >= last_user)
            out.append(ASSISTANT + (THINK_START if opens else THINK_END))
    return _prompt(out, add_generation_prompt)


def _prompt(out: list[str], add_generation_prompt: bool) -> str:
    """The pieces joined; without a generation prompt the text ends where the last message
    does."""
    text = "".join(out)
    if add_generation_prompt:
        return text
    for tail in (ASSISTANT + THINK_START, ASSISTANT + THINK_END):
        if text.endswith(tail):
            return text[: -len(tail)]
    return text
