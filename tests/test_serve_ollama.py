"""Ollama's request shapes: /api/chat and /api/generate streamed (NDJSON, the default) and
not, /api/tags, /api/show, the `think` switch and tool calls with object arguments."""

from __future__ import annotations

import json

import pytest
from serve_helpers import FORMATS, TOOLS, demo_server, request, scripted_server, stream


@pytest.fixture(scope="module")
def server():
    with demo_server() as s:
        yield s


def test_tags_and_show(server):
    status, tags, _ = request(server.url + "/api/tags")
    assert status == 200
    (entry,) = tags["models"]
    assert entry["name"] == "demo:latest" and "details" in entry
    status, show, _ = request(server.url + "/api/show", {"model": "demo:latest"})
    assert status == 200 and "completion" in show["capabilities"]
    assert show["model_info"]
    assert request(server.url + "/api/show", {"name": "llama3"})[0] == 404


def test_chat_streamed_by_default_and_whole(server):
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Spell dog backwards."}],
        "options": {"temperature": 0, "num_predict": 30},
    }
    lines = [json.loads(x) for x in stream(server.url + "/api/chat", body)]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    assert lines[-1]["done_reason"] in ("stop", "length") and lines[-1]["eval_count"] > 0
    text = "".join(x["message"]["content"] for x in lines)
    status, whole, _ = request(server.url + "/api/chat", body | {"stream": False})
    assert status == 200 and whole["done"]
    assert whole["message"]["role"] == "assistant"
    assert whole["message"]["content"] == text and "god" in text
    assert whole["prompt_eval_count"] > 0


def test_generate_templated_raw_and_streamed(server):
    body = {"model": "demo", "prompt": "Spell cat backwards.", "stream": False}
    body["options"] = {"temperature": 0, "num_predict": 20}
    status, out, _ = request(server.url + "/api/generate", body)
    assert status == 200 and "tac" in out["response"]
    lines = [json.loads(x) for x in stream(server.url + "/api/generate", body | {"stream": True})]
    assert "".join(x.get("response", "") for x in lines) == out["response"]
    raw = body | {"raw": True, "prompt": "Hello"}
    status, out_raw, _ = request(server.url + "/api/generate", raw)
    assert status == 200 and out_raw["response"] != out["response"]
    # an empty prompt only loads the model (Ollama's way)
    assert request(server.url + "/api/generate", {"model": "demo"})[1]["done_reason"] == "load"


def test_think_switch_and_thinking_field():
    reply = "The user greets me.</think>Hello there!"
    with scripted_server([reply], "deepseek-ai/DeepSeek-V3.1") as server:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
        status, on, _ = request(server.url + "/api/chat", body | {"stream": False, "think": True})
        assert status == 200
        assert on["message"]["thinking"] == "The user greets me."
        assert on["message"]["content"] == "Hello there!"
        lines = [json.loads(x) for x in stream(server.url + "/api/chat", body | {"think": True})]
        assert "".join(x["message"].get("thinking", "") for x in lines) == "The user greets me."


def test_tool_calls_have_object_arguments():
    name, config, reply = FORMATS["v3.1"]
    with scripted_server([reply], name, config) as server:
        body = {
            "model": "scripted",
            "messages": [{"role": "user", "content": "Weather?"}],
            "tools": TOOLS,
            "stream": False,
        }
        status, out, _ = request(server.url + "/api/chat", body)
        assert status == 200
        (call,) = out["message"]["tool_calls"]
        assert call["function"] == {
            "name": "get_weather",
            "arguments": {"city": "Paris", "days": 2},
        }
        # Ollama clients send the call back with object arguments
        turn2 = body["messages"] + [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "21 C"},
        ]
        assert request(server.url + "/api/chat", body | {"messages": turn2})[0] == 200
