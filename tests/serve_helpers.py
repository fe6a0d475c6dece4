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
