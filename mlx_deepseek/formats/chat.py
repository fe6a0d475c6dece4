"""ChatFormat: a checkpoint's conversation format (render prompts, parse answers).

`chat_format(tokenizer, config, name)` picks the checkpoint's own Jinja template when it
has one (rendered in the sandbox, sandbox.py), else the family's built-in template
(templates.py) or encoder (dsml.py: V3.2, V4); the family (families.py) also gives the
sampling defaults and the tool-call format the answers are parsed with (parser.py).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_deepseek.errors import DeepSeekError

from . import dsml, toolcalls
from .families import FAMILIES, THINK_END, THINK_START, detect_family
from .parser import OutputParser
from .sandbox import DEFAULT_LIMITS, Limits, render
from .templates import BUILTIN_TEMPLATES

ROLES = ("system", "user", "assistant", "tool")
_DEFAULT_SPECIALS = {"bos_token": dsml.BOS, "eos_token": dsml.EOS}
_ENCODERS = {"v3.2": dsml.encode_v32, "v4": dsml.encode_v4}


def _text(value: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        parts = []
        for k, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise DeepSeekError(f"{where}[{k}]: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise DeepSeekError(f"{where}[{k}].text: expected a string")
            parts.append(part["text"])
        return "".join(parts)
    raise DeepSeekError(f"{where}: expected a string, got {type(value).__name__}")


def _arguments(value: Any, where: str) -> str:
    """A call's arguments as JSON-object text (a dict is serialized)."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return value
    raise DeepSeekError(f"{where}: expected a JSON object (as text or a dict), got {value!r:.60}")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-style messages, checked, as plain dicts the templates and encoders read.

    Roles: system (and "developer", its OpenAI alias), user, assistant (content may be None
    when it has tool_calls; reasoning_content optional), tool (tool_call_id optional).
    Raises DeepSeekError naming the first bad field.
    """
    if not isinstance(messages, (list, tuple)):
        raise DeepSeekError(f"messages: expected a list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DeepSeekError(f"{where}: expected an object, got {type(m).__name__}")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise DeepSeekError(f"{where}.role: {m.get('role')!r} is not one of {', '.join(ROLES)}")
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"), f"{where}.content")}
        if role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                msg["reasoning_content"] = _text(reasoning, f"{where}.reasoning_content")
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise DeepSeekError(f"{where}.tool_calls: expected a list")
            if calls:
                msg["tool_calls"] = [
                    _call(c, f"{where}.tool_calls[{k}]", k) for k, c in enumerate(calls)
                ]
                if m.get("content") is None:
                    msg["content"] = None  # the V3 templates test for it
            if m.get("prefix"):
                msg["prefix"] = True
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise DeepSeekError(f"{where}.tool_call_id: expected a string")
            msg["tool_call_id"] = call_id or ""
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _call(c: Any, where: str, k: int) -> dict[str, Any]:
    if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
        raise DeepSeekError(f"{where}: expected {{id, type, function: {{name, arguments}}}}")
    name = c["function"].get("name")
    if not isinstance(name, str) or not name:
        raise DeepSeekError(f"{where}.function.name: expected a non-empty string")
    call_id = c.get("id")
    return {
        "id": call_id if isinstance(call_id, str) and call_id else f"call_{k}",
        "type": c.get("type") or "function",
        "function": {
            "name": name,
            "arguments": _arguments(
                c["function"].get("arguments", "{}"), f"{where}.function.arguments"
            ),
        },
    }


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI tool schemas ({"type": "function", "function": {name, description, parameters}});
    a bare function object is accepted too."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise DeepSeekError(f"tools: expected a list, got {type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        f = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise DeepSeekError(f"tools[{i}]: expected {{type: function, function: {{name, ...}}}}")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise DeepSeekError(f"tools[{i}].function.parameters: expected a JSON schema object")
        out.append({"type": "function", "function": copy.deepcopy(f)})
    return out or None


def _deep_sorted(x: Any) -> Any:
    """Kimi's tokenizer sorts every key of the tools before its template sees them."""
    if isinstance(x, dict):
        return {k: _deep_sorted(v) for k, v in sorted(x.items())}
    if isinstance(x, list):
        return [_deep_sorted(v) for v in x]
    return x


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper
    out = dict(_DEFAULT_SPECIALS)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(hf, key, None) if hf is not None else None
        if isinstance(value, str):
            out[key] = value
    return out


@dataclass
class ChatFormat:
    """How a checkpoint's conversations are written and its answers read; sampling defaults."""

    family: str
    template: str | None  # Jinja source; None: the family's Python encoder
    source: str  # "checkpoint", "built-in <family>" or "encoder <family>"
    temperature: float
    top_p: float
    has_thinking_switch: bool = False
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)

    @property
    def tool_format(self) -> str:
        return FAMILIES[self.family].tool_format

    def render(
        self,
        tokenizer: Any,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        thinking: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The conversation as prompt text (special tokens spelled out, BOS included).

        messages: OpenAI-style (see normalize_messages); tools: OpenAI tool schemas.
        Raises DeepSeekError for bad messages, TemplateRenderError for a failing template.
        """
        msgs = normalize_messages(messages)
        tool_list = normalize_tools(tools)
        if self.template is None:
            return _ENCODERS[self.family](msgs, tool_list, thinking, add_generation_prompt)
        if self.family.startswith("kimi") and tool_list:
            tool_list = _deep_sorted(tool_list)
        if tool_list and not re.search(r"\btools\b", self.template):
            msgs = _with_tools_block(msgs, toolcalls.tools_block(tool_list, self.tool_format))
        context = {
            **_special_tokens(tokenizer),
            "messages": msgs,
            "tools": tool_list,
            "add_generation_prompt": add_generation_prompt,
        }
        if self.has_thinking_switch:
            context["thinking"] = context["enable_thinking"] = bool(thinking)
        return render(self.template, context, self.limits, f"chat template ({self.source})")

    def output_parser(self, starts_in_reasoning: bool, id_prefix: str = "call_") -> OutputParser:
        """A streaming parser for one answer (see parser.py); `starts_in_reasoning`: the
        prompt opened a thinking block (starts_in_reasoning(prompt_text))."""
        return OutputParser(self.tool_format, starts_in_reasoning, id_prefix=id_prefix)


def _with_tools_block(msgs: list[dict[str, Any]], block: str) -> list[dict[str, Any]]:
    """Templates that ignore `tools` get DeepSeek's tools description in the system prompt:
    after the last system message (every template keeps that one), else as the first."""
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i]["role"] == "system":
            sys = dict(msgs[i], content=f"{msgs[i]['content']}\n\n{block}")
            return msgs[:i] + [sys] + msgs[i + 1 :]
    return [{"role": "system", "content": block}, *msgs]


def _own_template(tokenizer: Any) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates: the default one
        own = own.get("default")
    if isinstance(own, list):
        own = next(
            (t.get("template") for t in own if isinstance(t, dict) and t.get("name") == "default"),
            None,
        )
    return own if isinstance(own, str) and own.strip() else None


def chat_format(
    tokenizer: Any,
    config: dict[str, Any] | None = None,
    name: str = "",
    limits: Limits = DEFAULT_LIMITS,
) -> ChatFormat:
    """The checkpoint's template when it has one, else the family's built-in format.

    Works with a transformers tokenizer, mlx-lm's TokenizerWrapper, the tiktoken tokenizer
    of Kimi checkpoints, or None (built-in formats only). `name` (a repo id or folder;
    default: the tokenizer's path) is the last hint at the family. Sampling defaults: the
    family's, overridden by generation_config.json (under config["generation_config"]).
    """
    config = config or {}
    name = name or _model_name(str(getattr(tokenizer, "name_or_path", "") or ""))
    own = _own_template(tokenizer) if tokenizer is not None else None
    kind = "tiktoken" if getattr(tokenizer, "is_tiktoken", False) else ""
    family = FAMILIES[detect_family(config, name, own, kind)]
    if own:
        template, source = own, "checkpoint"
    elif family.encoder == "python":
        template, source = None, f"encoder {family.name}"
    else:
        template, source = BUILTIN_TEMPLATES[family.name], f"built-in {family.name}"
    temperature, top_p = family.temperature, family.top_p
    gen = config.get("generation_config") or {}
    if isinstance(gen.get("temperature"), (int, float)) and gen.get("do_sample", True):
        temperature = float(gen["temperature"])
    if isinstance(gen.get("top_p"), (int, float)):
        top_p = float(gen["top_p"])
    fmt = ChatFormat(family.name, template, source, temperature, top_p, True, limits)
    if template is not None:  # does the thinking switch change anything?
        probe = [{"role": "user", "content": "x"}]
        on = fmt.render(tokenizer, probe, thinking=True)
        fmt.has_thinking_switch = False
        fmt.has_thinking_switch = on != fmt.render(tokenizer, probe)
    return fmt


def _model_name(path: str) -> str:
    """The model's name in a checkpoint path: a hub cache's repo, else the folder's name."""
    parts = Path(path).parts
    for part in parts:  # .../models--deepseek-ai--DeepSeek-R1/snapshots/<hash>
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    return parts[-1] if parts else ""


def read_model_config(path: str | Path) -> dict[str, Any]:
    """config.json plus generation_config.json (under "generation_config") when present."""
    path = Path(path)
    out: dict[str, Any] = {}
    for file, key in (("config.json", None), ("generation_config.json", "generation_config")):
        try:
            data = json.loads((path / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if key is None:
            out.update(data)
        else:
            out[key] = data
    return out


def starts_in_reasoning(prompt_text: str) -> bool:
    """True when the prompt opens a thinking block the model must close (R1, V3.1 thinking)."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_START) and not tail.endswith(THINK_END)
