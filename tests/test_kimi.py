"""Moonshot's Kimi K2 / K2-Thinking / K2.5 and Moonlight: DeepSeek-V3's architecture under
other configs and layouts, written by transformers' DeepseekV3 class; K2-Thinking's
compressed-tensors INT4 read and converted as MLX's affine 4-bit without requantizing."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import (
    as_kimi_k25,
    build_kimi_model,
    hf_logits,
    read_config,
    rel_err,
    save_hf_checkpoint,
    write_int4_kimi,
)
from mlx_deepseek.convert import Options, convert
from typer.testing import CliRunner

import mlx_deepseek
from mlx_deepseek.cli import app
from mlx_deepseek.errors import CheckpointError, ConfigError, DeepSeekError
from mlx_deepseek.models.compressed_tensors import packed_format

TOKENS = np.random.RandomState(4).randint(2, 320, size=(2, 14))


def relabel(path, **fields):
    config = read_config(path)
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("label", ["kimi_k2", "kimi_k25", "moonlight"])
def test_kimi_checkpoints_match_transformers(tmp_path, label):
    hf = build_kimi_model("moonlight" if label == "moonlight" else "kimi_k2", seed=2)
    path = save_hf_checkpoint(hf, tmp_path / label, rope_format="transformers")
    if label != "moonlight":
        relabel(path, model_type="kimi_k2", bos_token_id=163584, eos_token_id=163586)
    if label == "kimi_k25":
        as_kimi_k25(path)
    model = mlx_deepseek.load_model(path, dtype="float32")
    assert model.args.label == ("deepseek_v3" if label == "moonlight" else label)
    err = rel_err(np.array(model(mx.array(TOKENS))), hf_logits(hf, TOKENS).numpy())
    print(f"{label}: max relative logit error {err:.2e}")
    assert err < 1e-4
    # cached decode equals the full forward
    cache = model.make_cache()
    steps = [model(mx.array(TOKENS[:, :6]), cache=cache)]
    steps += [model(mx.array(TOKENS[:, i : i + 1]), cache=cache) for i in range(6, 14)]
    stepped = np.concatenate([np.array(s) for s in steps], axis=1)
    assert rel_err(stepped, np.array(model(mx.array(TOKENS)))) < 1e-5


def test_kimi_k25_without_text_config_is_one_clear_error(tmp_path):
    hf = build_kimi_model("kimi_k2")
    path = save_hf_checkpoint(hf, tmp_path / "m")
    relabel(path, model_type="kimi_k25")
    with pytest.raises(ConfigError, match="kimi_k25 needs a text_config") as e:
        mlx_deepseek.load_model(path)
    assert "\n" not in str(e.value)


# ---- K2-Thinking's INT4 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    hf = build_kimi_model("kimi_k2", seed=5)
    quantized = write_int4_kimi(hf, root / "int4", root / "ref")
    from transformers import DeepseekV3ForCausalLM

    ref = DeepseekV3ForCausalLM.from_pretrained(root / "ref", dtype=torch.float32).eval()
    return root, quantized, hf_logits(ref, TOKENS).numpy()


def test_int4_checkpoint_loads_as_it_is_and_matches_its_dequantized_weights(int4):
    root, _, ref = int4
    model = mlx_deepseek.load_model(root / "int4", dtype="float32")
    experts = model.layers[1].mlp.switch_mlp.up_proj
    assert experts.bits == 4 and experts.group_size == 32 and experts.weight.dtype == mx.uint32
    err = rel_err(np.array(model(mx.array(TOKENS))), ref)
    print(f"kimi_k2 INT4 read as MLX 4-bit affine: max relative logit error {err:.2e}")
    assert err < 1e-4


def expert_tensors(folder, layer: int = 1, proj: str = "up_proj"):
    arrays = mx.load(str(next(folder.glob("model*.safetensors"))))
    prefix = f"model.layers.{layer}.mlp.switch_mlp.{proj}"
    return {k: arrays[f"{prefix}.{k}"] for k in ("weight", "scales", "biases")}


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_int4_conversion_is_bit_exact(int4, tmp_path, bits, group_size):
    root, quantized, ref = int4
    out = tmp_path / "out"
    summary = convert(root / "int4", out, Options(bits=bits, group_size=group_size))
    assert any("not requantized" in n for n in summary.notes)
    config = read_config(out)
    # mlx-lm's writer mirrors "quantization" there: compressed-tensors' description is gone
    assert config["quantization_config"] == config["quantization"]
    assert config["model_type"] == "kimi_k2"
    # the packed words and scales are the source's, bit for bit; biases = -8 * scales
    t = expert_tensors(out)
    for e in range(12):
        q, scale = quantized[f"model.layers.1.mlp.experts.{e}.up_proj.weight"]
        u = (q.astype(np.int64) + 8).astype(np.uint32)
        words = np.array(t["weight"][e])
        for i in range(8):
            assert np.array_equal((words >> np.uint32(4 * i)) & 15, u[:, i::8])
        s = np.array(t["scales"][e].astype(mx.float32))
        assert np.array_equal(s, scale.float().numpy())
        assert np.array_equal(np.array(t["biases"][e].astype(mx.float32)), -8 * s)
        # dequantized in float32: exactly s * q, as float64 computes it
        w = mx.dequantize(
            t["weight"][e],
            t["scales"][e].astype(mx.float32),
            t["biases"][e].astype(mx.float32),
            group_size=32,
            bits=4,
        )
        exact = q.astype(np.float64).reshape(q.shape[0], -1, 32) * s.astype(np.float64)[..., None]
        assert np.array_equal(np.array(w, np.float64), exact.reshape(q.shape))
    # other weights follow --bits / --group-size
    section = config["quantization"]
    assert (section["bits"], section["group_size"]) == (bits, group_size)
    assert section["model.layers.1.mlp.switch_mlp.up_proj"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
    }
    # the loaded model holds them unchanged
    loaded = mlx_deepseek.load_model(out, dtype="float32").layers[1].mlp.switch_mlp.up_proj
    assert (loaded.bits, loaded.group_size) == (4, 32)
    assert mx.array_equal(loaded.weight, t["weight"]).item()


def test_int4_no_quantize_dequantizes_exactly(int4, tmp_path):
    root, _, ref = int4
    out = tmp_path / "f32"
    convert(root / "int4", out, Options(quantize=False, dtype="float32"))
    model = mlx_deepseek.load_model(out, dtype="float32")
    assert rel_err(np.array(model(mx.array(TOKENS))), ref) < 1e-4


def test_mlx_lm_reads_the_converted_int4_checkpoint(int4, tmp_path):
    from mlx_lm.utils import load_model as lm_load

    root, _, ref = int4
    out = tmp_path / "out"
    convert(root / "int4", out, Options(bits=8, group_size=32))
    ours = np.array(mlx_deepseek.load_model(out, dtype="float32")(mx.array(TOKENS)))
    lm, _ = lm_load(out)
    assert rel_err(np.array(lm(mx.array(TOKENS)).astype(mx.float32)), ours) < 1e-2


def test_int4_float16_output_is_refused(int4, tmp_path):
    root, _, _ = int4
    with pytest.raises(DeepSeekError, match="--dtype float16 would round") as e:
        convert(root / "int4", tmp_path / "f16", Options(dtype="float16"))
    assert "\n" not in str(e.value) and not (tmp_path / "f16").exists()


def test_k25_int4_converts_to_a_text_only_kimi_k2(int4, tmp_path):
    import shutil

    root, _, ref = int4
    src = tmp_path / "k25"
    shutil.copytree(root / "int4", src)
    as_kimi_k25(src)
    summary = convert(src, tmp_path / "out", Options(bits=4, group_size=32))
    assert any("vision tensors dropped" in n for n in summary.notes)
    config = read_config(tmp_path / "out")
    assert config["model_type"] == "kimi_k2" and "text_config" not in config
    assert read_config(tmp_path / "out")["quantization"]["bits"] == 4
    raw = mlx_deepseek.load_model(src, dtype="float32")  # K2.5's INT4 loaded as it is
    assert rel_err(np.array(raw(mx.array(TOKENS))), ref) < 1e-4


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(symmetric=False), "symmetric=false"),
        (dict(group_size=16), "group_size=16"),
        (dict(num_bits=3), "num_bits=3"),
        (dict(actorder="group"), "actorder='group'"),
        (dict(strategy="channel"), "strategy='channel'"),
    ],
)
def test_unsupported_compressed_tensors_schemes_are_refused(int4, tmp_path, change, needle):
    import shutil

    root, _, _ = int4
    src = tmp_path / "bad"
    shutil.copytree(root / "int4", src)
    config = read_config(src)
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    (src / "config.json").write_text(json.dumps(config))
    for action in (lambda: mlx_deepseek.load_model(src), lambda: convert(src, tmp_path / "o")):
        with pytest.raises(ConfigError, match=needle) as e:
            action()
        assert "\n" not in str(e.value)


def test_a_packed_tensor_of_the_wrong_shape_is_named(int4, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    root, _, _ = int4
    src = tmp_path / "bad"
    shutil.copytree(root / "int4", src)
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale"  # [out, 2] -> [out, 1]
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="experts.3.up_proj"):
        mlx_deepseek.load_model(src)
    with pytest.raises(CheckpointError, match="experts.3.up_proj"):
        convert(src, tmp_path / "o")


def test_packed_format_reads_k2_thinking_config():
    assert packed_format({"quantization_config": {"quant_method": "fp8"}}) is None
    from checkpoints import INT4_CONFIG

    fmt = packed_format({"quantization_config": INT4_CONFIG})
    assert (fmt.bits, fmt.group_size, fmt.offset) == (4, 32, 8)


@pytest.mark.parametrize("which", ["int4", "k25"])
def test_info_names_kimi_and_its_int4(int4, tmp_path, which):
    import shutil

    root, _, _ = int4
    src = root / "int4"
    if which == "k25":
        src = tmp_path / "k25"
        shutil.copytree(root / "int4", src)
        as_kimi_k25(src)
    result = CliRunner().invoke(app, ["info", str(src)], standalone_mode=False)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert ("kimi_k2" if which == "int4" else "kimi_k25") in out
    assert "DeepSeek-V3: MLA + DeepSeekMoE" in out
    assert "4-bit, group 32 (compressed-tensors" in out
