"""`convert` on DeepSeek V4 checkpoints: DeepSeek's FP8 / FP4 release layout and the layout
transformers' save_pretrained writes.

References: the float32 values the source checkpoint encodes (decoded by hand in
v4_checkpoints.py), transformers' DeepseekV4ForCausalLM over them, the released FP4 bytes
themselves, and mx.quantize of the float32 decoding.
"""

import json
import shutil

import mlx.core as mx
import mlx_deepseek.convert.pipeline as pipeline
import numpy as np
import pytest
import torch
from checkpoints import rel_err
from mlx.utils import tree_flatten
from mlx_deepseek.convert.layout_v4 import expected_entries
from mlx_deepseek.convert.plan import Options, make_plan
from mlx_deepseek.convert.reader import SourceCheckpoint
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner
from v4_checkpoints import build_v4, save_v4, transformers_oracle, v4_logits, write_official

from mlx_deepseek.cli import app
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.loading import load_model
from mlx_deepseek.models.deepseek_v4 import Model
from mlx_deepseek.models.tiny import convertible_config, tiny_v4_config
from mlx_deepseek.models.v4_config import ModelArgs

TOKENS = np.random.RandomState(3).randint(0, 96, size=(2, 40))
NATIVE = Options(recipe="native", dtype="float32")


def as_bytes(a: mx.array) -> bytes:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()


def logits(path) -> np.ndarray:
    return np.array(load_model(path, dtype="float32")(mx.array(TOKENS)))


def raw(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder as its bytes' numpy view (float8 kinds as uint8)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if v.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
                v = v.view(torch.uint8)
            out[k] = (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy()
    return out


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """DeepSeek's layout (hidden 160: FP8 blocks with partial edges; FP4 experts; an MTP
    module), the float32 values it encodes, transformers over them, and the transformers
    layout it came from."""
    root = tmp_path_factory.mktemp("convert-v4")
    hf = build_v4("mixed", seed=3, hidden_size=160, moe_intermediate_size=32)
    src = save_v4(hf, root / "transformers")
    values = write_official(src, root / "official", quantize=True, mtp_seed=11, mtp_ratio=4)
    oracle = transformers_oracle(src, values, root / "oracle")
    return root, values, oracle


def dequantized(path) -> dict[str, np.ndarray]:
    """A converted checkpoint's tensors as float32, quantized modules dequantized."""
    model = load_model(path, dtype="float32")
    out = {}
    for name, module in model.named_modules():
        if "scales" in module and hasattr(module, "bits"):
            out[f"{name}.weight"] = np.array(
                mx.dequantize(module.weight, module.scales, module.get("biases"),
                              group_size=module.group_size, bits=module.bits, mode=module.mode,
                              dtype=mx.float32)
            )  # fmt: skip
    for name, value in tree_flatten(model.parameters()):
        if name not in out and not name.endswith((".scales", ".biases")):
            if value.dtype != mx.uint32:
                out[name] = np.array(value.astype(mx.float32))
    return out


def source_values(values: dict[str, np.ndarray], args: ModelArgs) -> dict[str, np.ndarray]:
    """The encoded values under the converted names (experts stacked)."""
    out = {}
    for e in expected_entries(args, keep_mtp=True):
        v = values[e.src]
        if e.expert is None:
            out[e.out] = np.asarray(v, np.float32)
        else:
            out.setdefault(e.out, [None] * e.n_experts)[e.expert] = v
    return {k: np.stack(v) if isinstance(v, list) else v for k, v in out.items()}


def test_native_recipe_equals_the_float32_decoding(v4, tmp_path):
    root, values, oracle = v4
    summary = pipeline.convert(root / "official", tmp_path / "out", NATIVE)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert "quantization_config" not in config or config["quantization_config"] == q
    modes = {v["mode"] for v in q.values() if isinstance(v, dict)}
    assert modes == {"mxfp4", "mxfp8"}
    assert q["model.layers.0.ffn.switch_mlp.gate_proj"]["mode"] == "mxfp4"
    assert q["model.layers.0.attn.wq_a"]["mode"] == "mxfp8"  # an FP8 weight
    assert q["model.embed_tokens"] is False  # floating point in the release: kept
    assert (out / "mtp.safetensors").exists() and summary.notes == []
    # every tensor is exactly what the release encodes
    args = ModelArgs.from_dict(json.loads((root / "official" / "config.json").read_text()))
    want = source_values(values, args)
    got = dequantized(out)
    assert set(want) <= set(got) and len(want) > 150
    for name, value in want.items():
        assert np.array_equal(got[name], value.astype(np.float32)), name
    # logits: transformers over the same values, and loading the release directly
    ours = logits(out)
    assert rel_err(ours, v4_logits(oracle, TOKENS)) < 1e-4
    assert rel_err(ours, logits(root / "official")) < 1e-5


@pytest.mark.parametrize("recipe,bits", [("uniform", 8), ("mixed", 4)])
def test_fp4_experts_are_copied_bit_for_bit_and_fp8_requantized(v4, tmp_path, recipe, bits):
    root, values, _ = v4
    opts = Options(recipe=recipe, bits=bits, group_size=32, dtype="bfloat16")
    summary = pipeline.convert(root / "official", tmp_path / "out", opts)
    src, out = raw(root / "official"), raw(tmp_path / "out")
    for layer, w, proj in [(0, "w1", "gate_proj"), (2, "w2", "down_proj"), (3, "w3", "up_proj")]:
        stacked = out[f"model.layers.{layer}.ffn.switch_mlp.{proj}.weight"]
        scales = out[f"model.layers.{layer}.ffn.switch_mlp.{proj}.scales"]
        for e in range(6):
            released = src[f"layers.{layer}.ffn.experts.{e}.{w}.weight"]
            assert stacked[e].tobytes() == released.tobytes()
            assert scales[e].tobytes() == src[f"layers.{layer}.ffn.experts.{e}.{w}.scale"].tobytes()
    assert "model.layers.0.ffn.switch_mlp.gate_proj.biases" not in out
    mtp = out["mtp.0.ffn.switch_mlp.up_proj.weight"]
    assert mtp[5].tobytes() == src["mtp.0.ffn.experts.5.w3.weight"].tobytes()
    assert any("kept as released" in n for n in summary.notes) == (bits != 4)
    # FP8 weights (and floating-point ones) quantized as MLX quantizes their float32 decoding
    high = 6 if recipe == "mixed" else bits
    for name, module in [("layers.1.attn.wq_a", "model.layers.1.attn.wq_a"),
                         ("layers.3.ffn.shared_experts.w2",
                          "model.layers.3.ffn.shared_experts.down_proj"),
                         ("embed", "model.embed_tokens")]:  # fmt: skip
        w = mx.array(values[f"{name}.weight"].astype(np.float32)).astype(mx.bfloat16)
        for part, ref in zip(("weight", "scales", "biases"), mx.quantize(w, 32, high), strict=True):
            got = out[f"{module}.{part}"]
            assert got.tobytes() == as_bytes(ref), (module, part)
    # the router and mixing parameters stay float32; the hash table int32
    assert out["model.layers.2.ffn.gate.weight"].dtype == np.float32
    assert out["model.layers.1.hc_attn_fn"].dtype == np.float32
    assert out["model.layers.0.ffn.gate.tid2eid"].dtype == np.int32
    assert np.array_equal(out["model.layers.0.ffn.gate.tid2eid"], src["layers.0.ffn.gate.tid2eid"])
    model = load_model(tmp_path / "out")
    assert model.layers[0].ffn.switch_mlp.gate_proj.mode == "mxfp4"
    assert model.layers[0].attn.wq_a.bits == high
    assert np.isfinite(np.array(model(mx.array(TOKENS[:, :12])))).all()


def test_transformers_layout(v4, tmp_path):
    root, _, oracle = v4
    src = root / "transformers"
    pipeline.convert(src, tmp_path / "f32", Options(quantize=False, dtype="float32"))
    hf = build_v4("mixed", seed=3, hidden_size=160, moe_intermediate_size=32)
    assert rel_err(logits(tmp_path / "f32"), v4_logits(hf, TOKENS)) < 1e-4
    # floating-point experts are quantized by the recipe (affine), as MLX quantizes them
    summary = pipeline.convert(src, tmp_path / "q", Options(bits=8, group_size=32))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and summary.notes[0].startswith("the checkpoint")
    source, out = raw(src), raw(tmp_path / "q")
    for e in (0, 5):
        w = mx.array(source[f"model.layers.2.ffn.experts.{e}.w2.weight"])
        for part, ref in zip(("weight", "scales", "biases"), mx.quantize(w, 32, 8), strict=True):
            got = out[f"model.layers.2.ffn.switch_mlp.down_proj.{part}"][e]
            assert got.tobytes() == as_bytes(ref)
    model = load_model(tmp_path / "q", dtype="float32")
    experts = model.layers[1].ffn.switch_mlp.gate_proj
    assert (experts.mode, experts.bits) == ("affine", 8)
    assert model.mtp == [] and config["num_nextn_predict_layers"] == 0
    assert np.isfinite(np.array(model(mx.array(TOKENS)))).all()


def test_no_mtp_drops_the_mtp_module(v4, tmp_path):
    root = v4[0]
    pipeline.convert(root / "official", tmp_path / "out", Options(recipe="native", mtp=False))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        config["num_nextn_predict_layers"] == 0
        and not (tmp_path / "out" / "mtp.safetensors").exists()
    )
    assert load_model(tmp_path / "out").mtp == []


def test_plan_knows_v4_sizes(v4, tmp_path, monkeypatch):
    """The plan (and the disk-space preflight) count mxfp4 experts at 4.25 bits, mxfp8 at
    8.25, float32 mixing parameters at 32."""
    root = v4[0]
    with SourceCheckpoint(root / "official") as source:
        plan = make_plan(source, NATIVE)
    args = plan.args
    D, I, E = args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
    experts = [t for t in plan.tensors if ".switch_mlp." in t.name]
    per_layer = 3 * E * I * D * (4 + 8 / 32) / 8
    assert sum(t.nbytes for t in experts) == per_layer * (args.num_hidden_layers + 1)
    pipeline.convert(root / "official", tmp_path / "out", NATIVE)
    files = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert 0 < files - plan.write_bytes < 64 << 10  # the headers
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DeepSeekError, match=f"needs {files / 1e9:.1f} GB"):
        pipeline.convert(root / "official", tmp_path / "out2", NATIVE)
    assert not (tmp_path / "out2").exists()


def test_model_parameters_match_the_layout():
    """The converter's outputs are the model's parameters, name for name and shape for shape
    (unquantized), for a Flash-like config with every layer kind, hash layers and MTP."""
    args = ModelArgs.from_dict(
        dict(model_type="deepseek_v4", num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 4],
             num_hash_layers=2, vocab_size=64, hidden_size=32, moe_intermediate_size=16,
             n_routed_experts=4, num_attention_heads=4, head_dim=32, q_lora_rank=16,
             o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=16, hc_mult=2,
             qk_rope_head_dim=8, num_experts_per_tok=2)
    )  # fmt: skip
    shapes = {}
    for e in expected_entries(args, keep_mtp=True):
        shape = (e.n_experts, *e.shape) if e.expert is not None else e.shape
        shapes[e.out] = shape
    model = {k: tuple(v.shape) for k, v in tree_flatten(Model(args).parameters())}
    assert shapes == model


# ---- bad input --------------------------------------------------------------------------------


def broken(v4, tmp_path, edit) -> object:
    src = tmp_path / "src"
    shutil.copytree(v4[0] / "official", src)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"))
    return CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "out")])


def check_failure(result, tmp_path, match: str) -> str:
    assert result.exit_code != 0 and isinstance(result.exception, DeepSeekError)
    message = str(result.exception)
    assert match in message and "\n" not in message, message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    return message


def test_fp4_scales_of_another_dtype(v4, tmp_path):
    name = "layers.1.ffn.experts.2.w2.scale"

    def edit(t):
        t[name] = t[name].view(torch.uint8).float()

    msg = check_failure(broken(v4, tmp_path, edit), tmp_path, name)
    assert "E8M0" in msg and "F32" in msg


def test_fp4_weight_of_the_wrong_width(v4, tmp_path):
    name = "layers.2.ffn.experts.0.w1.weight"

    def edit(t):
        t[name] = t[name][:, :-16].contiguous()

    msg = check_failure(broken(v4, tmp_path, edit), tmp_path, name)
    assert "two values a byte" in msg and "[32, 64]" in msg


def test_missing_fp8_scale(v4, tmp_path):
    msg = check_failure(
        broken(v4, tmp_path, lambda t: t.pop("layers.3.attn.wo_b.scale")), tmp_path, "wo_b.scale"
    )
    assert "missing" in msg


def test_missing_expert(v4, tmp_path):
    name = "layers.1.ffn.experts.5.w3.weight"

    def edit(t):
        t.pop(name)
        t.pop(name.replace("weight", "scale"))

    check_failure(broken(v4, tmp_path, edit), tmp_path, name)


def test_hash_table_naming_an_unknown_expert(v4, tmp_path):
    def edit(t):
        t["layers.0.ffn.gate.tid2eid"][5, 1] = 17

    msg = check_failure(broken(v4, tmp_path, edit), tmp_path, "routes to expert 17")
    assert "n_routed_experts=6" in msg


def test_hash_table_of_floats(v4, tmp_path):
    def edit(t):
        t["layers.1.ffn.gate.tid2eid"] = t["layers.1.ffn.gate.tid2eid"].float()

    check_failure(broken(v4, tmp_path, edit), tmp_path, "tid2eid has dtype F32")


def test_native_recipe_needs_a_v4_checkpoint(tmp_path):
    from mlx_deepseek.convert.synthetic import write_checkpoint

    write_checkpoint(tmp_path / "src", convertible_config("deepseek_v3"), fmt="fp8", block=(32, 32))
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--recipe", "native"]
    )
    check_failure(result, tmp_path, "--recipe native")


def test_cli_native(v4, tmp_path):
    result = CliRunner().invoke(
        app, ["convert", str(v4[0] / "official"), "-o", str(tmp_path / "out"), "--recipe", "native"]
    )
    assert result.exit_code == 0, result.output
    assert "native recipe" in result.output and (tmp_path / "out" / "config.json").exists()


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def test_synthetic_release_converts_to_its_float32_decoding(tmp_path):
    """convert/synthetic_v4.py (the benchmarks' release-layout writer): sharded FP8 / FP4 /
    bf16 tensors that the converter maps exactly (native recipe) onto what they encode, here
    decoded by hand: e4m3 times 2^(s-127) per 128 x 128 block; e2m1 nibbles (low first)
    times 2^(s-127) per 32."""
    from mlx_deepseek.convert.synthetic_v4 import write_release

    # the tiny V4 with hidden 192 (a partial 128-wide FP8 block) and q LoRA 96
    config = tiny_v4_config([4, 16], vocab_size=256, hidden_size=192, q_lora_rank=96)
    rel = tmp_path / "release"
    total = write_release(rel, config, shards=3)
    assert len(list(rel.glob("model-0000?-of-00003.safetensors"))) == 3
    src = raw(rel)
    assert total == sum(v.nbytes for v in src.values())
    pipeline.convert(rel, tmp_path / "out", NATIVE)
    got = dequantized(tmp_path / "out")
    # an FP8 weight (hidden 192: a partial 64-wide block) and a routed expert, by hand
    w, s = src["layers.1.attn.wq_a.weight"], src["layers.1.attn.wq_a.scale"]
    fp8 = torch.from_numpy(w).view(torch.float8_e4m3fn).float().numpy()
    scale = np.ldexp(1.0, s.astype(np.int64) - 127)
    full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
    assert np.array_equal(got["model.layers.1.attn.wq_a.weight"], (fp8 * full).astype(np.float32))
    b, s = (
        src["layers.0.ffn.experts.3.w2.weight"].view(np.uint8),
        src["layers.0.ffn.experts.3.w2.scale"],
    )
    codes = np.stack([b & 15, b >> 4], -1).reshape(b.shape[0], -1)
    fp4 = E2M1[codes] * np.repeat(np.ldexp(1.0, s.astype(np.int64) - 127), 32, 1)
    assert np.array_equal(got["model.layers.0.ffn.switch_mlp.down_proj.weight"][3], fp4)
    # every tensor: the loader's own decoding of the release (FP8 -> float32, FP4 -> mxfp4)
    want = dequantized(rel)
    assert set(want) == set(got)
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
    assert np.array_equal(got["model.layers.0.ffn.gate.tid2eid"], src["layers.0.ffn.gate.tid2eid"])
