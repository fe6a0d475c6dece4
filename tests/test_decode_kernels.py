"""Whole decode steps with every custom kernel on (the CPU emulator of Metal standing in for
the GPU where there is none) against MLX's path, and the primitive count of a decode step as
a Mac runs it, against mlx-lm's for the same model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_support import metal
from mlx.utils import tree_flatten, tree_map_with_path

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.bench.counting import count_step
from mlx_deepseek.bench.runtimes import MLX_LM, OURS, Runtime, decode_step, filled_cache
from mlx_deepseek.models import tiny
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.deepseek_v3 import Model
from mlx_deepseek.ops import metal as metal_ops

pytestmark = pytest.mark.emulator  # without Metal: needs clang >= 16 (conftest.py)

# Measured with this code (tiny V3 below, float32, Metal-equivalent, kernel launches as one
# placeholder each): 33 for mlx-deepseek, 78 for mlx-lm. A change that adds a dispatch to the
# decode step fails here; one that removes some lowers the bound.
TINY_V3_PRIMITIVES = 33

# YaRN with mscale != mscale_all_dim: RoPE multiplies by an mscale that is not 1
YARN = {**tiny.YARN, "original_max_position_embeddings": 1024, "mscale": 0.9, "mscale_all_dim": 0.7}
SIZES = dict(tiny.WIDTHS_64, vocab_size=256, rope_scaling=YARN)
CONFIGS = {
    "v3": tiny.tiny_config("v3_noaux", **SIZES, n_group=2, topk_group=1),
    "v2": tiny.tiny_config("v2_group", **dict(SIZES, q_lora_rank=None), n_shared_experts=2),
}


def config(family: str) -> dict:
    return dict(CONFIGS[family])


def randomize_and_quantize(model: nn.Module, dtype: mx.Dtype, seed: int = 0) -> nn.Module:
    """Random weights (norm weights and the router too), cast to dtype (the router's
    correction bias stays float32), then 4-bit group-32 affine quantization."""
    keys = iter(mx.random.split(mx.random.key(seed), 1000))

    def init(name: str, v: mx.array) -> mx.array:
        k = next(keys)
        if "norm" in name:
            return mx.random.uniform(0.5, 1.5, v.shape, key=k)
        scale = 0.1 if "e_score_correction_bias" in name else v.shape[-1] ** -0.5
        return scale * mx.random.normal(v.shape, key=k)

    model.update(tree_map_with_path(init, model.parameters()))
    model.update(
        tree_map_with_path(
            lambda n, v: v if "e_score_correction_bias" in n else v.astype(dtype),
            model.parameters(),
        )
    )
    nn.quantize(model, 32, 4, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    mx.eval(model.parameters())
    return model.eval()


def tiny_model(family: str, dtype: mx.Dtype = mx.float32) -> Model:
    model = Model(ModelArgs.from_dict(config(family)))
    model.model.layers[1].mlp.gate.weight = mx.zeros((8, 128))  # router weights stay float32
    return randomize_and_quantize(model, dtype)


PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 0]  # 9 tokens: prefill by MLX (the kernels take 1-8)


def decode(model: Model, steps: tuple[int, ...] = (2, 1)) -> list[mx.array]:
    """Logits of the prompt's last token, then of decode steps of the given sizes (2: a
    speculative verification)."""
    cache = model.make_cache()
    logits = [model(mx.array([PROMPT]), cache=cache)[:, -1:]]
    for i, n in enumerate(steps):
        logits.append(model(mx.array([[(7 * i + j) % 256 for j in range(n)]]), cache=cache))
    return [s.astype(mx.float32) for s in logits]


def rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_decode_with_every_kernel_equals_mlx(monkeypatch, family):
    model = tiny_model(family)
    steps = (2, 1) if family == "v3" else (1,)  # fewer kernel variants to compile
    ref = decode(model, steps)
    with metal(monkeypatch, *metal_ops.FAMILIES):  # every kernel ran and passed its self-check
        got = decode(model, steps)
    for g, r in zip(got, ref, strict=True):
        assert rel(g, r) < 1e-5


@pytest.mark.slow  # ~10 kernel variants to compile in the emulator on a cold cache
def test_bfloat16_decode_with_kernels_is_as_close_to_float32_as_mlx(monkeypatch):
    ref32 = decode(tiny_model("v3", mx.float32), steps=(1,))
    model = tiny_model("v3", mx.bfloat16)
    mlx16 = decode(model, steps=(1,))
    with metal(monkeypatch, *metal_ops.FAMILIES):
        fused16 = decode(model, steps=(1,))
    for f, m, r in zip(fused16, mlx16, ref32, strict=True):
        # the kernels keep float32 where MLX rounds intermediates to bfloat16
        assert rel(f, r) <= 1.25 * rel(m, r) + 0.005


def _mlx_lm_tiny_v3() -> nn.Module:
    from mlx_lm.models import deepseek_v3

    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config("v3")))
    return randomize_and_quantize(model, mx.float32)


def test_decode_step_primitives_are_half_of_mlx_lms():
    counts = {}
    for name, model in ((OURS, tiny_model("v3")), (MLX_LM, _mlx_lm_tiny_v3())):
        rt = Runtime(name, model, None, config("v3"))
        cache = filled_cache(rt, 40, room=2)
        step = count_step(lambda rt=rt, cache=cache: [decode_step(rt, mx.array([[1]]), cache)])
        counts[name] = step
    ours, lm = counts[OURS], counts[MLX_LM]
    print({n: (c.total, c.by_name) for n, c in counts.items()})
    assert ours.total <= TINY_V3_PRIMITIVES
    assert ours.total <= 0.5 * lm.total
    # each custom kernel launch is one placeholder node
    assert ours.by_name["Fusedmla_attend"] == ours.by_name["Fusedmla_combine"] == 2
    assert ours.by_name["Fusedrouter"] == 1 and ours.by_name["Fusedembedding_norm"] == 1
    assert ours.by_name["Fusedlatent_qnorm_rope"] == 2 and "FusedRMSNorm" not in ours.by_name
    assert not any(name.startswith("Fused") for name in lm.by_name if "moe" in name)


def test_counting_without_metal_equivalence_runs_mlxs_path():
    model = tiny_model("v3")
    rt = Runtime(OURS, model, None, config("v3"))
    cache = filled_cache(rt, 40, room=2)
    cpu = count_step(lambda: [decode_step(rt, mx.array([[1]]), cache)], metal_equivalent=False)
    assert not any(name.startswith("Fused") for name in cpu.by_name)
    assert cpu.by_name["GatherQMM"] == 3  # the routed experts through MLX
    params = dict(tree_flatten(model.parameters()))
    assert params["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert np.isfinite(np.array(decode_step(rt, mx.array([[1]]), cache))).all()
