"""Bad input never hurts the server: malformed requests get a 4xx and a JSON error naming the
field; a full queue answers 503 with Retry-After; an API key is enforced; the CLI refuses
bad options in one line."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from serve_helpers import demo, demo_server, request, stream
from typer.testing import CliRunner

from mlx_deepseek.cli import app
from mlx_deepseek.serve.server import is_loopback

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"

# (path, body, the field the error must name)
BAD: list[tuple[str, object, str]] = [
    (CHAT, b"{not json", "body"),
    (CHAT, b"", "body"),
    (CHAT, b"[1, 2]", "body"),
    (CHAT, {"model": "demo"}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content",
    ),
    (CHAT, {"messages": [{"role": "system", "content": "x"}]}, "messages"),
    (CHAT, {"messages": MSG, "model": "gpt-4"}, "model"),
    (CHAT, {"messages": MSG, "model": 7}, "model"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": MSG, "temperature": -1}, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, "top_p"),
    (CHAT, {"messages": MSG, "top_k": -2}, "top_k"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": "10"}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 10**7}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 10**7}, "max_completion_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    (CHAT, {"messages": MSG, "n": 3}, "n"),
    (CHAT, {"messages": MSG, "stream": "yes"}, "stream"),
    (CHAT, {"messages": MSG, "stop": 5}, "stop"),
    (CHAT, {"messages": MSG, "stop": ["a"] * 40}, "stop"),
    (CHAT, {"messages": MSG, "seed": 1.5}, "seed"),
    (CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias.abc"),
    (CHAT, {"messages": MSG, "logit_bias": {"99999999": 1}}, "logit_bias.99999999"),
    (CHAT, {"messages": MSG, "logit_bias": {"5": 500}}, "logit_bias.5"),
    (CHAT, {"messages": MSG, "top_logprobs": 50}, "top_logprobs"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, "tools[0].function"),
    (
        CHAT,
        {"messages": MSG, "tools": [{"type": "retrieval", "function": {"name": "f"}}]},
        "tools[0].type",
    ),
    (
        CHAT,
        {"messages": MSG, "tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools[0].function.name",
    ),
    (
        CHAT,
        {
            "messages": MSG,
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
            ],
        },
        "tools[0].function.parameters",
    ),
    (
        CHAT,
        {
            "messages": MSG,
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}}
            ],
        },
        "tools[0].function.parameters",
    ),
    (CHAT, {"messages": MSG, "tool_choice": "always"}, "tool_choice"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, "response_format"),
    (
        CHAT,
        {"messages": MSG, "chat_template_kwargs": {"thinking": "on"}},
        "chat_template_kwargs.thinking",
    ),
    ("/v1/completions", {"model": "demo"}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [3, -1]}, "prompt[1]"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, "logprobs"),
    (
        "/api/chat",
        {"model": "demo", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
        "messages[0].images",
    ),
    (
        "/api/chat",
        {"model": "demo", "messages": MSG, "options": {"temperature": "x"}},
        "options.temperature",
    ),
    ("/api/chat", {"model": "demo", "messages": MSG, "format": "json"}, "format"),
    ("/api/generate", {"model": "nope", "prompt": "x"}, "model"),
    ("/api/show", {"model": "nope"}, "model"),
]


@pytest.fixture(scope="module")
def server():
    with demo_server(max_body=64 * 1024) as s:
        yield s


def test_fuzz_of_malformed_requests(server):
    assert len(BAD) >= 30
    for path, body, field in BAD:
        status, out, _ = request(server.url + path, body, method="POST")
        assert 400 <= status < 500, (path, body, status, out)
        err = out["error"]
        assert err["param"] == field, (body, err)
        assert err["message"] and err["type"] == "invalid_request_error"
    assert request(server.url + "/health")[1]["status"] == "ok"
    ok = request(server.url + CHAT, {"messages": MSG, "max_tokens": 3})
    assert ok[0] == 200


def test_body_too_large_wrong_method_and_unknown_path(server):
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    status, out, _ = request(server.url + CHAT, big)
    assert status == 413 and out["error"]["param"] == "body"
    status, out, _ = request(server.url + CHAT, method="GET")
    assert status == 405 and "error" in out
    status, out, _ = request(server.url + "/v2/nothing")
    assert status == 404 and "error" in out


def test_full_queue_answers_503_with_retry_after():
    eos = {str(t): -100 for t in demo()[1].eos_token_ids}
    with demo_server(max_batch=1, max_queue=0) as server:
        body = {"messages": MSG, "max_tokens": 300, "logit_bias": eos, "stream": True}
        import threading

        first = threading.Thread(target=stream, args=(server.url + CHAT, body))
        first.start()
        deadline = time.monotonic() + 10
        while request(server.url + "/health")[1]["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, out, headers = request(server.url + CHAT, {"messages": MSG, "max_tokens": 2})
        assert status == 503 and int(headers["Retry-After"]) > 0
        assert out["error"]["code"] == "server_busy"
        first.join()
        assert request(server.url + CHAT, {"messages": MSG, "max_tokens": 2})[0] == 200


def test_api_key_is_required_when_set():
    with demo_server(api_key="s3cret") as server:
        assert request(server.url + CHAT, {"messages": MSG})[0] == 401
        assert request(server.url + "/api/tags")[0] == 401
        bad = {"Authorization": "Bearer nope"}
        assert request(server.url + "/v1/models", headers=bad)[0] == 401
        good = {"Authorization": "Bearer s3cret"}
        assert (
            request(server.url + CHAT, {"messages": MSG, "max_tokens": 2}, headers=good)[0] == 200
        )
        assert request(server.url + "/health")[0] == 200  # liveness stays open


def test_cli_refuses_bad_options_in_one_line():
    runner = CliRunner()
    for args, needle in (
        (["serve", "--port", "70000"], "--port 70000"),
        (["serve", "--max-batch", "0"], "--max-batch 0"),
        (["serve", "--host", "256.1.1.1"], "cannot listen on 256.1.1.1"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code != 0
        assert needle in str(result.exception or result.output)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_serve_command_in_a_subprocess():
    """The real command: binds 127.0.0.1, serves the demo, warns when bound wider."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from mlx_deepseek.cli import main; main()", "serve"]
        + ["--port", str(port), "--log-level", "warning"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if request(url + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        status, out, _ = request(url + CHAT, {"messages": MSG, "max_tokens": 4})
        assert status == 200 and out["model"] == "demo"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"serving demo on http://127.0.0.1:{port}" in err
    assert "warning" not in err
