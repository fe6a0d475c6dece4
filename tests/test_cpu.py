"""Decode work split across CPU streams (ops/cpu.py) computes the same function as one
stream: the row-split linear layers, the MoE's shared-out experts, the absorbed attention
split by cached positions (merged flash-decoding style) and the expanded one by heads."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import rel_err
from mlx.utils import tree_flatten
from mlx_lm.models.mla import MultiLinear

from mlx_deepseek import _blas, ops
from mlx_deepseek.kernels import runtime as kernels
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.deepseek_v3 import Model
from mlx_deepseek.models.tiny import tiny_config
from mlx_deepseek.ops import cpu
from mlx_deepseek.ops.cpu import exp_nonpositive

TOKENS = mx.array(np.random.RandomState(0).randint(2, 320, size=(2, 12)))


def tiny_model(family: str, quantized: bool) -> Model:
    fields = tiny_config(family)
    if fields["q_lora_rank"]:
        fields["q_lora_rank"] = 32  # a whole quantization group
    args = ModelArgs.from_dict(fields)
    mx.random.seed(0)
    model = Model(args)
    for layer in model.layers:  # the router starts at zeros: give it a real choice
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.weight = mx.random.normal(layer.mlp.gate.weight.shape)
    if quantized:
        nn.quantize(
            model,
            group_size=32,
            bits=4,
            # MLA's per-head W_uk / W_uv stay float (their 16-wide rows are under a group)
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and not isinstance(m, MultiLinear)
            ),
        )
    model.eval()
    mx.eval(model.parameters())
    return model


@pytest.fixture
def split_all(monkeypatch):
    """Split everything, over 3 streams (more than this machine's cores: uneven ranges)."""
    monkeypatch.setattr(cpu, "MIN_PART_BYTES", 1)
    monkeypatch.setenv(cpu.ENV_THREADS, "3")
    saved = _blas.threads()
    yield
    if saved is not None:
        _blas.set_threads(saved)


@pytest.fixture
def count_parts(monkeypatch):
    """How many parts were built on worker streams, by the caller's function name."""
    import sys

    counts: dict[str, int] = {}
    original = cpu.parallel

    def counting(parts, streams):
        caller = sys._getframe(1).f_code.co_name
        counts[caller] = counts.get(caller, 0) + len(parts)
        return original(parts, streams)

    monkeypatch.setattr(cpu, "parallel", counting)
    return counts


def run(model: Model, absorb: bool | None) -> list[np.ndarray]:
    """A 12-token prefill of 2 sequences, then 3 cached decode steps: every output."""
    for layer in model.layers:
        layer.self_attn.absorb = absorb
    cache = model.make_cache()
    outs = [model(TOKENS, cache=cache)]
    tok = mx.argmax(outs[-1][:, -1:], axis=-1)
    for _ in range(3):
        outs.append(model(tok, cache=cache))
        tok = mx.argmax(outs[-1][:, -1:], axis=-1)
    return [np.array(o) for o in outs]


@pytest.mark.parametrize("quantized", [True, False], ids=["4bit", "float"])
@pytest.mark.parametrize("family", ["v2_greedy", "v3_noaux"])
@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "expanded"])
@pytest.mark.parametrize("dequant_from", [16, 1])
def test_cpu_paths_equal_mlx(
    family, quantized, absorb, dequant_from, split_all, count_parts, monkeypatch
):
    """MLX's own path (one stream, quantized matmuls throughout) vs every CPU strategy:
    split across 3 streams, and dequantized from 16 rows (the 24-token prefill) or always."""
    model = tiny_model(family, quantized)
    monkeypatch.setenv(cpu.ENV_THREADS, "1")
    monkeypatch.setattr(cpu, "DEQUANT_MIN_TOKENS", 10**9)
    ref = run(model, absorb)
    assert not count_parts
    monkeypatch.setenv(cpu.ENV_THREADS, "3")
    monkeypatch.setattr(cpu, "DEQUANT_MIN_TOKENS", dequant_from)
    assert cpu.prepare(model) > 0
    got = run(model, absorb)
    for g, r in zip(got, ref, strict=True):
        err = np.abs(g - r).max() / np.abs(r).max()
        assert err < 2e-6, err
    # every kind of split happened
    assert count_parts.get("row_split", 0) > 0
    assert count_parts.get("absorbed_attention" if absorb else "expanded_attention", 0) > 0
    if quantized:  # unquantized experts (float32 gather_mm on the CPU) are left to MLX
        assert count_parts.get("_experts_grouped", 0) > 0  # the prefill
        if dequant_from > 1:
            assert count_parts.get("_split_experts", 0) > 0  # the decode steps


def test_rows_per_matrix():
    w2, w3 = mx.zeros((8, 4)), mx.zeros((16, 8, 4))  # one matrix; 16 heads' matrices
    assert cpu.rows_per_matrix(mx.zeros((2, 12, 4)), w2) == 24  # batch 2 x 12 tokens
    assert cpu.rows_per_matrix(mx.zeros((1, 16, 1, 4)), w3) == 1  # a decode step, per head
    assert cpu.rows_per_matrix(mx.zeros((2, 1, 300, 4)), w3) == 600  # a latent broadcast
    assert cpu.rows_per_matrix(mx.zeros((4,)), w2) == 1


@pytest.mark.parametrize("block_bytes", [cpu.DEQUANT_BLOCK_BYTES, 5000], ids=["whole", "blocks"])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_matmul_equals_quantized_matmul(transpose, bits, block_bytes, monkeypatch):
    """Also with the float32 copy made in blocks of rows of w (5000 bytes: 4 rows of the 3
    heads at a time, 24 blocks; output features for x @ W^T, the summed axis for x @ W)."""
    monkeypatch.setattr(cpu, "DEQUANT_BLOCK_BYTES", block_bytes)
    w = mx.random.normal((3, 96, 128), key=mx.random.key(1))
    q = mx.quantize(w, group_size=64, bits=bits)
    x = mx.random.normal((3, 20, 96 if not transpose else 128), key=mx.random.key(2))
    ref = mx.quantized_matmul(x, *q, transpose=transpose, group_size=64, bits=bits)
    got = cpu.matmul(x, *q, transpose=transpose, group_size=64, bits=bits)  # 60 rows: dequantized
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert (mx.abs(got - ref).max() / mx.abs(ref).max()).item() < 1e-6


@pytest.mark.parametrize("experts", [False, True])
def test_dequantized_copies_are_made_one_block_at_a_time(experts, monkeypatch):
    """The peak memory of a long prefill's quantized matmul holds one block of the float32
    weights, not the whole matrix (and one expert's, not every selected expert's)."""
    from mlx_lm.models.switch_layers import SwitchGLU

    block = 256 * 1024
    monkeypatch.setattr(cpu, "DEQUANT_BLOCK_BYTES", block)
    T, D, F, E = 64, 512, 1024, 8
    x = mx.random.normal((1, T, D), key=mx.random.key(3))
    if experts:  # 8 experts of 3 x 2 MB in float32 each, every token choosing 2 of them
        layer = SwitchGLU(D, F, E)
        layer.gate_proj.weight = mx.random.normal((E, F, D)) * 0.02  # not MLX's zeros
        nn.quantize(layer, group_size=64, bits=4)
        inds = mx.stack([mx.arange(T) % E, (mx.arange(T) + 3) % E], axis=-1)[None]
        weights = mx.full(inds.shape, 0.5)
        dense_bytes = 3 * E * F * D * 4

        def fn():
            return cpu._experts_grouped(x, inds, weights, layer, None)

    else:  # one 16 MB float32 matrix (2048 x 2048), its output 64 x 2048
        x = mx.random.normal((1, T, 4 * D), key=mx.random.key(3))
        layer = nn.QuantizedLinear(4 * D, 2 * F, bias=False, group_size=64, bits=4)
        dense_bytes = 2 * F * 4 * D * 4

        def fn():
            return cpu.layer_matmul(layer, x)

    mx.eval(x, layer.parameters())
    with ops.use("cpu"):
        monkeypatch.setenv(cpu.ENV_THREADS, "1")
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        y = fn()
        mx.eval(y)
        extra = mx.get_peak_memory() - base
    transients = extra - y.nbytes
    assert transients < dense_bytes / 4, (transients, dense_bytes)
    # blocks in flight, the activations (x, the blocks' outputs and their concatenation)
    assert transients < 4 * block + 4 * T * (4 * D + 4 * F), (transients, block)


def test_prepare_keeps_the_parameters_and_sets_blas(split_all):
    model = tiny_model("v3_noaux", quantized=True)
    before = dict(tree_flatten(model.parameters()))
    n = cpu.prepare(model)
    after = dict(tree_flatten(model.parameters()))
    assert n > 0 and before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)
    assert isinstance(model.lm_head, cpu.RowSplitQuantizedLinear)
    assert isinstance(model.lm_head, nn.QuantizedLinear)  # still what other code checks for
    if _blas.loaded and len(cpu.workers()) > 1:
        assert _blas.threads() == 1


def test_small_models_run_from_float_weights(monkeypatch):
    """to_float: every quantized layer of a small model becomes its float kind holding the
    dequantized values; outputs equal the quantized model's; big or switched off: as is."""
    monkeypatch.setenv(cpu.ENV_SMALL_FLOAT, "1")
    model, quantized = tiny_model("v3_noaux", True), tiny_model("v3_noaux", True)
    kinds = {type(m) for _, m in model.named_modules() if "scales" in m}
    assert len(kinds) >= 2  # linear layers, the experts
    assert cpu.to_float(model, max_bytes=cpu.float_nbytes(model, []) - 1) == 0  # too big
    n = sum(1 for _, m in model.named_modules() if "scales" in m)
    assert cpu.to_float(model) == n > 0
    assert not any("scales" in m for _, m in model.named_modules())
    assert not any(type(m) in kinds for _, m in model.named_modules())
    for a, b in zip(run(model, None), run(quantized, None), strict=True):
        assert rel_err(a, b) < 1e-5
    monkeypatch.setenv(cpu.ENV_SMALL_FLOAT, "0")
    assert cpu.to_float(quantized) == 0


def test_float_weights_from_mxfp4_experts_take_the_models_dtype(monkeypatch):
    """mxfp4's scales are E8M0 bytes (uint8): the float copy is in the model's dtype."""
    monkeypatch.setenv(cpu.ENV_SMALL_FLOAT, "1")
    models = [tiny_model("v3_noaux", False) for _ in range(2)]
    for m in models:  # the routed experts in mxfp4 (as V4's release ships them)
        nn.quantize(
            m,
            32,
            4,
            mode="mxfp4",
            class_predicate=lambda p, _: p.endswith("_proj") and "switch_mlp" in p,
        )
    model, quantized = models
    assert {m["scales"].dtype for _, m in model.named_modules() if "scales" in m} == {mx.uint8}
    assert cpu.float_nbytes(model, [m for _, m in model.named_modules() if "scales" in m]) == (
        sum(v.nbytes for _, v in tree_flatten(tiny_model("v3_noaux", False).parameters()))
    )
    assert cpu.to_float(model) > 0
    assert not any("scales" in m for _, m in model.named_modules())
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    for a, b in zip(run(model, None), run(quantized, None), strict=True):
        assert rel_err(a, b) < 1e-5


def test_float_weights_leave_unknown_quantized_layers_alone(monkeypatch):
    monkeypatch.setenv(cpu.ENV_SMALL_FLOAT, "1")
    model = tiny_model("v3_noaux", True)

    class Packed(nn.Module):  # a quantized kind to_float cannot turn into a float one
        def __init__(self):
            super().__init__()
            self.weight, self.scales = mx.zeros((4, 1), mx.uint32), mx.ones((4, 1))

    model.layers[0].extra = Packed()
    assert cpu.to_float(model) == 0
    assert isinstance(model.lm_head, nn.QuantizedLinear)


def test_small_models_are_not_split(monkeypatch):
    monkeypatch.setenv(cpu.ENV_THREADS, "2")
    model = tiny_model("v3_noaux", quantized=True)
    assert cpu.prepare(model) == 0  # below MIN_PART_BYTES: one stream is faster


def test_no_split_when_another_back_end_is_in_use(split_all):
    assert len(cpu.workers()) == 3
    with kernels.pretend_metal(lambda spec, inputs: []), ops.use("metal"):  # a Mac's graph
        assert cpu.workers() == []
    with ops.use("mlx"):
        assert cpu.workers() == []
    assert len(cpu.workers()) == 3


def test_threads_setting(monkeypatch):
    monkeypatch.setenv(cpu.ENV_THREADS, "1")
    assert cpu.workers() == []
    monkeypatch.setenv(cpu.ENV_THREADS, "two")
    with pytest.raises(ValueError, match="MLX_DEEPSEEK_CPU_THREADS='two': give a whole number"):
        cpu.threads()
    monkeypatch.delenv(cpu.ENV_THREADS)
    assert 1 <= cpu.threads() <= cpu.MAX_DEFAULT_THREADS


@pytest.mark.parametrize("k", range(1, 10))
@pytest.mark.parametrize("shared", range(0, 4))
@pytest.mark.parametrize("n", range(1, 5))
def test_split_slots_cover_and_balance(k, shared, n):
    slots = cpu.split_slots(k, shared, n)
    assert len(slots) == n and slots[0][0] == 0 and slots[-1][1] == k
    assert all(a[1] == b[0] for a, b in zip(slots, slots[1:], strict=False))  # contiguous, in order
    loads = [hi - lo for lo, hi in slots]
    loads[0] += shared
    fair = math.ceil((k + shared) / n)
    assert max(loads[1:], default=0) <= fair
    assert loads[0] <= max(fair, shared)  # the shared experts are not split


def test_ranges():
    assert cpu.ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert cpu.ranges(2, 4) == [(0, 1), (1, 2)]


def test_exp_nonpositive_is_exp():
    x = -np.linspace(0.0, 87.0, 400_001).astype(np.float32)  # down to exp(-87) = 1.6e-38
    got = np.array(exp_nonpositive(mx.array(x)), dtype=np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2.5e-7  # 2 ulp
    # far below: vanishing next to 1 (a softmax numerator's maximum), never 0/0 or NaN
    tiny = np.array(exp_nonpositive(mx.array([-100.0, -3e38], dtype=mx.float32)))
    assert np.all(np.isfinite(tiny)) and np.all(tiny < 1.7e-38)


@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "mtp"])
def test_demo_answers_the_same_split(split_all, monkeypatch, mtp):
    """End to end through the generation loop (one-step-ahead async evaluation, MTP drafts
    verified in 2-token forwards): the bundled demo, everything split, says the same."""
    import mlx_deepseek

    messages = [{"role": "user", "content": "What is 123 + 456?"}]
    monkeypatch.setenv(cpu.ENV_THREADS, "1")
    model, tokenizer = mlx_deepseek.load("demo")
    ref = mlx_deepseek.generate(model, tokenizer, messages, max_tokens=80, mtp=mtp)
    monkeypatch.setenv(cpu.ENV_THREADS, "3")
    model, tokenizer = mlx_deepseek.load("demo")  # prepare() now splits every layer
    assert isinstance(model.model.layers[0].self_attn.q_a_proj, cpu.RowSplitQuantizedLinear)
    got = mlx_deepseek.generate(model, tokenizer, messages, max_tokens=80, mtp=mtp)
    assert got == ref and ref.startswith("123 + 456 = ")  # (the demo's 3-digit sums may miss)
