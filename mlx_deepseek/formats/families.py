"""Model families: how each one's conversations, reasoning and tool calls are written.

A family is detected from what the checkpoint says about itself, in this order: its chat
template's text (the template IS the format), its config (`model_type`, the tokenizer
files), and only then its name. A folder named "my-model" holding R1's template is R1.

Sampling defaults and where they come from:
- v2 / v2.5 / v3: temperature 0.3 (the model temperature DeepSeek's API maps its default
  1.0 to), top_p 0.95.
- r1 / r1-0528 / v3.1: 0.6 / 0.95 (DeepSeek's R1 and V3.1 model cards).
- v3.2: 1.0 / 0.95 (the DeepSeek-V3.2 model card: "For local deployment, we recommend
  setting the sampling parameters to temperature = 1.0, top_p = 0.95").
- v4: 1.0 / 1.0 (DeepSeek's V4 recommendation, as quoted by its API guides: "temperature=
  1.0, top_p=1.0").
- kimi (K2-Instruct): 0.6 / 1.0 (Moonshot's K2-Instruct card: "recommended temperature
  0.6"); kimi-thinking (K2-Thinking, K2.5): 1.0 / 1.0 (the K2-Thinking card).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class Family:
    name: str
    temperature: float
    top_p: float
    tool_format: str  # key of toolcalls.FORMATS
    encoder: str  # "jinja" (a built-in template) or "python" (dsml.py's encoders)
    reasons: bool = False  # answers may open with reasoning


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("v2", 0.3, 0.95, "v3", "jinja"),
        Family("v2.5", 0.3, 0.95, "v3", "jinja"),
        Family("v3", 0.3, 0.95, "v3", "jinja"),
        Family("r1", 0.6, 0.95, "v3", "jinja", reasons=True),
        Family("r1-0528", 0.6, 0.95, "v3", "jinja", reasons=True),
        Family("v3.1", 0.6, 0.95, "v3.1", "jinja", reasons=True),
        Family("v3.2", 1.0, 0.95, "dsml-v3.2", "python", reasons=True),
        Family("v4", 1.0, 1.0, "dsml-v4", "python", reasons=True),
        Family("kimi", 0.6, 1.0, "kimi", "jinja"),
        Family("kimi-thinking", 1.0, 1.0, "kimi", "jinja", reasons=True),
    )
}

_KIMI_TYPES = ("kimi_k2", "kimi_k25")


def _from_template(t: str) -> str | None:
    """The family a chat template's own text writes, or None when it says nothing."""
    if "<|im_middle|>" in t or "<|im_user|>" in t:
        return "kimi-thinking" if THINK_START in t or THINK_END in t else "kimi"
    if "DSML" in t or "dsml_token" in t:
        return "v4" if "tool_calls" in t and "function_calls" not in t else "v3.2"
    # V3.1: the thinking switch and the non-thinking `</think>` after the Assistant marker
    if re.search(r"\bthinking\b", t) and THINK_END in t:
        return "v3.1"
    if "<｜User｜>" in t or "<｜Assistant｜>" in t:
        if THINK_END in t or THINK_START in t:  # R1: history drops the text before </think>
            user_then_assistant = re.search(r"'<｜User｜>'\s*\+\s*\w+(\['content'\])?\s*\+", t)
            return "r1-0528" if user_then_assistant else "r1"
        return "v3" if "is_first_sp" in t else "v2.5"  # V2.5 keeps only the last system
    if "User: " in t and "Assistant:" in t:
        return "v2"
    return None


def detect_family(
    config: dict[str, Any], name: str = "", template: str | None = None, tokenizer_kind: str = ""
) -> str:
    """One of FAMILIES' keys: from the template's text, then the config, then the name.

    `tokenizer_kind` is "tiktoken" for a Kimi-style tiktoken tokenizer (no template needed
    to know a deepseek_v3 checkpoint carrying it is Kimi).
    """
    if template:
        family = _from_template(template)
        if family is not None:
            return family
    model_type = str(config.get("model_type") or "")
    text = f"{name} {config.get('_name_or_path', '')}".lower()
    if model_type == "deepseek_v4":
        return "v4"
    if model_type == "deepseek_v32":
        return "v3.2"
    if model_type in _KIMI_TYPES or tokenizer_kind == "tiktoken" or "kimi" in text:
        thinking = model_type == "kimi_k25" or re.search(r"thinking|k2\.5|k25", text)
        return "kimi-thinking" if thinking else "kimi"  # K2.5 thinks by default
    if "moonlight" in text:
        return "kimi"
    if re.search(r"(?<![a-z0-9])r1(?![0-9])", text):
        return "r1-0528" if "0528" in text else "r1"
    if re.search(r"v3[._-]?1|terminus", text):
        return "v3.1"
    if re.search(r"v3[._-]?2", text):
        return "v3.2"
    if model_type == "deepseek_v3":
        return "v3"
    if model_type == "deepseek":  # DeepSeekMoE 16B Chat: V2's "User: / Assistant:" turns
        return "v2"
    if re.search(r"v2[._-]?5|0724|1210", text) or (template and "<｜User｜>" in template):
        return "v2.5"
    return "v2"
