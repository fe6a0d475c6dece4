"""The bundled demo model (mlx_deepseek/demo/): issue 18's targets on samples of the held-out
data (the full measurement is `python -m mlx_deepseek.demo_train.evaluate`), through the
product's own chat format and output parser, the chat's /think, and a tool call through the
server. Every question comes from the held-out split: 2-digit pairs, cities and words that no
training conversation contains."""

from __future__ import annotations

import json

import pytest

from mlx_deepseek import load
from mlx_deepseek.demo_train import data, metrics, tools
from mlx_deepseek.demo_train.config import LONG_CONTEXT
from mlx_deepseek.loading import demo_path
from mlx_deepseek.ops import cpu

DEMO = demo_path()


@pytest.fixture(scope="module")
def demo():
    with pytest.MonkeyPatch.context() as mp:  # as users run it: from float weights on the CPU
        mp.setenv(cpu.ENV_SMALL_FLOAT, "1")
        return load("demo")


@pytest.fixture(scope="module")
def ev(demo):
    return metrics.Evaluator(*demo, json.loads((DEMO / "config.json").read_text()))


def ask(ev: metrics.Evaluator, question: str, thinking: bool = False, declared=None):
    prompt = ev.render([{"role": "user", "content": question}], thinking, declared)
    return ev.answer([prompt], 120)[0]


# ---- the shipped artifacts -----------------------------------------------------------------


def test_demo_is_small_quantized_and_long():
    size = sum(f.stat().st_size for f in DEMO.iterdir() if f.is_file())
    assert size < 2 * 2**20, f"demo package data is {size} bytes"
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["quantization"]["bits"] == 4
    assert config["num_nextn_predict_layers"] == 1
    assert (DEMO / "mtp.safetensors").exists()
    yarn = config["rope_scaling"]
    assert yarn["type"] == "yarn" and yarn["factor"] > 1
    assert config["max_position_embeddings"] >= LONG_CONTEXT >= 1024


def test_demo_template_renders_as_deepseek_v31(demo):
    # DeepSeek V3.1's own template: every past answer after `<｜Assistant｜></think>`; the
    # generation prompt ends `</think>` (thinking off) or `<think>` (thinking on)
    _, tokenizer = demo
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "Hi"},
    ]
    head = (
        "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3?<｜Assistant｜></think>2 + 3 = 5."
        "<｜end▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"
    )
    for thinking, tail in ((False, "</think>"), (True, "<think>")):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, thinking=thinking
        )
        assert text == head + tail


# ---- the targets, on samples ----------------------------------------------------------------


def test_demo_answers_the_readme_questions(ev):
    # both pairs are in the held-out split: never seen in training
    split = data.make_split()
    assert split.add_is_held(23, 45) and split.sub_is_held(71, 38)
    off = ask(ev, "What is 23 + 45?")
    assert off.content == "23 + 45 = 68." and off.reasoning == ""
    on = ask(ev, "What is 71 - 38?", thinking=True)
    assert on.content == "71 - 38 = 33."
    assert on.reasoning.startswith("71 - 38\n") and "= 3" in on.reasoning


def test_held_out_arithmetic_at_turn_1_and_turn_10(ev):
    first = metrics.arithmetic(ev, limit=40, turn=1)  # thinking off: answered directly
    assert first["accuracy"] >= 0.9, first
    tenth = metrics.arithmetic(ev, limit=40, turn=10)
    assert tenth["accuracy"] >= 0.9, tenth
    assert tenth["prompt_tokens"][0] > 150  # nine exchanges came first


def test_held_out_arithmetic_in_thinking_mode(ev):
    row = metrics.arithmetic(ev, limit=16, turn=1, thinking=True)
    assert row["accuracy"] >= 0.9, row


def test_held_out_arithmetic_after_a_thousand_tokens(ev):
    row = metrics.arithmetic(ev, limit=8, turn=1, context=1000)
    assert row["prompt_tokens"][0] >= 960
    assert row["accuracy"] >= 0.75, row


def test_tool_calls_parse_as_calls(ev):
    # Measured (demo_train/README.md, 1,200 fresh held-out cases, the shipped package): 99.3%
    # of the calls parse as V3.1 calls with JSON arguments, 95% have exactly the right
    # arguments (the model still garbles some names it copies), and 93% of the answers to
    # right calls use the results (issue 18 asks 90%; two of the 16 held-out definitions are
    # never copied right). These 15 give 100% / 100% / 93%; the thresholds leave room for
    # n=15's sampling noise and a retrained package.
    row = metrics.tool_use(ev, n=15)
    assert row["well_formed"] >= 0.9, row
    assert row["right_call"] >= 0.7, row
    assert row["result_used"] >= 0.7, row


def test_no_tool_call_without_a_need(ev):
    row = metrics.arithmetic(ev, limit=16, turn=2, tools=True)  # tools declared, not needed
    assert row["accuracy"] >= 0.85, row
    refusal = ask(ev, "What's the weather in Lisbon?")  # no tools declared: no call
    assert not refusal.calls and "no weather tool" in refusal.content


def test_self_description(ev):
    row = metrics.self_description(ev)
    assert row["accuracy"] >= 0.9, row
    assert "mlx-deepseek demo" in metrics.INTRO and "I am fine" not in metrics.INTRO


def test_mtp_drafts_are_mostly_accepted(ev):
    ev.generated.clear()
    metrics.arithmetic(ev, limit=8, turn=3)
    metrics.tool_use(ev, n=6)
    row = metrics.mtp_acceptance(ev)
    assert row["drafted"] > 100 and row["acceptance"] >= 0.9, row


def test_kv_cache_error_is_measured_as_the_kv_test_bounds_it(ev):
    """evaluate.py's kv_cache_4bit row: a candidate demo's 4-bit latent cache is measured before
    it is picked, over its own answers and on tests/test_kv_quantized.py's sentence."""
    import numpy as np
    from test_kv_quantized import decode_logits

    from mlx_deepseek.models.cache import KVCache, QuantizedKVCache, latent_group_size

    ev.generated.clear()
    metrics.arithmetic(ev, limit=6, turn=2)
    metrics.tool_use(ev, n=4)
    rows = {bits: metrics.kv_cache_error(ev, bits, limit=8) for bits in (8, 4)}
    assert ev.model.kv_bits is None  # the model's own caches are full precision again
    assert rows[4]["steps"] > 50 and rows[4]["bits"] == 4 and rows[4]["test_bound"] == 0.05
    assert 0 < rows[8]["median_error"] < rows[4]["median_error"] < 0.05, rows
    assert rows[4]["argmax_changed"] <= 0.02 and rows[8]["kl_mean"] < rows[4]["kl_mean"], rows
    # the test's own figure, computed its way
    model, tokens = ev.model, ev.tokenizer.encode(metrics.KV_TEST_TEXT)
    g = latent_group_size(model.args.kv_lora_rank)
    full = decode_logits(model, tokens, KVCache)
    quant = decode_logits(model, tokens, lambda: QuantizedKVCache(g, 4))
    want = np.median(np.abs(quant - full).max(-1)) / np.abs(full).max()
    assert rows[4]["test_sentence"] == pytest.approx(want, rel=1e-4)
    assert rows[4]["test_sentence"] < 0.05


# ---- the chat and the server drive it ---------------------------------------------------------


def test_chat_think_switch(demo):
    from mlx_deepseek.chat.session import ChatSession

    from mlx_deepseek.sampling import SamplingSettings

    model, tokenizer = demo
    s = ChatSession(model, tokenizer, name="demo", max_tokens=120, settings=SamplingSettings())
    assert s.fmt.family == "v3.1" and s.fmt.has_thinking_switch
    chunks = list(s.respond("What is 23 + 45?"))
    assert not [c for c in chunks if c.kind == "reasoning"]
    assert "".join(c.text for c in chunks).strip() == "23 + 45 = 68."
    s.set_thinking(True)
    chunks = list(s.respond("What is 71 - 38?"))
    reasoning = "".join(c.text for c in chunks if c.kind == "reasoning")
    assert reasoning.strip().startswith("71 - 38")
    assert "".join(c.text for c in chunks if c.kind == "answer").strip() == "71 - 38 = 33."
    # the history keeps only the answer (V3.1 drops the reasoning), as the template writes it
    assert s.messages[-1] == {"role": "assistant", "content": "71 - 38 = 33."}


def test_a_tool_call_through_the_server():
    import openai
    from serve_helpers import demo_server

    with demo_server() as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What's the weather in Lisbon?"}]
        first = client.chat.completions.create(
            model="demo", messages=messages, tools=tools.TOOLS, temperature=0, max_tokens=60
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Lisbon"}  # a held-out city
        result = {"city": "Lisbon", "temperature_c": 21, "condition": "sunny"}
        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
        ]
        second = client.chat.completions.create(
            model="demo", messages=messages, tools=tools.TOOLS, temperature=0, max_tokens=60
        )
        answer = second.choices[0].message.content
        assert answer == "Lisbon: sunny, 21 °C."  # the README's output


@pytest.mark.slow  # ~35 s: every row of the evaluation, on small samples
def test_the_evaluation_script_runs_every_row(tmp_path, capsys):
    from mlx_deepseek.demo_train import evaluate

    out = tmp_path / "eval.json"
    evaluate.main(
        ["demo", "--limit", "4", "--tool-cases", "6", "--tool-seed", "5", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["demo"]
    assert {"tools_think_off", "copy_held_out", "mtp", "kv_cache_4bit"} <= set(rows)
    tools_row = rows["tools_think_off"]
    assert tools_row["n"] == 6 and 0 <= tools_row["result_used"] <= 1
    # per held-out word: "used/right calls"; the right calls are counted once each
    counts = [tuple(map(int, v.split("/"))) for v in tools_row["lookups_by_word"].values()]
    assert counts and all(0 <= u <= k for u, k in counts)
    assert rows["kv_cache_4bit"]["test_sentence"] < 0.05 and "the test's sentence" in printed
