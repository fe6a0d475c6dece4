"""DeepSeek V4's MoE through ops.moe: mxfp4 routed experts (the released FP4 bytes), the
clamped SwiGLU as a parameter, on every back-end ("mlx", the CPU's split and grouped paths,
the fused Metal kernels in the emulator) against a float64 NumPy reference."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_support import f64, layer_weight, metal, moe_reference, swiglu
from mlx_lm.models.switch_layers import SwitchGLU

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek import ops
from mlx_deepseek.kernels import moe as moe_kernels
from mlx_deepseek.models.deepseek_v4 import ModelArgs, MoE
from mlx_deepseek.ops import cpu as cpu_ops


def experts(D, I, E, mode="mxfp4", seed=0) -> SwitchGLU:
    mx.random.seed(seed)
    switch = SwitchGLU(D, I, E)
    if mode == "mxfp4":
        nn.quantize(switch, 32, 4, mode="mxfp4")
    elif mode:
        nn.quantize(switch, 64, 8)
    return switch


def shared_mlp(D, I, quantize=True, seed=1):
    from mlx_deepseek.models.moe import MLP

    mx.random.seed(seed)
    mlp = MLP(D, I)
    if quantize:
        nn.quantize(mlp, 64, 8)
    return mlp


def routed(rng, tokens, E, k):
    inds = np.stack([rng.permutation(E)[:k] for _ in range(tokens)])
    scores = rng.uniform(0.1, 2.0, (tokens, k)).astype(np.float32)
    return mx.array(inds[None].astype(np.uint32)), mx.array(scores[None])


def rel(got, ref) -> float:
    return float(np.abs(f64(got) - ref).max() / np.abs(ref).max())


def test_the_clamp_changes_the_result():
    rng = np.random.default_rng(0)
    switch, shared = experts(64, 64, 4), shared_mlp(64, 64)
    x = mx.array(rng.normal(size=(1, 3, 64)).astype(np.float32))
    inds, scores = routed(rng, 3, 4, 2)
    with ops.use("mlx"):
        free = ops.moe(x, inds, scores, switch, shared)
        clamped = ops.moe(x, inds, scores, switch, shared, swiglu_limit=0.5)
    assert rel(free, moe_reference(x, inds, scores, switch, shared, 0.0)) < 1e-5
    assert rel(clamped, moe_reference(x, inds, scores, switch, shared, 0.5)) < 1e-5
    assert rel(clamped, f64(free)) > 1e-2  # the clamp is really applied


@pytest.mark.parametrize("tokens", [1, 3, 40])  # 40 x 4 slots: SwitchGLU sorts by expert
@pytest.mark.parametrize("mode", ["mxfp4", "affine", None])
def test_mlx_reference_equals_float64(mode, tokens):
    rng = np.random.default_rng(tokens)
    switch, shared = experts(128, 64, 8, mode or ""), shared_mlp(128, 64, mode is not None)
    x = mx.array(rng.normal(size=(1, tokens, 128)).astype(np.float32))
    inds, scores = routed(rng, tokens, 8, 4)
    with ops.use("mlx"):
        y = ops.moe(x, inds, scores, switch, shared, swiglu_limit=0.7)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel(y, moe_reference(x, inds, scores, switch, shared, 0.7)) < 1e-5


@pytest.mark.parametrize("tokens", [1, 2, 20])  # decode split across streams; prefill grouped
def test_cpu_back_end_splits_clamped_mxfp4_experts(monkeypatch, tokens):
    monkeypatch.setenv(cpu_ops.ENV_THREADS, "2")
    rng = np.random.default_rng(7)
    D, I, E, k = 512, 512, 8, 4  # big enough for the split to pay (MIN_PART_BYTES)
    switch, shared = experts(D, I, E), shared_mlp(D, I)
    x = mx.array(rng.normal(size=(1, tokens, D)).astype(np.float32))
    inds, scores = routed(rng, tokens, E, k)
    args = (x, inds, scores, switch, shared, 0.6)
    with ops.use("cpu"):
        if tokens < cpu_ops.DEQUANT_MIN_TOKENS:
            assert cpu_ops._split_experts(*args) is not None  # really the split path
        y = ops.moe(*args)
    ref = moe_reference(x, inds, scores, switch, shared, 0.6)
    assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_metal_kernels_take_mxfp4_experts_and_the_clamp(monkeypatch, dtype):
    rng = np.random.default_rng(3)
    D, I, E, k = 256, 128, 6, 3
    switch, shared = experts(D, I, E), shared_mlp(D, I)
    for module in (switch, shared):
        module.update(
            nn.utils.tree_map(lambda a: a.astype(dtype) if a.dtype == mx.float32 else a,
                              module.parameters())
        )  # fmt: skip
    x = mx.array(rng.normal(size=(1, 2, D)).astype(np.float32)).astype(dtype)
    inds, scores = routed(rng, 2, E, k)
    plan = moe_kernels.plan_moe(x, inds, scores, switch, shared, 0.6)
    assert plan.unfused_shared is None
    assert plan.variant.modes == ("mxfp4", "mxfp4", "affine", "affine")
    with metal(monkeypatch, "moe"):  # the self-check against MLX's path passes
        y = ops.moe(x, inds, scores, switch, shared, swiglu_limit=0.6)
    tolerance = {mx.float32: 1e-5, mx.bfloat16: 1e-2}[dtype]
    assert (
        y.dtype == dtype and rel(y, moe_reference(x, inds, scores, switch, shared, 0.6)) < tolerance
    )


def test_v4_moe_module_runs_through_ops_moe(monkeypatch):
    """The model's MoE hands ops.moe its experts, shared expert and swiglu_limit."""
    args = ModelArgs.from_dict(
        dict(model_type="deepseek_v4", num_hidden_layers=1, hidden_size=64, vocab_size=32,
             moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
             num_hash_layers=0, swiglu_limit=0.4)
    )  # fmt: skip
    moe = MoE(args, 0)
    seen = {}
    real = ops.moe

    def spy(*a, **kw):
        seen["limit"] = a[5] if len(a) > 5 else kw.get("swiglu_limit")
        return real(*a, **kw)

    monkeypatch.setattr(ops, "moe", spy)
    x = mx.random.normal((1, 3, 64))
    y = moe(x, mx.array([[1, 2, 3]]))
    assert seen["limit"] == 0.4 and y.shape == x.shape
    inds, scores = moe.gate(x, mx.array([[1, 2, 3]]))
    ref = moe_reference(x, inds, scores, moe.switch_mlp, moe.shared_experts, 0.4)
    assert rel(y, ref) < 1e-5
    # the shared expert alone clamps the same way
    sh = moe.shared_experts
    xs = f64(x).reshape(-1, 64)
    ref_shared = swiglu(xs @ layer_weight(sh.gate_proj).T, xs @ layer_weight(sh.up_proj).T, 0.4)
    assert rel(sh(x), (ref_shared @ layer_weight(sh.down_proj).T).reshape(x.shape)) < 1e-5
