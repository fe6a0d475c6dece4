"""DeepSeekMoE 16B (model_type `deepseek`): multi-head attention + DeepSeekMoE. transformers
has no class for it: the reference is a float64 torch transcription of DeepSeek's own
modeling_deepseek.py (moe16b_oracle.py); mlx-lm's models/deepseek.py, given the same
checkpoint, is a second one (and reads what `convert` writes)."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import rel_err
from mlx_deepseek.convert import Options, convert
from mlx_deepseek.convert.synthetic import write_checkpoint
from moe16b_oracle import logits as oracle_logits
from typer.testing import CliRunner

import mlx_deepseek
from mlx_deepseek.cli import app
from mlx_deepseek.errors import ConfigError
from mlx_deepseek.models import model_args
from mlx_deepseek.models.tiny import tiny_v1_config

TOKENS = np.random.RandomState(2).randint(2, 320, size=(2, 15))

# DeepSeekMoE 16B's structure, tiny: 16 heads -> 4, 64 experts top-6 + 2 shared -> 8 top-3 + 2
CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, rope_scaling=None),
    # other shapes: grouped K/V heads, linear RoPE scaling, one shared expert, 2 dense layers
    "gqa": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_scaling={"type": "linear", "factor": 2.0},
        n_shared_experts=1,
        n_routed_experts=6,
        num_experts_per_tok=2,
        first_k_dense_replace=2,
        num_hidden_layers=4,
        rope_theta=50000.0,
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def v1(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_checkpoint(path, tiny_v1_config(**CONFIGS[request.param]), fmt="f32", seed=1)
    return request.param, path


@pytest.fixture(scope="module")
def v1_weights(v1):
    from safetensors.numpy import load_file

    _, path = v1
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def mlx_lm_logits(path, tokens) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def test_logits_match_deepseeks_modeling_code(v1, v1_weights):
    name, path = v1
    model = mlx_deepseek.load_model(path, dtype="float32")
    ours = np.array(model(mx.array(TOKENS)))
    config = tiny_v1_config(**CONFIGS[name])
    for b in range(TOKENS.shape[0]):
        ref = oracle_logits(v1_weights, config, TOKENS[b])
        err = rel_err(ours[b], ref)
        print(f"{name}: max relative logit error vs DeepSeek's code (float64) {err:.2e}")
        assert err < 1e-4
    # the comparison sees the routing: renormalized top-k weights (V2's option) are far off
    other = oracle_logits(v1_weights, {**config, "norm_topk_prob": True}, TOKENS[0])
    assert rel_err(ours[0], other) > 1e-3


def test_logits_match_mlx_lm(v1):
    name, path = v1
    model = mlx_deepseek.load_model(path, dtype="float32")
    ours = np.array(model(mx.array(TOKENS)))
    err = rel_err(ours, mlx_lm_logits(path, TOKENS))
    print(f"{name}: max relative logit error vs mlx-lm {err:.2e}")
    assert err < 1e-4


def test_cached_decode_equals_full_forward(v1):
    _, path = v1
    model = mlx_deepseek.load_model(path, dtype="float32")
    full = np.array(model(mx.array(TOKENS)))
    cache = model.make_cache()
    steps = [model(mx.array(TOKENS[:, :4]), cache=cache)]
    steps += [model(mx.array(TOKENS[:, 4:9]), cache=cache)]  # a chunk after the prefill
    steps += [model(mx.array(TOKENS[:, i : i + 1]), cache=cache) for i in range(9, 15)]
    stepped = np.concatenate([np.array(s) for s in steps], axis=1)
    assert rel_err(stepped, full) < 1e-5
    keys = cache[0].state[0]
    assert keys.shape[1] == model.args.kv_heads and keys.shape[-1] == model.args.head_dim


def test_converted_checkpoint_loads_in_both(v1, tmp_path):
    _, path = v1
    out = tmp_path / "q"
    convert(path, out, Options(bits=8, group_size=32))
    ours = np.array(mlx_deepseek.load_model(out, dtype="float32")(mx.array(TOKENS)))
    assert rel_err(ours, mlx_lm_logits(out, TOKENS)) < 1e-4


def test_info_describes_multi_head_attention(v1):
    name, path = v1
    result = CliRunner().invoke(app, ["info", str(path)], standalone_mode=False)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    args = model_args(tiny_v1_config(**CONFIGS[name]))
    assert "DeepSeekMoE: multi-head attention + DeepSeekMoE" in out
    assert f"{2 * args.kv_heads * args.head_dim * 2} B per-head K/V" in out


@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads=3"),
        (dict(hidden_size=66), "hidden_size=66"),
        (dict(rope_scaling={"type": "yarn", "factor": 4}), "'yarn' is not supported"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    ],
)
def test_bad_configs_name_the_field(changes, needle):
    with pytest.raises(ConfigError) as e:
        model_args(tiny_v1_config(**changes))
    assert needle in str(e.value) and "\n" not in str(e.value)
