"""The MLX model is the same function as transformers' DeepSeek V2/V3 (the reference)."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import FAMILIES, build_hf_model, hf_logits, rel_err, save_hf_checkpoint

import mlx_deepseek
from mlx_deepseek.models.mla import MLAttention

TOKENS = np.random.RandomState(0).randint(2, 320, size=(2, 16))


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    hf = build_hf_model(family)
    # V3 fixtures keep transformers 5's `rope_parameters`; V2 ones DeepSeek's `rope_scaling`
    rope_format = "transformers" if family.startswith("v3") else "deepseek"
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp(family), rope_format=rope_format)
    model = mlx_deepseek.load_model(path, dtype="float32")
    return family, hf, model


def set_absorb(model, value):
    for layer in model.layers:
        layer.self_attn.absorb = value


def test_logits_match_transformers(checkpoint):
    family, hf, model = checkpoint
    ref = hf_logits(hf, TOKENS).numpy()
    out = np.array(model(mx.array(TOKENS)))
    assert out.shape == (2, 16, 320)
    err = rel_err(out, ref)
    print(f"{family}: max relative logit error {err:.2e}")
    assert err < 1e-4


def test_cached_decode_equals_full_forward(checkpoint):
    _, _, model = checkpoint
    full = np.array(model(mx.array(TOKENS)))
    cache = model.make_cache()
    steps = [model(mx.array(TOKENS[:, :5]), cache=cache)]  # a 5-token prefill
    for i in range(5, TOKENS.shape[1]):
        steps.append(model(mx.array(TOKENS[:, i : i + 1]), cache=cache))
    stepped = np.concatenate([np.array(s) for s in steps], axis=1)
    assert rel_err(stepped, full) < 1e-5
    # only the latent is cached: c_kv (kv_lora_rank) and k_pe (qk_rope_head_dim), one head
    keys, values = cache[0].state[:2]
    assert keys.shape[:2] == (2, 1) and keys.shape[-1] == model.args.kv_lora_rank
    assert values.shape[-1] == model.args.qk_rope_head_dim


def test_absorbed_equals_expanded(checkpoint):
    _, _, model = checkpoint
    try:
        set_absorb(model, True)
        absorbed = np.array(model(mx.array(TOKENS)))
        set_absorb(model, False)
        expanded = np.array(model(mx.array(TOKENS)))
    finally:
        set_absorb(model, None)
    assert rel_err(absorbed, expanded) < 1e-5


def test_batch_of_two_equals_two_of_one(checkpoint):
    _, _, model = checkpoint
    both = np.array(model(mx.array(TOKENS)))
    one = np.array(model(mx.array(TOKENS[:1])))
    two = np.array(model(mx.array(TOKENS[1:])))
    assert rel_err(np.concatenate([one, two]), both) < 1e-5


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_low_precision_dtypes_run_close(tmp_path, dtype, tol):
    # dense layers only: in a random MoE, rounding flips near-tied routing decisions
    hf = build_hf_model("v3_noaux", first_k_dense_replace=3)
    path = save_hf_checkpoint(hf, tmp_path / "m")
    ref = hf_logits(hf, TOKENS).numpy()
    model = mlx_deepseek.load_model(path, dtype=dtype)
    out = model(mx.array(TOKENS))
    assert out.dtype == getattr(mx, dtype)
    assert rel_err(np.array(out.astype(mx.float32)), ref) < tol


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_moe_matches_float32_for_the_same_routing(tmp_path, dtype):
    from mlx_deepseek import ops

    path = save_hf_checkpoint(build_hf_model("v3_noaux"), tmp_path / "m")
    moe32 = mlx_deepseek.load_model(path, dtype="float32").layers[1].mlp
    moe_lp = mlx_deepseek.load_model(path, dtype=dtype).layers[1].mlp
    assert moe_lp.gate.e_score_correction_bias.dtype == mx.float32
    x = mx.random.normal((2, 7, 64), key=mx.random.key(1))
    inds, scores = moe32.gate(x)
    ref = ops.moe(x, inds, scores, moe32.switch_mlp, moe32.shared_experts)
    x_lp = x.astype(getattr(mx, dtype))
    out = ops.moe(x_lp, inds, scores, moe_lp.switch_mlp, moe_lp.shared_experts)
    assert out.dtype == x_lp.dtype
    assert rel_err(np.array(out.astype(mx.float32)), np.array(ref)) < 0.03


def test_absorb_heuristic_prefers_expanded_for_long_prefill():
    from mlx_deepseek.models.config import ModelArgs
    from mlx_deepseek.models.mla import use_absorbed

    args = ModelArgs()  # DeepSeek-V3 shapes
    assert use_absorbed(args, 1) and use_absorbed(args, 8)
    assert not use_absorbed(args, 512)
    assert isinstance(MLAttention, type)
