"""Bad checkpoints and configs give one clear error naming the file, field or tensor."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_hf_model, read_config, save_hf_checkpoint
from typer.testing import CliRunner

import mlx_deepseek
from mlx_deepseek import loading
from mlx_deepseek.cli import app
from mlx_deepseek.errors import CheckpointError, ConfigError, OutOfMemoryError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_hf_checkpoint(build_hf_model("v3_noaux"), tmp_path_factory.mktemp("good"))


@pytest.fixture
def ckpt(good, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good, path)
    return path


def edit_config(path, **changes):
    config = read_config(path)
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (path / "config.json").write_text(json.dumps(config))


def rewrite_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = dict(mx.load(str(file)))
    edit(tensors)
    mx.save_safetensors(str(file), tensors)


@pytest.mark.parametrize(
    "changes,expected",
    [
        (dict(model_type="llama"), "model_type='llama' is not supported"),
        (dict(n_group=3), "n_group=3 does not divide n_routed_experts=8"),
        (dict(hidden_size=None), "missing field(s) hidden_size"),
        (dict(topk_method="best"), "topk_method='best' must be one of"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9 must be in 1..n_routed_experts=8"),
        (dict(qk_rope_head_dim=15), "qk_rope_head_dim=15 must be even"),
    ],
)
def test_bad_config(ckpt, changes, expected):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError) as e:
        mlx_deepseek.load_model(ckpt)
    assert expected in str(e.value)
    assert "config.json" in str(e.value)


def test_missing_expert_tensor(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight is missing"
    ):
        mlx_deepseek.load_model(ckpt)


def test_missing_tensor(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"tensor model\.layers\.1\.self_attn\.o_proj\.weight is missing"
    ):
        mlx_deepseek.load_model(ckpt)


def test_misshaped_tensor(ckpt):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:50]

    rewrite_tensors(ckpt, edit)
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.0\.mlp\.up_proj\.weight has shape \(50, 64\).*\(96, 64\)",
    ):
        mlx_deepseek.load_model(ckpt)


def test_config_that_does_not_match_weights(ckpt):
    edit_config(ckpt, num_hidden_layers=2, num_nextn_predict_layers=0)
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.2"):
        mlx_deepseek.load_model(ckpt)


def test_truncated_file(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* file is truncated"):
        mlx_deepseek.load_model(ckpt)


def test_missing_shard(tmp_path):
    path = save_hf_checkpoint(build_hf_model("v2_greedy"), tmp_path / "s", max_shard_size="60KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    with pytest.raises(
        CheckpointError,
        match=f"shard {shards[-1].name} named in model.safetensors.index.json is missing",
    ):
        mlx_deepseek.load_model(path)


def test_sharded_checkpoint_loads(tmp_path):
    hf = build_hf_model("v2_greedy")
    one = save_hf_checkpoint(hf, tmp_path / "one")
    many = save_hf_checkpoint(hf, tmp_path / "many", max_shard_size="60KB")
    tokens = mx.array([[5, 6, 7, 8]])
    a = np.array(mlx_deepseek.load_model(one)(tokens))
    b = np.array(mlx_deepseek.load_model(many)(tokens))
    np.testing.assert_array_equal(a, b)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint: it has no config.json"):
        mlx_deepseek.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder, and not a Hugging Face repo id"):
        mlx_deepseek.load_model(tmp_path / "nope" / "deeper" / "x")


def test_fp8_checkpoint_asks_for_conversion(ckpt):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight_scale_inv"] = mx.ones((1, 1))

    rewrite_tensors(ckpt, edit)
    with pytest.raises(CheckpointError, match="mlx-deepseek convert"):
        mlx_deepseek.load_model(ckpt)


def test_memory_check_refuses_with_numbers(ckpt, monkeypatch):
    monkeypatch.setattr(loading, "available_memory", lambda: 1000)
    with pytest.raises(
        OutOfMemoryError,
        match=r"needs about .* MB of weights \+ .* MB of cache .* only 0\.0 MB is available",
    ):
        mlx_deepseek.load_model(ckpt)
    monkeypatch.setenv("MLX_DEEPSEEK_SKIP_MEMORY_CHECK", "1")
    mlx_deepseek.load_model(ckpt)


def test_memory_estimate_counts_weights_and_cache(ckpt):
    from mlx_deepseek.models.config import ModelArgs

    args = ModelArgs.from_dict(read_config(ckpt))
    entries = {k: e for k, (_, e) in loading.tensor_entries(ckpt).items()}
    w, c = loading.estimate_memory(args, entries, mx.float16, context=100)
    # the same sums from the arrays themselves (float32 on disk)
    weights = loading.read_tensors(ckpt)
    n_float = sum(v.size for k, v in weights.items() if "e_score_correction_bias" not in k)
    n_bias = sum(v.size for k, v in weights.items() if "e_score_correction_bias" in k)
    assert w == 2 * n_float + 4 * n_bias
    assert c == 2 * 100 * (args.num_hidden_layers + args.num_nextn_predict_layers) * (32 + 16)


def test_hub_repo_resolves_offline_from_local_cache(good, tmp_path, monkeypatch):
    # the Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<rev>/...}
    cache = tmp_path / "hub"
    snap = cache / "models--deepseek-ai--Tiny-V3" / "snapshots" / "0123456789abcdef"
    shutil.copytree(good, snap)
    (cache / "models--deepseek-ai--Tiny-V3" / "refs").mkdir()
    (cache / "models--deepseek-ai--Tiny-V3" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert loading.resolve_model_path("deepseek-ai/Tiny-V3") == snap
    model = mlx_deepseek.load_model("deepseek-ai/Tiny-V3")
    assert len(model.layers) == 3
    with pytest.raises(
        CheckpointError, match="deepseek-ai/Missing: not in the local Hugging Face cache"
    ):
        loading.resolve_model_path("deepseek-ai/Missing")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(tmp_path)], standalone_mode=False)
    assert isinstance(result.exception, CheckpointError)


def test_cli_error_line_without_traceback(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from mlx_deepseek.cli import main; main()", "info", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no config.json" in lines[0]
    assert "Traceback" not in out.stderr
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
