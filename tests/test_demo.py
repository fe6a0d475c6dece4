"""The bundled demo model (mlx_deepseek/demo/): its guarantees on samples of the held-out data,
measured with demo_train.metrics through the product's own chat format and output parser.

The shipped package is still the earlier demo (V3 format, reasoning on every arithmetic
answer, no thinking switch, no tools): the V3.1 retraining of issue 18 did not reach its
targets in the time it had (see demo_train/README.md). These are the guarantees it keeps.
"""

from __future__ import annotations

import json

import pytest

from mlx_deepseek import load
from mlx_deepseek.demo_train import data, metrics
from mlx_deepseek.loading import demo_path

DEMO = demo_path()


@pytest.fixture(scope="module")
def demo():
    return load("demo")


@pytest.fixture(scope="module")
def ev(demo):
    return metrics.Evaluator(*demo, json.loads((DEMO / "config.json").read_text()))


# ---- the shipped artifacts -----------------------------------------------------------------


def test_demo_is_small_and_quantized():
    size = sum(f.stat().st_size for f in DEMO.iterdir() if f.is_file())
    assert size < 2 * 2**20, f"demo package data is {size} bytes"
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["quantization"]["bits"] == 4
    assert config["num_nextn_predict_layers"] == 1
    assert (DEMO / "mtp.safetensors").exists()
    assert config["rope_scaling"]["type"] == "yarn"


def test_demo_tokenizer_and_template(demo):
    _, tokenizer = demo
    assert tokenizer.bos_token == "<｜begin▁of▁sentence｜>"
    assert tokenizer.eos_token == "<｜end▁of▁sentence｜>"
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\nOnes: 2 + 3 + 0 = 5.\n</think>\n\n2 + 3 = 5."},
        {"role": "user", "content": "Hi"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3?<｜Assistant｜>2 + 3 = 5."
        "<｜end▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"
    )


# ---- the guarantees, on samples ---------------------------------------------------------------


def test_demo_answers_the_readme_questions(demo):
    from mlx_deepseek.chat.session import ChatSession

    from mlx_deepseek.sampling import SamplingSettings

    # both pairs are in the held-out split: never seen in training
    split = data.make_split()
    assert split.add_is_held(23, 45) and split.sub_is_held(71, 38)
    model, tokenizer = demo
    s = ChatSession(model, tokenizer, name="demo", max_tokens=120, settings=SamplingSettings())
    for question, answer in (
        ("What is 23 + 45?", "23 + 45 = 68."),
        ("What is 71 - 38?", "71 - 38 = 33."),
    ):
        chunks = list(s.respond(question))
        reasoning = "".join(c.text for c in chunks if c.kind == "reasoning")
        content = "".join(c.text for c in chunks if c.kind == "answer").strip()
        assert reasoning.strip().startswith(question[8:-1])  # the column trace
        assert content == answer
    # the history keeps only the answers, as the template writes them
    assert s.messages[-1]["role"] == "assistant"
    assert s.messages[-1]["content"].strip() == "71 - 38 = 33."


def test_held_out_arithmetic_at_turn_1(ev):
    # the earlier demo reasons before every arithmetic answer: the thinking budget of tokens
    row = metrics.arithmetic(ev, limit=48, turn=1, thinking=True)
    assert row["accuracy"] >= 0.9, row
    assert row["n"] == 48 and row["prompt_tokens"][0] > 10


def test_mtp_drafts_are_mostly_accepted(ev):
    ev.generated.clear()
    metrics.arithmetic(ev, limit=12, turn=1, thinking=True)
    row = metrics.mtp_acceptance(ev)
    assert row["drafted"] > 100 and row["acceptance"] >= 0.85, row
