"""Helpers for the server's tests: servers on a free port, plain HTTP calls (stdlib only)."""

from __future__ import annotations

import contextlib
import functools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from tiny_chat import ScriptedModel, tokenizer_only

from mlx_deepseek.formats import chat_format
from mlx_deepseek.serve.server import BackgroundServer, make_state


@functools.cache
def demo():
    """(model, tokenizer, chat format) of the bundled demo, loaded once."""
    from mlx_deepseek.cli.generate import load_checkpoint

    model, tok, fmt, _ = load_checkpoint("demo", quiet=True)
    return model, tok, fmt


@contextlib.contextmanager
def demo_server(**options: Any) -> Iterator[BackgroundServer]:
    model, tok, fmt = demo()
    options.setdefault("mtp", False)
    with BackgroundServer(make_state(model, tok, fmt, "demo", **options)) as server:
        yield server


@contextlib.contextmanager
def scripted_server(
    replies: list[str], name: str, config: dict | None = None, **options: Any
) -> Iterator[BackgroundServer]:
    """A server whose model answers with `replies` (tests/tiny_chat.py ScriptedModel) in the
    chat format that `name` / `config` select (e.g. "deepseek-ai/DeepSeek-V3.1")."""
    tok = tokenizer_only()
    fmt = chat_format(tok, config or {"model_type": "deepseek_v3"}, name)
    markers = ("<|im_user|>", "<|im_assistant|>") if fmt.family.startswith("kimi") else None
    model = ScriptedModel(tok, replies, markers=markers) if markers else ScriptedModel(tok, replies)
    options.setdefault("mtp", False)
    with BackgroundServer(make_state(model, tok, fmt, "scripted", **options)) as server:
        yield server


def request(
    url: str, body: Any = None, method: str | None = None, headers: dict | None = None
) -> tuple[int, Any, Any]:
    """(status, JSON body, headers) of one call; body: a dict (sent as JSON) or raw bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


def stream(url: str, body: dict) -> list[str]:
    """The response's lines, read as they come (SSE `data:` lines or NDJSON)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as r:
        return [line.decode().rstrip("\n") for line in r if line.strip()]


def sse_chunks(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        assert line.startswith("data: "), line
        if line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


# ---- one tool and each family's call text (test_serve_tools.py, test_serve_ollama.py) --------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
ASK = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
ARGS = {"city": "Paris", "days": 2}
D = "｜DSML｜"

# (hub name, config, what the model types: its published tool-call syntax)
FORMATS = {
    "v3": (
        "deepseek-ai/DeepSeek-V3-0324",
        {"model_type": "deepseek_v3"},
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"
        '\n```json\n{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    ),
    "r1-0528": (
        "deepseek-ai/DeepSeek-R1-0528",
        {"model_type": "deepseek_v3"},
        "<think>I need the weather tool.</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
        '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris", "days": 2}\n```'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    ),
    "v3.1": (
        "deepseek-ai/DeepSeek-V3.1",
        {"model_type": "deepseek_v3"},
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Paris", "days": 2}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    ),
    "v3.2": (
        "deepseek-ai/DeepSeek-V3.2",
        {"model_type": "deepseek_v32"},
        f'Let me check.\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">2</{D}parameter>\n'
        f"</{D}invoke>\n</{D}function_calls>",
    ),
    "v4": (
        "deepseek-ai/DeepSeek-V4-Flash",
        {"model_type": "deepseek_v4"},
        f'Let me check.\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">2</{D}parameter>\n'
        f"</{D}invoke>\n</{D}tool_calls>",
    ),
    "kimi": (
        "moonshotai/Kimi-K2-Instruct",
        {"model_type": "kimi_k2"},
        "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris", "days": 2}<|tool_call_end|>'
        "<|tool_calls_section_end|>",
    ),
}
