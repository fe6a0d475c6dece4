"""Tool calls and reasoning through the endpoints, for every chat format: a scripted model
types a family's tool-call text token by token (so the markers arrive split across stream
chunks) and the server must return OpenAI `tool_calls` with JSON arguments, reasoning apart
in `reasoning_content`, and malformed tool text as plain content."""

from __future__ import annotations

import json

import openai
import pytest
from serve_helpers import (
    ARGS,
    ASK,
    FORMATS,
    TOOLS,
    request,
    scripted_server,
    sse_chunks,
    stream,
)


@pytest.mark.parametrize("family", list(FORMATS))
def test_tool_calls_whole_and_streamed(family):
    name, config, reply = FORMATS[family]
    with scripted_server([reply], name, config) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == ARGS
        assert call.id
        assert "tool" not in (choice.message.content or "")
        chunks = list(
            client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, stream=True)
        )
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert len(calls) == 1 and calls[0].index == 0
        assert json.loads(calls[0].function.arguments) == ARGS
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert content == (choice.message.content or "")
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the conversation goes on with the tool's result
        turn2 = ASK + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ]
        status, body, _ = request(
            server.url + "/v1/chat/completions",
            {"model": "scripted", "messages": turn2, "tools": TOOLS},
        )
        assert status == 200, body


def test_reasoning_is_apart_and_tool_calls_inside_it_are_recovered():
    reply = (
        "<think>The user wants weather.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather"
        '<｜tool▁sep｜>{"city": "Paris", "days": 2}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    )
    with scripted_server([reply], "deepseek-ai/DeepSeek-V3.1") as server:
        body = {
            "model": "scripted",
            "messages": ASK,
            "tools": TOOLS,
            "chat_template_kwargs": {"thinking": True},
        }
        status, out, _ = request(server.url + "/v1/chat/completions", body)
        msg = out["choices"][0]["message"]
        assert status == 200
        assert "weather" in msg["reasoning_content"] and "<think>" not in msg["content"]
        assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == ARGS
        chunks = sse_chunks(stream(server.url + "/v1/chat/completions", body | {"stream": True}))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        assert reasoning == msg["reasoning_content"]
        assert all("think" not in (d.get("content") or "") for d in deltas)


def test_malformed_tool_call_comes_back_as_content():
    reply = (
        "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        "{city: Paris<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    )
    with scripted_server([reply], "deepseek-ai/DeepSeek-V3.1") as server:
        body = {"model": "scripted", "messages": ASK, "tools": TOOLS}
        status, out, _ = request(server.url + "/v1/chat/completions", body)
        assert status == 200
        msg = out["choices"][0]["message"]
        assert "tool_calls" not in msg and "{city: Paris" in msg["content"]
        assert out["choices"][0]["finish_reason"] == "stop"
        assert request(server.url + "/health")[0] == 200


def test_the_line_breaks_framing_reasoning_and_answer_are_not_text():
    """DeepSeek writes "<think>\\n...\\n</think>\\n\\n"; its API returns neither those line
    breaks in reasoning_content nor a blank line opening content. Inner ones stay."""
    reply = "<think>\nStep one.\n\nStep two.\n</think>\n\nThe answer:\n\n42."
    with scripted_server([reply], "deepseek-ai/DeepSeek-R1") as server:
        body = {"model": "scripted", "messages": ASK}
        status, out, _ = request(server.url + "/v1/chat/completions", body)
        msg = out["choices"][0]["message"]
        assert status == 200
        assert msg["reasoning_content"] == "Step one.\n\nStep two."
        assert msg["content"] == "The answer:\n\n42."
        chunks = sse_chunks(stream(server.url + "/v1/chat/completions", body | {"stream": True}))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Step one.\n\nStep two."
        assert "".join(d.get("content") or "" for d in deltas) == "The answer:\n\n42."
