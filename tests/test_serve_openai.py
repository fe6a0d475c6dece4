"""The OpenAI endpoints through the real `openai` client, against the bundled demo model
served on a free port: plain, streamed, stop strings, logprobs, 8 concurrent clients, a
client that hangs up mid-stream, cached prompt tokens, completions."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_helpers import demo, demo_server, request

QUESTION = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def server():
    with demo_server(max_batch=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_plain_and_streamed_answers_agree(client):
    whole = client.chat.completions.create(
        model="demo", messages=QUESTION, max_tokens=40, temperature=0
    )
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 5
    assert whole.usage.completion_tokens <= 40
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=QUESTION,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_cuts_the_answer(client):
    full = client.chat.completions.create(
        model="demo", messages=QUESTION, max_tokens=40, temperature=0
    ).choices[0]
    word = full.message.content.split()[3]
    cut = client.chat.completions.create(
        model="demo", messages=QUESTION, max_tokens=40, temperature=0, stop=[word]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full.message.content[: full.message.content.index(word)]


def test_logprobs(client):
    r = client.chat.completions.create(
        model="demo", messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    for item in items:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.logprob <= 0


def test_eight_concurrent_clients_get_their_own_answers(client, server):
    words = ["dog", "cat", "sun", "tree", "book", "fish", "moon", "bird"]
    questions = [f"Spell {w} backwards." for w in words]

    def ask(q: str) -> str:
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": q}], max_tokens=32, temperature=0
        )
        return r.choices[0].message.content

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone
    # each answer is its own question's, whatever the demo's spelling
    assert all(a.startswith(f"{w} backwards is") for w, a in zip(words, alone, strict=True))
    assert sum(w[::-1] in a for w, a in zip(words, alone, strict=True)) >= 6


def test_a_client_that_hangs_up_frees_its_slot(server):
    body = {
        "model": "demo",
        "messages": QUESTION,
        "max_tokens": demo()[0].args.max_position_embeddings - 100,
        "stream": True,
        "logit_bias": {str(t): -100 for t in demo()[1].eos_token_ids},  # never ends by itself
    }
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "x"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(4):
        assert resp.readline()
    assert request(server.url + "/health")[1]["running"] == 1
    steps = server.state.engine.steps
    conn.sock.close()  # hang up mid-stream
    conn.close()
    deadline = time.monotonic() + 10
    while request(server.url + "/health")[1]["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert request(server.url + "/health")[1]["running"] == 0
    assert server.state.engine.steps - steps < 100  # stopped long before max_tokens


def test_a_conversation_reuses_its_cached_prompt(client):
    first = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=20)
    turn2 = QUESTION + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = client.chat.completions.create(model="demo", messages=turn2, max_tokens=5)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens


def test_completions_text_and_token_ids(client, server):
    r = client.completions.create(model="demo", prompt="Hello", max_tokens=6, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 6
    ids = list(demo()[1].encode("Hello"))
    same = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    assert same.choices[0].text == r.choices[0].text
    status, body, _ = request(
        server.url + "/v1/completions", {"model": "demo", "prompt": [ids[0], 10**6]}
    )
    assert status == 400 and body["error"]["param"] == "prompt[1]"
    echoed = client.completions.create(
        model="demo", prompt="Hello", max_tokens=3, echo=True, logprobs=2
    )
    assert echoed.choices[0].text.startswith("Hello")
    assert len(echoed.choices[0].logprobs.tokens) == 3


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2)
