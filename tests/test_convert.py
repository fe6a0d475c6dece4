"""`convert` end to end on tiny checkpoints in the real Hugging Face layouts.

References: transformers' DeepseekV3/V2ForCausalLM (torch, float32) on the weights the
source checkpoint represents, and mlx-lm's own loader and quantizer.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import rel_err
from mlx_deepseek.convert.pipeline import convert
from mlx_deepseek.convert.plan import Options
from mlx_deepseek.convert.synthetic import write_checkpoint
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import quantize_model
from safetensors import safe_open
from typer.testing import CliRunner

from mlx_deepseek.cli import app
from mlx_deepseek.loading import load_model
from mlx_deepseek.models.tiny import convertible_config

TOKENS = np.random.RandomState(0).randint(2, 300, size=(2, 16))
F32 = Options(quantize=False, dtype="float32")


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def ours(path: Path) -> np.ndarray:
    return logits(load_model(path, dtype="float32"))


def transformers_logits(path: Path) -> np.ndarray:
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    v3 = json.loads((path / "config.json").read_text())["model_type"] == "deepseek_v3"
    cls = DeepseekV3ForCausalLM if v3 else DeepseekV2ForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def kl(ref: np.ndarray, q: np.ndarray) -> float:
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, lq = log_softmax(ref), log_softmax(q)
    return float((np.exp(p) * (p - lq)).sum(-1).mean())


def tensors(path: Path, pattern: str = "*.safetensors") -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(path.glob(pattern)):
        with safe_open(str(f), "numpy") as g:  # our shards must read with the reference reader
            for k in g.keys():
                if g.get_slice(k).get_dtype() == "BF16":
                    out[k] = np.array(mx.load(str(f))[k].view(mx.uint16))
                else:
                    out[k] = g.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """A V3 FP8 checkpoint in 3 shards, every other scale in the next shard, with an MTP layer."""
    root = tmp_path_factory.mktemp("fp8")
    cfg = convertible_config("deepseek_v3")
    eff = write_checkpoint(
        root / "src", cfg, fmt="fp8", shards=3, block=(32, 48), scales_elsewhere=True
    )
    main = [k for k in eff if not k.startswith("model.layers.3.")]
    write_checkpoint(root / "eff", cfg, {k: eff[k] for k in main}, fmt="f32")
    convert(root / "src", root / "f32", F32)
    return root, eff


def test_fp8_fixture_has_scales_in_other_shards_and_partial_blocks(fp8):
    root, _ = fp8
    wm = json.loads((root / "src/model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(wm.values())) == 3
    moved = [k for k in wm if k.endswith("_scale_inv") and wm[k] != wm[k[: -len("_scale_inv")]]]
    assert len(moved) > 10
    # kv_a_proj_with_mqa is [80, 64]: 32x48 blocks leave partial edges on both axes
    with safe_open(
        str(root / "src" / wm["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]), "pt"
    ) as g:
        w = g.get_tensor("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
    assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (80, 64)


def test_unquantized_fp8_conversion_matches_transformers(fp8):
    root, _ = fp8
    err = rel_err(ours(root / "f32"), transformers_logits(root / "eff"))
    print(f"fp8 -> float32: max relative error vs transformers {err:.2e}")
    assert err < 1e-4
    config = json.loads((root / "f32/config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (root / "f32" / name).read_bytes() == (root / "src" / name).read_bytes()
    assert "chat_template" in json.loads((root / "f32/tokenizer_config.json").read_text())


def test_quantized_conversions_stay_close_and_mixed_beats_uniform(fp8):
    root, _ = fp8
    ref = ours(root / "f32")
    results = {}
    for recipe in ("uniform", "mixed"):
        dst = root / f"q4-{recipe}"
        summary = convert(root / "src", dst, Options(bits=4, recipe=recipe, dtype="float32"))
        results[recipe] = (kl(ref, ours(dst)), summary.bits_per_weight)
    print({k: f"KL {v[0]:.4f}, {v[1]:.2f} bits/weight" for k, v in results.items()})
    (kl_u, bpw_u), (kl_m, bpw_m) = results["uniform"], results["mixed"]
    assert 0 < kl_u < 0.6
    assert 0 < kl_m < 0.8 * kl_u
    assert 4.5 <= bpw_u < bpw_m < 8
    q = json.loads((root / "q4-mixed/config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
    }
    six = {"group_size": 64, "bits": 6, "mode": "affine"}
    for module in (
        "model.embed_tokens",
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.embed_q",
        "model.layers.1.self_attn.unembed_out",
        "model.layers.2.mlp.shared_experts.up_proj",
        "mtp.0.eh_proj",
    ):
        assert q[module] == six, module
    assert "model.layers.1.mlp.switch_mlp.gate_proj" not in q  # the default: 4 bits
    assert not any("gate.weight" in k or "norm" in k for k in q)
    assert json.loads((root / "q4-mixed/config.json").read_text())["quantization_config"] == q


@pytest.mark.parametrize("recipe", ["none", "uniform", "mixed"])
def test_mlx_lm_loads_the_output_and_agrees(fp8, recipe):
    root, _ = fp8
    dst = root / "f32" if recipe == "none" else root / f"lm-{recipe}"
    if recipe != "none":
        convert(root / "src", dst, Options(bits=4, recipe=recipe, dtype="float32"))
    model, _ = mlx_lm_load_model(dst)  # strict: every tensor must be one it expects
    err = rel_err(logits(model), ours(dst))
    assert err < 1e-4
    layer = model.model.layers[1]
    if recipe == "none":
        assert not hasattr(layer.mlp.switch_mlp.gate_proj, "bits")
    else:
        assert layer.mlp.switch_mlp.gate_proj.bits == 4
        high = 6 if recipe == "mixed" else 4
        assert layer.self_attn.q_b_proj.bits == high
        assert layer.self_attn.embed_q.bits == high
        assert model.lm_head.bits == high
        assert layer.mlp.gate.weight.dtype == mx.float32  # the router stays a plain matrix


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_quantized_bytes_equal_mlx_lm_quantizing_the_same_checkpoint(tmp_path, fmt):
    # mlx-lm's own path: load (its sanitize dequantizes FP8 with 128x128 blocks, stacks
    # experts, splits kv_b_proj), quantize_model; ours streams: the bytes must be equal
    cfg = convertible_config("deepseek_v3", num_nextn_predict_layers=0)
    write_checkpoint(tmp_path / "src", cfg, fmt=fmt, block=(128, 128), shards=2)
    convert(tmp_path / "src", tmp_path / "q", Options(bits=4, group_size=64))
    model, config = mlx_lm_load_model(tmp_path / "src", lazy=True)
    model, _ = quantize_model(model, config, group_size=64, bits=4)
    from mlx.utils import tree_flatten

    theirs = {
        k: np.array(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v)
        for k, v in tree_flatten(model.parameters())
    }
    mine = tensors(tmp_path / "q")
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        assert np.array_equal(mine[k], theirs[k]), k


def test_mtp_goes_to_its_own_file_and_no_mtp_drops_it(fp8, tmp_path):
    root, eff = fp8
    with_mtp, without = root / "f32", tmp_path / "no-mtp"
    convert(root / "src", without, Options(quantize=False, dtype="float32", mtp=False))
    assert not (without / "mtp.safetensors").exists()
    mtp = tensors(with_mtp, "mtp.safetensors")
    assert mtp and all(k.startswith("mtp.0.") for k in mtp)
    # its embed_tokens / shared_head.head equal the main model's: not stored twice
    assert "mtp.0.embed_tokens.weight" not in mtp and "mtp.0.shared_head.head.weight" not in mtp
    np.testing.assert_array_equal(mtp["mtp.0.eh_proj.weight"], eff["model.layers.3.eh_proj.weight"])
    assert mtp["mtp.0.mlp.switch_mlp.up_proj.weight"].shape == (8, 64, 64)
    wm = json.loads((with_mtp / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k, f in wm.items() if f == "mtp.safetensors"} == set(mtp)
    # the main shards are the same either way
    a, b = tensors(with_mtp, "model*.safetensors"), tensors(without, "model*.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((without / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert len(load_model(with_mtp).mtp) == 1 and len(load_model(without).mtp) == 0


def test_mtp_copies_that_differ_are_kept(tmp_path):
    cfg = convertible_config("deepseek_v3")
    write_checkpoint(tmp_path / "src", cfg, fmt="bf16", mtp_copies=False)
    summary = convert(tmp_path / "src", tmp_path / "q", Options(bits=8))
    assert any("kept as mtp.0.embed_tokens.weight" in n for n in summary.notes)
    mtp = tensors(tmp_path / "q", "mtp.safetensors")
    assert {"mtp.0.embed_tokens.weight", "mtp.0.shared_head.head.weight"} <= set(mtp)
    model = load_model(tmp_path / "q")
    assert "embed_tokens" in model.mtp[0]


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    cfg = convertible_config("deepseek_v2", q_lora_rank=None, n_shared_experts=2)
    write_checkpoint(root / "src", cfg, fmt="bf16", shards=2)
    return root


def test_v2_unquantized_matches_transformers(v2):
    convert(v2 / "src", v2 / "f32", F32)
    assert rel_err(ours(v2 / "f32"), transformers_logits(v2 / "src")) < 1e-4


@pytest.mark.parametrize("recipe", ["uniform", "mixed"])
def test_v2_keeps_kv_b_proj_and_both_loaders_agree(v2, recipe):
    dst = v2 / recipe
    convert(v2 / "src", dst, Options(bits=4, recipe=recipe, dtype="float32"))
    wm = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.kv_b_proj.scales" in wm
    assert not any("embed_q" in k or "mtp" in k for k in wm)
    model, _ = mlx_lm_load_model(dst)  # mlx-lm's deepseek_v2 reads kv_b_proj itself
    assert model.model.layers[1].self_attn.kv_b_proj.bits == (6 if recipe == "mixed" else 4)
    assert rel_err(logits(model), ours(dst)) < 1e-4


def test_cli_converts_into_small_shards(fp8, tmp_path):
    root, _ = fp8
    dst = tmp_path / "cli"
    args = ["convert", str(root / "src"), "-o", str(dst), "--recipe", "mixed"]
    result = CliRunner().invoke(app, [*args, "--dtype", "float32", "--shard-size", "150KB"])
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.output
    shards = sorted(dst.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (dst / "model.safetensors").exists()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert {f.name for f in shards} | {"mtp.safetensors"} == set(index["weight_map"].values())
    for f in shards:
        sizes = [t.size * t.itemsize for t in tensors_in(f)]
        assert sum(sizes) <= 150_000 or len(sizes) == 1
    convert(root / "src", tmp_path / "one", Options(recipe="mixed", dtype="float32"))
    assert np.array_equal(ours(dst), ours(tmp_path / "one"))
    assert not list(tmp_path.glob(".*partial*"))


def tensors_in(f: Path) -> list[np.ndarray]:
    return list(tensors(f.parent, f.name).values())


def test_hub_repo_id_is_read_offline_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub/models--deepseek-ai--Tiny-V2/snapshots/0123abcd"
    write_checkpoint(snapshot, convertible_config("deepseek_v2"), fmt="bf16")
    refs = tmp_path / "hub/models--deepseek-ai--Tiny-V2/refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = convert("deepseek-ai/Tiny-V2", tmp_path / "out", Options(bits=8))
    assert summary.src == snapshot
    assert (tmp_path / "out/tokenizer.json").exists()
    assert load_model(tmp_path / "out").layers[1].mlp.switch_mlp.gate_proj.bits == 8


def test_progress_counts_every_planned_source_byte(fp8, tmp_path):
    root, _ = fp8
    seen, planned = [], []
    summary = convert(
        root / "src",
        tmp_path / "out",
        Options(bits=4),
        on_plan=lambda plan: planned.append(plan.read_bytes),
        on_progress=seen.append,
    )
    assert planned == [sum(seen)] == [summary.read_bytes]
    assert len(seen) > 100  # per chunk, not per run
