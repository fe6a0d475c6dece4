"""mlx-lm's quantized DeepSeek checkpoints load and give the same logits as mlx-lm itself."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_hf_model, read_config, save_hf_checkpoint
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import quantize_model, save_config, save_model

import mlx_deepseek

TOKENS = np.random.RandomState(1).randint(2, 320, size=(1, 12))


def mlx_lm_quantized_checkpoint(hf_path: Path, out: Path, bits: int, group_size: int) -> Path:
    """What `mlx_lm.convert -q` writes, without needing a tokenizer."""
    model, config = mlx_lm_load_model(hf_path, lazy=True)
    model, config = quantize_model(model, config, group_size=group_size, bits=bits)
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


@pytest.mark.parametrize(
    "family,bits,group_size,tol",
    [
        # identical tensors: our logits equal mlx-lm's up to float rounding
        ("v3_noaux", 4, 32, 1e-4),
        ("v3_noaux_noqlora", 8, 64, 1e-4),
        # mlx-lm's V2 keeps a quantized kv_b_proj (expanded cache); we split it at load
        ("v2_greedy", 4, 32, 1e-4),
        ("v2_group", 8, 32, 1e-4),
    ],
)
def test_mlx_lm_quantized_checkpoint_matches_mlx_lm(tmp_path, family, bits, group_size, tol):
    hf_path = save_hf_checkpoint(build_hf_model(family), tmp_path / "hf")
    q_path = mlx_lm_quantized_checkpoint(hf_path, tmp_path / "q", bits, group_size)
    assert read_config(q_path)["quantization"]["bits"] == bits

    ref_model, _ = mlx_lm_load_model(q_path)
    ref = np.array(ref_model(mx.array(TOKENS)))
    ours = mlx_deepseek.load_model(q_path, dtype="float32")
    assert "scales" in ours.layers[1].mlp.switch_mlp.gate_proj  # stayed quantized
    out = np.array(ours(mx.array(TOKENS)))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"{family} {bits}-bit g{group_size}: max relative error vs mlx-lm {err:.2e}")
    assert err < tol


@pytest.mark.parametrize("family", ["v2_greedy", "v3_noaux"])
def test_bf16_sourced_mlx_lm_checkpoint_matches_mlx_lm_in_float32(tmp_path, family):
    """bf16 scales (as real checkpoints have) must not round our split of kv_b_proj."""
    import torch

    hf_path = save_hf_checkpoint(build_hf_model(family).to(torch.bfloat16), tmp_path / "hf")
    q_path = mlx_lm_quantized_checkpoint(hf_path, tmp_path / "q", 4, 64)
    ref_model, _ = mlx_lm_load_model(q_path)
    ref_model.set_dtype(mx.float32)
    ref = np.array(ref_model(mx.array(TOKENS)))
    out = np.array(mlx_deepseek.load_model(q_path, dtype="float32")(mx.array(TOKENS)))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"{family} bf16 source: max relative error vs mlx-lm {err:.2e}")
    assert err < 1e-5


def test_quantized_decode_equals_full_forward(tmp_path):
    hf_path = save_hf_checkpoint(build_hf_model("v3_noaux"), tmp_path / "hf")
    q_path = mlx_lm_quantized_checkpoint(hf_path, tmp_path / "q", 4, 64)
    model = mlx_deepseek.load_model(q_path)
    full = np.array(model(mx.array(TOKENS)))
    cache = model.make_cache()
    parts = [np.array(model(mx.array(TOKENS[:, :4]), cache=cache))]
    for i in range(4, TOKENS.shape[1]):
        parts.append(np.array(model(mx.array(TOKENS[:, i : i + 1]), cache=cache)))
    stepped = np.concatenate(parts, axis=1)
    assert np.abs(stepped - full).max() / np.abs(full).max() < 1e-4
