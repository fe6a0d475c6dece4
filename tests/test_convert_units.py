"""Converter pieces on their own: recipes, the config section, shard planning and writing."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_deepseek.convert.destination import Staging
from mlx_deepseek.convert.layout import expected_entries
from mlx_deepseek.convert.recipe import QuantSpec, Recipe, high_bits, quantization_section
from mlx_deepseek.convert.writer import OutTensor, ShardWriter, plan_shards
from safetensors import safe_open

from mlx_deepseek.cli.convert import parse_size
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.tiny import convertible_config


def test_mixed_recipe_keeps_experts_low_and_everything_else_high():
    r = Recipe("mixed", 4, 64)
    assert r.spec("routed_expert", 2048) == QuantSpec(4, 64)
    for role in (
        "attention",
        "attention_latent",
        "shared_expert",
        "dense_mlp",
        "embedding",
        "lm_head",
        "mtp_proj",
    ):
        assert r.spec(role, 2048) == QuantSpec(6, 64), role
    for role in ("router", "router_bias", "norm"):
        assert r.spec(role, 2048) is None
    assert r.spec("attention", 1408 + 32) is None  # group size does not divide: kept
    assert [high_bits(b) for b in (2, 3, 4, 5, 6, 8)] == [6, 6, 6, 8, 8, 8]
    u = Recipe("uniform", 3, 32)
    assert u.spec("attention", 64) == u.spec("routed_expert", 64) == QuantSpec(3, 32)
    assert u.spec("router", 64) is None


def test_quantization_section_is_what_mlx_lm_writes():
    r = Recipe("mixed", 4, 64)
    section = quantization_section(
        r, {"a.switch_mlp.up_proj": QuantSpec(4, 64), "a.q_proj": QuantSpec(6, 64), "a.odd": None}
    )
    assert section == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "a.q_proj": {"group_size": 64, "bits": 6, "mode": "affine"},
        "a.odd": False,
    }
    # in module order whatever order the planner decided in: one checkpoint, one config
    decisions = {f"m{i}.q_proj": QuantSpec(6, 64) for i in (3, 1, 2)}
    shuffled = quantization_section(r, decisions)
    assert list(shuffled)[3:] == ["m1.q_proj", "m2.q_proj", "m3.q_proj"]


@pytest.mark.parametrize(
    "name,bits,group", [("best", 4, 64), ("uniform", 7, 64), ("uniform", 4, 48)]
)
def test_bad_recipe_settings_raise_one_line(name, bits, group):
    with pytest.raises(DeepSeekError) as e:
        Recipe(name, bits, group)
    assert "\n" not in str(e.value)


def test_layout_covers_every_v3_tensor_once_with_stacked_experts():
    args = ModelArgs.from_dict(convertible_config("deepseek_v3"))
    entries = expected_entries(args)
    srcs = [e.src for e in entries]
    assert len(srcs) == len(set(srcs))
    experts = [e for e in entries if e.role == "routed_expert"]
    assert len(experts) == 3 * 8 * 3  # 2 MoE layers + the MTP layer, 8 experts, 3 projections
    assert {e.out for e in experts if e.src.startswith("model.layers.1.")} == {
        f"model.layers.1.mlp.switch_mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    }
    mtp = [e for e in entries if e.src.startswith("model.layers.3.")]
    assert mtp and all(e.out.startswith("mtp.0.") for e in mtp)
    assert {e.out for e in entries if e.optional} == {
        "mtp.0.embed_tokens.weight",
        "mtp.0.shared_head.head.weight",
    }
    assert all(e.kind == "kv_b" for e in entries if e.src.endswith("kv_b_proj.weight"))
    no_mtp = expected_entries(args, keep_mtp=False)
    assert not any(e.out.startswith("mtp.") for e in no_mtp)
    v2 = expected_entries(ModelArgs.from_dict(convertible_config("deepseek_v2", q_lora_rank=None)))
    assert not any(e.kind == "kv_b" for e in v2) and any(
        e.src.endswith("q_proj.weight") for e in v2
    )
    assert not any("e_score_correction_bias" in e.src for e in v2)


def test_shards_respect_the_size_limit_and_mtp_gets_its_own_file():
    tensors = [OutTensor(f"model.t{i}", mx.float32, (10, 10)) for i in range(10)]  # 400 B each
    tensors += [
        OutTensor("model.big", mx.float32, (100, 10)),
        OutTensor("mtp.0.x", mx.float32, (3,)),
    ]
    shards = plan_shards(tensors, 1000)
    names = [s.name for s in shards]
    assert (
        names[-1] == "mtp.safetensors"
        and names[0] == f"model-00001-of-{len(names) - 1:05d}.safetensors"
    )
    for s in shards[:-1]:
        assert sum(t.nbytes for t in s.tensors) <= 1000 or len(s.tensors) == 1
    assert [t.name for s in shards[:-1] for t in s.tensors] == [t.name for t in tensors[:-1]]
    assert [s.name for s in plan_shards(tensors[:2], 10**9)] == ["model.safetensors"]


def test_writer_fills_tensors_by_rows_in_any_order_into_valid_safetensors(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = mx.arange(10).astype(mx.bfloat16)
    shards = plan_shards(
        [OutTensor("x", mx.float32, (2, 3, 4)), OutTensor("y", mx.bfloat16, (10,))], 10**6
    )
    w = ShardWriter(tmp_path, shards)
    w.write("x", mx.array(a[1]), row=3)  # the second "expert" first
    w.write("y", b)
    with pytest.raises(RuntimeError, match="never completely written"):
        w.finish()
    w.write("x", mx.array(a[0, :2]), row=0)
    w.write("x", mx.array(a[0, 2:]), row=2)
    with pytest.raises(RuntimeError):
        w.write("x", mx.array(a[0, 2:]), row=2)  # twice: refused
    index = w.finish()
    assert index["weight_map"] == {"x": "model.safetensors", "y": "model.safetensors"}
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        assert np.array_equal(f.get_tensor("x"), a)
        assert f.metadata() == {"format": "mlx"}
    y = mx.load(str(tmp_path / "model.safetensors"))["y"]
    assert y.dtype == mx.bfloat16 and mx.array_equal(y, b).item()
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index


def test_staging_is_removed_on_error_and_renamed_on_commit(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with Staging(dst) as stage:
            (stage.path / "half").write_text("x")
            raise KeyboardInterrupt
    assert not dst.exists() and not list(tmp_path.iterdir())
    with Staging(dst) as stage:
        (stage.path / "whole").write_text("x")
        stage.commit()
    assert (dst / "whole").exists() and list(tmp_path.iterdir()) == [dst]


@pytest.mark.parametrize(
    "text,size",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("1.5gb", 1_500_000_000),
        ("4096", 4096),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(DeepSeekError, match="--shard-size"):
        parse_size(text)
