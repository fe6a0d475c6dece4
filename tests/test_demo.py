"""The bundled demo model (mlx_deepseek/demo/) and the code that trains it (demo_train/)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_deepseek import load
from mlx_deepseek.demo_train import data
from mlx_deepseek.demo_train.config import CONFIG, TRAIN_CONTEXT, count_parameters
from mlx_deepseek.demo_train.evaluate import (
    answer_text,
    arithmetic_accuracy,
    chat_prompt,
    greedy_generate,
)
from mlx_deepseek.loading import demo_path
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.deepseek_v3 import Model

DEMO = demo_path()


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def ask(model, tokenizer, question: str) -> str:
    [ids] = greedy_generate(model, [chat_prompt(tokenizer, question)], tokenizer.eos_token_id)
    return answer_text(tokenizer, ids)


# ---- the shipped artifacts -----------------------------------------------------------------


def test_demo_is_small_and_quantized():
    size = sum(f.stat().st_size for f in DEMO.iterdir() if f.is_file())
    assert size < 4 * 2**20, f"demo package data is {size} bytes"
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["quantization"]["bits"] == 4
    assert config["num_nextn_predict_layers"] == 1
    assert (DEMO / "mtp.safetensors").exists()


def test_demo_answers_the_readme_questions(demo):
    model, tokenizer = demo
    # both pairs are in the held-out split: never seen in training
    split = data.make_split()
    assert split.add_is_held(23, 45) and split.sub_is_held(71, 38)
    assert ask(model, tokenizer, "What is 23 + 45?") == "23 + 45 = 68."
    assert ask(model, tokenizer, "What is 71 - 38?") == "71 - 38 = 33."


def test_demo_held_out_arithmetic(demo):
    model, tokenizer = demo
    acc = arithmetic_accuracy(model, tokenizer, data.make_split(), limit=48)
    assert acc["all"] >= 0.9, acc


def test_demo_thinks_on_three_digit_sums(demo):
    model, tokenizer = demo
    prompt = chat_prompt(tokenizer, "What is 345 + 278?")
    [ids] = greedy_generate(model, [prompt], tokenizer.eos_token_id, max_tokens=120)
    text = tokenizer.decode(ids)
    assert text.startswith("<think>\n") and "</think>" in text
    assert answer_text(tokenizer, ids).startswith("345 + 278 = ")


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
    vocab = tokenizer.get_vocab()
    assert "<think>" in vocab and "</think>" in vocab
    assert tokenizer.decode(tokenizer.encode("<think>\n12</think>", add_special_tokens=False)) == (
        "<think>\n12</think>"
    )


# ---- the training code ---------------------------------------------------------------------


def test_held_out_pairs_never_appear_in_training_dialogues(monkeypatch):
    split = data.make_split()
    asked = []
    real = data.arith_turn
    monkeypatch.setattr(
        data,
        "arith_turn",
        lambda rng, op, a, b: asked.append((op, a, b)) or real(rng, op, a, b),
    )
    rng = random.Random(0)
    for _ in range(20000):
        data.sample_turn(rng, split)
    two_digit = [(op, a, b) for op, a, b in asked if 10 <= a <= 99 and 10 <= b <= 99]
    assert len(two_digit) > 5000
    for op, a, b in two_digit:
        assert not (split.add_is_held(a, b) if op == "+" else split.sub_is_held(a, b))
    held_rng = random.Random(1)
    draws = {data.sample_pair(held_rng, "+", 2, split, held=True) for _ in range(200)}
    assert draws <= set(split.held_add_questions())


def _read_trace(trace: str) -> int:
    """The answer a trace spells: the last line's result, then the other lines' last digits."""
    results = [line.rsplit(" = ", 1)[1] for line in trace.split("\n")]
    return int(results[-1] + "".join(r[-1] for r in reversed(results[:-1])))


def test_traces_spell_the_right_answer():
    assert data.add_trace(345, 278) == "5 + 8 + 0 = 13\n4 + 7 + 1 = 12\n3 + 2 + 1 = 6"
    assert data.sub_trace(71, 38) == "11 - 8 - 0 = 3\n7 - 3 - 1 = 3"
    rng = random.Random(5)
    for _ in range(2000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        assert _read_trace(data.add_trace(a, b)) == a + b
        a, b = max(a, b), min(a, b)
        assert _read_trace(data.sub_trace(a, b)) == a - b


def test_packed_rows_match_the_chat_template(demo):
    from tokenizers import Tokenizer

    from mlx_deepseek.demo_train.packing import Packer

    _, tokenizer = demo
    packer = Packer(Tokenizer.from_file(str(DEMO / "tokenizer.json")), TRAIN_CONTEXT + 1)
    turns = [("What is 345 + 278?", data.think("trace", "345 + 278 = 623.")), ("Hi", "Hello!")]
    ids, mask = packer.conversation(turns)
    messages = []
    for u, a in turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    # the template drops the think trace from every assistant message; the packer keeps it in
    # the last turn only (it is what the model must learn to produce)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    learnt = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert learnt == "Hello!<｜end▁of▁sentence｜>"  # the stripped first answer is not learnt
    ids2, mask2 = packer.conversation(turns[::-1])
    assert "<think>" in tokenizer.decode([t for t, m in zip(ids2, mask2, strict=True) if m])


def test_export_round_trips_through_the_loader(tmp_path: Path):
    from mlx_deepseek.demo_train.export import export_hf

    mx.random.seed(3)
    args = ModelArgs.from_dict(CONFIG)
    model = Model(args)
    for i in (1, 2):  # non-zero routers and biases so that routing is exercised
        gate = model.layers[i].mlp.gate
        gate.weight = mx.random.normal(gate.weight.shape)
        gate.e_score_correction_bias = mx.random.normal((args.n_routed_experts,)) * 0.1
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((DEMO / f).read_bytes())
    export_hf(model, CONFIG, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    n = args.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.self_attn.kv_b_proj.weight" in names
    assert f"model.layers.{n}.embed_tokens.weight" in names
    assert f"model.layers.{n}.shared_head.head.weight" in names
    assert not any("switch_mlp" in k or "embed_q" in k for k in names)

    loaded, _ = load(str(tmp_path))
    x = mx.array([[0, 3, 40, 50, 60, 4, 70, 80]])
    ref_logits, ref_h = model.forward_with_hidden(x)
    got_logits, got_h = loaded.forward_with_hidden(x)
    assert np.allclose(np.array(ref_logits), np.array(got_logits), atol=1e-4)
    ref_mtp, _ = model.mtp_forward(ref_h[:, :-1], x[:, 1:])
    got_mtp, _ = loaded.mtp_forward(got_h[:, :-1], x[:, 1:])
    assert np.allclose(np.array(ref_mtp), np.array(got_mtp), atol=1e-4)


def test_parameter_count_matches_the_model():
    from mlx.utils import tree_flatten

    total, mtp, active = count_parameters()
    model = Model(ModelArgs.from_dict(CONFIG))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == total + mtp
    assert active < total


def test_load_balancer_moves_bias_towards_the_idle_experts():
    from mlx_deepseek.demo_train.routing import LoadBalancer

    model = Model(ModelArgs.from_dict(CONFIG))
    balancer = LoadBalancer(model, gamma=0.01)
    x = mx.array([[0, 3, 40, 50, 60, 4, 70, 80]])
    logits, h = model.forward_with_hidden(x)  # zero routers: the first experts always win
    model.mtp_forward(h[:, :-1], x[:, 1:])
    mask = np.ones((1, 8), dtype=bool)
    loads = balancer.update(
        {name: mask if name.startswith("model.") else mask[:, 1:] for name, _ in balancer.layers}
    )
    for name, moe in balancer.layers:
        bias = np.array(moe.gate.e_score_correction_bias)
        busy = loads[name] > loads[name].mean()
        assert (bias[busy] < 0).all() and (bias[~busy] > 0).all(), (name, loads[name], bias)
        assert moe.gate.e_score_correction_bias.dtype == mx.float32
