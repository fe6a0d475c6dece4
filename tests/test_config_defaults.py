"""Defaults follow model_type (issue 12 item 10): configs as transformers 5 and DeepSeek's own
classes write them, with their default fields, load and match transformers' logits."""

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_from_config, hf_logits, read_config, rel_err

import mlx_deepseek
from mlx_deepseek.models import tiny
from mlx_deepseek.models.config import ModelArgs

TOKENS = np.random.RandomState(1).randint(0, 256, size=(2, 12))
# sizes only (the tiny models' widths): every routing field keeps the config class's default
SIZES = dict(tiny.WIDTHS, vocab_size=256, q_lora_rank=24)


def v2_config():
    from transformers import DeepseekV2Config

    # DeepseekV2Config's num_experts_per_tok default (None) cannot run in transformers either
    return DeepseekV2Config(**SIZES, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2)


def v3_config():
    from transformers import DeepseekV3Config

    # defaults: n_group 8, topk_group 4, top-8, first_k_dense_replace 3, routed_scaling 2.5
    return DeepseekV3Config(**SIZES, num_hidden_layers=5, n_routed_experts=16)


@pytest.fixture(scope="module", params=["v2", "v3"])
def saved(request, tmp_path_factory):
    hf = build_from_config(v2_config() if request.param == "v2" else v3_config())
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)  # transformers 5's own config.json (rope_parameters, dtype, ...)
    return request.param, hf, path


def ours(path) -> np.ndarray:
    return np.array(mlx_deepseek.load_model(path, dtype="float32")(mx.array(TOKENS)))


def test_transformers_config_with_default_fields_loads_and_matches(saved):
    family, hf, path = saved
    config = read_config(path)
    assert "scoring_func" not in config  # what made V2 fail: the V3 default (sigmoid) was used
    if family == "v3":
        assert "topk_method" not in config
    args = ModelArgs.from_dict(config)
    want = ("greedy", "softmax") if family == "v2" else ("noaux_tc", "sigmoid")
    assert (args.topk_method, args.scoring_func) == want
    assert rel_err(ours(path), hf_logits(hf, TOKENS).numpy()) < 1e-4


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda c: c.update(topk_method="gready"), id="deepseek-spelling-gready"),
        pytest.param(lambda c: [c.pop(k) for k in ("topk_method", "norm_topk_prob")], id="unset"),
        pytest.param(lambda c: c.update(topk_method=None, scoring_func=None), id="null"),
    ],
)
def test_v2_routing_defaults(tmp_path_factory, edit):
    hf = build_from_config(v2_config())
    path = tmp_path_factory.mktemp("v2edit")
    hf.save_pretrained(path)
    config = read_config(path)
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    args = ModelArgs.from_dict(config)
    assert (args.topk_method, args.scoring_func, args.norm_topk_prob) == (
        "greedy",
        "softmax",
        False,
    )
    assert rel_err(ours(path), hf_logits(hf, TOKENS).numpy()) < 1e-4


def test_v3_keeps_its_own_defaults():
    config = {"model_type": "deepseek_v3", **SIZES, "num_hidden_layers": 2}
    config |= {"n_routed_experts": 8, "num_experts_per_tok": 2}
    args = ModelArgs.from_dict(config)
    assert (args.topk_method, args.scoring_func, args.norm_topk_prob) == (
        "noaux_tc",
        "sigmoid",
        True,
    )
