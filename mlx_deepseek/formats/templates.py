"""Chat formatting: the checkpoint's own Jinja chat template, or a built-in DeepSeek one.

Built-in templates (chat turns only: system, user, assistant; no tool calls) reproduce
DeepSeek's published formats for checkpoints that ship without a template:

- v2   (V2-Chat, V2-Lite-Chat, Coder-V2 0614):
  `<bos>{system}\\n\\nUser: {u}\\n\\nAssistant: {a}<eos>`
- v3   (V2.5, Coder-V2 0724, V3):   `<bos>{system}<｜User｜>{u}<｜Assistant｜>{a}<eos>`
- r1   (R1): as v3; history keeps only the text after `</think>`; the prompt ends `<think>\\n`
- v3.1 (V3.1): history turns read `<｜Assistant｜></think>{a}<eos>`; the prompt ends
  `</think>` (non-thinking) or `<think>` (thinking, the `thinking` template switch)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_deepseek.errors import DeepSeekError

_SYSTEM_JOINED = (
    "{%- set ns = namespace(system_prompt='', first=true) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- if ns.first -%}{%- set ns.system_prompt = message['content'] -%}"
    "{%- set ns.first = false -%}"
    "{%- else -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] -%}"
    "{%- endif -%}{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{{ ns.system_prompt }}"
)

_V2 = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

_V3 = (
    _SYSTEM_JOINED + "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
)

_R1 = (
    _SYSTEM_JOINED + "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\\n' }}{%- endif -%}"
)

_V3_1 = (
    "{%- if not thinking is defined -%}{%- set thinking = false -%}{%- endif -%}"
    + _SYSTEM_JOINED
    + "{%- set last = namespace(user=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set last.user = true -%}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if last.user -%}{{ '<｜Assistant｜></think>' }}{%- endif -%}"
    "{%- set last.user = false -%}{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>', 1)[1] -%}"
    "{%- endif -%}{{ content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and last.user -%}{{ '<｜Assistant｜>' }}"
    "{%- if thinking -%}{{ '<think>' }}{%- else -%}{{ '</think>' }}{%- endif -%}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"v2": _V2, "v3": _V3, "r1": _R1, "v3.1": _V3_1}

# family -> (template, temperature, top_p). R1 / V3.1: DeepSeek's recommended 0.6 / 0.95.
# V2/V2.5/V3: 0.3, the model temperature DeepSeek's API maps its default (1.0) to.
FAMILIES: dict[str, tuple[str, float, float]] = {
    "v2": ("v2", 0.3, 0.95),
    "v2.5": ("v3", 0.3, 0.95),
    "v3": ("v3", 0.3, 0.95),
    "r1": ("r1", 0.6, 0.95),
    "v3.1": ("v3.1", 0.6, 0.95),
}

REASONING_FAMILIES = ("r1", "v3.1")
THINK_START = "<think>"
THINK_END = "</think>"


def detect_family(config: dict[str, Any], name: str, template: str | None = None) -> str:
    """One of FAMILIES' keys, from the checkpoint's template, its name, then its model_type."""
    if template:
        if THINK_END in template and re.search(r"\bthinking\b", template):
            return "v3.1"
        if THINK_START in template:
            return "r1"
    text = f"{name} {config.get('_name_or_path', '')}".lower()
    if re.search(r"(?<![a-z0-9])r1(?![0-9])", text):
        return "r1"
    if re.search(r"v3[._-]?1|terminus", text):
        return "v3.1"
    if template and "User: " in template and "<｜User｜>" not in template:
        return "v2"
    if config.get("model_type") == "deepseek_v3":
        return "v3"
    if re.search(r"v2[._-]?5|0724", text) or (template and "<｜User｜>" in template):
        return "v2.5"
    return "v2"


@dataclass
class ChatFormat:
    """How a checkpoint's conversations are written, and its sampling defaults."""

    family: str
    template: str
    source: str  # "checkpoint" or "built-in <family>"
    temperature: float
    top_p: float
    has_thinking_switch: bool = False

    def render(
        self,
        tokenizer: Any,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        thinking: bool = False,
    ) -> str:
        """The conversation as prompt text (special tokens spelled out, BOS included)."""
        hf = getattr(tokenizer, "_tokenizer", tokenizer)  # unwrap mlx-lm's TokenizerWrapper
        kwargs: dict[str, Any] = {}
        if self.has_thinking_switch:
            kwargs["thinking"] = thinking
        try:
            text = hf.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except Exception as e:  # jinja errors in a checkpoint's own template
            raise DeepSeekError(
                f"chat template ({self.source}) failed to render: {type(e).__name__}: {e}"
            ) from None
        return text if isinstance(text, str) else str(text)


def chat_format(tokenizer: Any, config: dict[str, Any] | None = None, name: str = "") -> ChatFormat:
    """The checkpoint's template when it has one, else the built-in one for its family.

    `name` (a repo id or folder; default: the tokenizer's path) helps tell the family apart.
    Sampling defaults: the family's, overridden by the checkpoint's generation_config.json
    (temperature, top_p) when `config` carries them under "generation_config".
    """
    config = config or {}
    name = name or _model_name(str(getattr(tokenizer, "name_or_path", "") or ""))
    own = getattr(tokenizer, "chat_template", None)
    if not isinstance(own, str):
        own = None  # a dict of named templates is not supported: use the built-in one
    family = detect_family(config, name, own)
    key, temperature, top_p = FAMILIES[family]
    template, source = (own, "checkpoint") if own else (BUILTIN_TEMPLATES[key], f"built-in {key}")
    gen = config.get("generation_config") or {}
    if isinstance(gen.get("temperature"), (int, float)) and gen.get("do_sample", True):
        temperature = float(gen["temperature"])
    if isinstance(gen.get("top_p"), (int, float)):
        top_p = float(gen["top_p"])
    fmt = ChatFormat(family, template, source, temperature, top_p)
    probe = [{"role": "user", "content": "x"}]
    fmt.has_thinking_switch = True
    on, off = fmt.render(tokenizer, probe, thinking=True), fmt.render(tokenizer, probe)
    fmt.has_thinking_switch = on != off
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
        if key is None:
            out.update(data)
        else:
            out[key] = data
    return out


def starts_in_reasoning(prompt_text: str) -> bool:
    """True when the prompt opens a thinking block the model must close (R1, V3.1 thinking)."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_START)
