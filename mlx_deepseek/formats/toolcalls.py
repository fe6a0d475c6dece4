"""Tool-call syntax of each format: the markers around calls, and one call's body parsed.

Formats (the key each family names in families.FAMILIES):
- "v3"   V3 / R1 / R1-0324 / R1-0528: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function
         <｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`
- "v3.1" V3.1: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>` in the same
         section markers. Both DeepSeek-token formats accept either call body.
- "dsml-v3.2" / "dsml-v4": `<｜DSML｜function_calls>` (V3.2) or `<｜DSML｜tool_calls>` (V4)
         around `<｜DSML｜invoke name="NAME">` + `<｜DSML｜parameter name="K" string="true|
         false">V</｜DSML｜parameter>` lines + `</｜DSML｜invoke>`; a string="false" value is
         JSON.
- "kimi" `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
         <|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>`

Arguments always come out as a JSON object in text; a body that does not parse to one is
malformed (the stream parser then returns its text as content).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DSML = "｜DSML｜"


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON object
    id: str | None = None  # the model's own id (Kimi), else None


@dataclass(frozen=True)
class ToolFormat:
    section_begin: tuple[str, ...]
    section_end: tuple[str, ...]
    call_begin: str
    call_end: str
    parse_call: Callable[[str], Call | None]


def _json_object(text: str) -> str | None:
    """`text` itself when it is one JSON object, else None."""
    text = text.strip()
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return text if isinstance(value, dict) else None


_FENCE = re.compile(r"^(?P<name>[^\n`]+?)\s*\n```(?:json)?\s*\n(?P<args>.*?)\n?```\s*$", re.S)


def _parse_deepseek(body: str) -> Call | None:
    """One `<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>` body, V3 or V3.1 style."""
    head, sep, rest = body.partition("<｜tool▁sep｜>")
    if not sep:
        return None
    fenced = _FENCE.match(rest.strip("\n") if "```" in rest else "")
    if fenced:  # V3: type <sep> name \n ```json \n args \n ```
        name, args = fenced["name"].strip(), _json_object(fenced["args"])
    else:  # V3.1: name <sep> args
        name, args = head.strip(), _json_object(rest)
    if not name or args is None or "<｜" in name:
        return None
    return Call(name, args)


_INVOKE = re.compile(r'^\s*name="(?P<name>[^"]*)"\s*>(?P<params>.*)$', re.S)
_PARAM = re.compile(
    r'<｜DSML｜parameter\s+name="(?P<key>[^"]*)"\s+string="(?P<string>true|false)"\s*>'
    r"(?P<value>.*?)</｜DSML｜parameter>",
    re.S,
)


def _parse_dsml(body: str) -> Call | None:
    """One `<｜DSML｜invoke name="...">...</｜DSML｜invoke>` body (after `<｜DSML｜invoke`)."""
    m = _INVOKE.match(body)
    if not m or not m["name"].strip():
        return None
    params = m["params"]
    args: dict[str, Any] = {}
    pos = 0
    for p in _PARAM.finditer(params):
        if params[pos : p.start()].strip():  # text between parameters: not DSML
            return None
        pos = p.end()
        key = p["key"]
        if key in args:
            return None
        if p["string"] == "true":
            args[key] = p["value"]
        else:
            try:
                args[key] = json.loads(p["value"])
            except ValueError:
                return None
    if params[pos:].strip():
        return None
    return Call(m["name"].strip(), json.dumps(args, ensure_ascii=False))


_KIMI_ID = re.compile(r"^\s*(?P<id>[^\s<]+)\s*$")


def _parse_kimi(body: str) -> Call | None:
    """`functions.NAME:IDX<|tool_call_argument_begin|>{...}`."""
    head, sep, rest = body.partition("<|tool_call_argument_begin|>")
    m = _KIMI_ID.match(head)
    if not sep or not m:
        return None
    call_id = m["id"]
    name = call_id.split(":")[0].split(".")[-1]  # functions.NAME:IDX -> NAME
    args = _json_object(rest)
    if not name or args is None:
        return None
    return Call(name, args, call_id)


_DEEPSEEK = dict(
    section_begin=("<｜tool▁calls▁begin｜>",),
    section_end=("<｜tool▁calls▁end｜>",),
    call_begin="<｜tool▁call▁begin｜>",
    call_end="<｜tool▁call▁end｜>",
    parse_call=_parse_deepseek,
)
_DSML = dict(
    section_begin=(f"<{DSML}function_calls>", f"<{DSML}tool_calls>"),
    section_end=(f"</{DSML}function_calls>", f"</{DSML}tool_calls>"),
    call_begin=f"<{DSML}invoke",
    call_end=f"</{DSML}invoke>",
    parse_call=_parse_dsml,
)

FORMATS: dict[str, ToolFormat] = {
    "v3": ToolFormat(**_DEEPSEEK),
    "v3.1": ToolFormat(**_DEEPSEEK),
    "dsml-v3.2": ToolFormat(**_DSML),
    "dsml-v4": ToolFormat(**_DSML),
    "kimi": ToolFormat(
        section_begin=("<|tool_calls_section_begin|>",),
        section_end=("<|tool_calls_section_end|>",),
        call_begin="<|tool_call_begin|>",
        call_end="<|tool_call_end|>",
        parse_call=_parse_kimi,
    ),
}


# ---- writing calls (for the encoders and the tools system block) ---------------------------


def dsml_parameters(arguments: str) -> str:
    """A call's JSON-object arguments as DSML parameter lines (strings raw, the rest JSON)."""
    lines = []
    for key, value in json.loads(arguments).items():
        if isinstance(value, str):
            lines.append(f'<{DSML}parameter name="{key}" string="true">{value}</{DSML}parameter>')
        else:
            text = json.dumps(value, ensure_ascii=False)
            lines.append(f'<{DSML}parameter name="{key}" string="false">{text}</{DSML}parameter>')
    return "\n".join(lines)


def dsml_calls(calls: list[dict[str, Any]], block: str) -> str:
    """`<｜DSML｜{block}>` ... `</｜DSML｜{block}>` for OpenAI-style tool calls."""
    invokes = [
        f'<{DSML}invoke name="{c["function"]["name"]}">\n'
        f"{dsml_parameters(c['function']['arguments'])}\n</{DSML}invoke>"
        for c in calls
    ]
    return f"<{DSML}{block}>\n" + "\n".join(invokes) + f"\n</{DSML}{block}>"


def tools_block(tools: list[dict[str, Any]], tool_format: str) -> str:
    """The tools description DeepSeek documents for templates that do not render `tools`.

    "v3.1": the layout of the DeepSeek-V3.1 model card (`## Tools`, one `### NAME` section
    per tool, then the call format). "v3" (V2.5, V3, R1): the same layout with the fenced
    ```json call syntax those models write.
    """
    parts = ["## Tools\nYou have access to the following tools:\n"]
    for tool in tools:
        f = tool["function"]
        parts.append(
            f"\n### {f['name']}\nDescription: {f.get('description') or ''}\n\n"
            f"Parameters: {json.dumps(f.get('parameters') or {}, ensure_ascii=False)}\n"
        )
    if tool_format == "v3.1":
        call = (
            "<｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments"
            "<｜tool▁call▁end｜>"
        )
        chain = "chain them directly without separators or spaces"
    else:
        call = (
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>tool_call_name\n```json\n"
            "tool_call_arguments\n```<｜tool▁call▁end｜>"
        )
        chain = "separate them with a newline"
    parts.append(
        "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
        f"<｜tool▁calls▁begin｜>{call}{{additional_tool_calls}}<｜tool▁calls▁end｜>\n\n"
        "Where:\n- `tool_call_name` must be an exact match to one of the available tools\n"
        "- `tool_call_arguments` must be valid JSON that strictly follows the tool's "
        f"Parameters Schema\n- For multiple tool calls, {chain}"
    )
    return "".join(parts)
