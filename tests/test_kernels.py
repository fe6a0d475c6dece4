"""The fused MoE kernels (mlx_deepseek/kernels/moe.py, metal_kernels/) against a float64 NumPy
reference that unpacks MLX's quantized words itself. Where there is no Metal the very same
sources run in the CPU emulator of Metal (tests/metal_emulator); on a Mac they run on the GPU."""

import itertools
import math
import random
import warnings
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_support import (
    H_TOLERANCE,
    MAKE_KERNEL,
    ON_METAL,
    Y_TOLERANCE,
    dequantize,
    dequantize_mxfp4,
    f64,
    moe_reference,
    silu,
    swiglu,
    ulps,
)
from mlx_lm.models.switch_layers import SwitchGLU

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek import ops
from mlx_deepseek.kernels import moe as kernels
from mlx_deepseek.kernels import runtime
from mlx_deepseek.kernels.moe import Variant, kernel_specs
from mlx_deepseek.kernels.runtime import Unsupported
from mlx_deepseek.models.moe import MLP
from mlx_deepseek.ops import metal as metal_ops

pytestmark = pytest.mark.emulator  # without Metal: needs clang >= 16 (conftest.py)


@dataclass(frozen=True)
class Case:
    dtype: mx.Dtype
    gate_up: tuple[int, int] = (4, 64)  # (bits, group size)
    down: tuple[int, int] = (4, 64)
    shared_gate_up: tuple[int, int] | None = None  # None: as the routed ones
    shared_down: tuple[int, int] | None = None
    D: int = 256
    I: int = 256
    E: int = 8
    top_k: int = 4
    n_shared: int = 1
    n_tokens: int = 1
    rows: int = kernels.ROWS
    scale_dtype: mx.Dtype | None = None  # None: the activation dtype
    mode: str = "affine"  # the routed experts' format: "affine" or "mxfp4" (gate_up = (4, 32))
    shared_mode: str = "affine"
    limit: float = 0.0  # V4's clamped SwiGLU

    def variant(self) -> Variant:
        sgu = self.shared_gate_up or self.gate_up
        sd = self.shared_down or self.down
        scale = self.scale_dtype or self.dtype

        def fmt(q, mode):
            return (4, 32) if mode == "mxfp4" else q

        return Variant(
            self.dtype,
            mx.uint8 if self.mode == "mxfp4" else scale,
            fmt(self.gate_up, self.mode),
            fmt(self.down, self.mode),
            fmt(sgu, self.shared_mode),
            fmt(sd, self.shared_mode),
            self.D,
            self.I,
            self.top_k,
            self.n_shared,
            self.n_tokens,
            self.rows,
            (self.mode, self.mode, self.shared_mode, self.shared_mode),
            mx.uint8 if self.shared_mode == "mxfp4" else scale,
            self.limit,
        )


def quantized(rng, shape, q, dtype, mode="affine"):
    w = rng.normal(0.0, 1.0 / math.sqrt(shape[-1]), shape).astype(np.float32)
    if mode == "mxfp4":  # no biases: the scales stand in (as the planner passes them)
        wq, scales = mx.quantize(mx.array(w), 32, 4, mode="mxfp4")
        return [wq, scales, scales]
    return list(mx.quantize(mx.array(w).astype(dtype), q[1], q[0]))


def dequantized(parts: list[mx.array], q: tuple[int, int], mode: str) -> np.ndarray:
    if mode == "mxfp4":
        return dequantize_mxfp4(parts[0], parts[1])
    return dequantize(*parts, *q)


def make_data(case: Case, seed: int = 0, parts=("gate_up", "down")) -> dict:
    rng = np.random.default_rng(seed)
    v = case.variant()
    S, E, D, I, nt = v.scale_dtype, case.E, case.D, case.I, case.n_tokens
    d = {
        "x": mx.array(rng.normal(size=(nt, D)).astype(np.float32)).astype(case.dtype),
        "inds": mx.array(
            np.stack([rng.permutation(E)[: case.top_k] for _ in range(nt)]).astype(np.uint32)
        ),
        "scores": mx.array(rng.uniform(0.1, 2.5, (nt, case.top_k)).astype(np.float32)),
    }
    width = max(case.n_shared, 1) * I
    SS, m, sm = v.shared_scale_dtype, case.mode, case.shared_mode
    if "gate_up" in parts:
        d["g"], d["u"] = (quantized(rng, (E, I, D), v.gate_up, S, m) for _ in range(2))
        d["sg"], d["su"] = (quantized(rng, (width, D), v.shared_gate_up, SS, sm) for _ in range(2))
    if "down" in parts:
        d["d"] = quantized(rng, (E, D, I), v.down, S, m)
        d["sd"] = quantized(rng, (D, width), v.shared_down, SS, sm)
    return d


def run_gate_up(case: Case, d: dict) -> mx.array:
    spec, _ = kernel_specs(case.variant())
    shared = d["sg"] + d["su"] if case.n_shared else d["g"] + d["u"]
    lim = mx.array([case.limit], mx.float32)
    inputs = [d["x"], d["inds"], *d["g"], *d["u"], *shared, lim]
    return MAKE_KERNEL(**spec.definition())(inputs=inputs, **spec.launch())[0]


def run_down(case: Case, d: dict, h: mx.array) -> mx.array:
    _, spec = kernel_specs(case.variant())
    shared = d["sd"] if case.n_shared else d["d"]
    inputs = [h, d["inds"], d["scores"], *d["d"], *shared]
    return MAKE_KERNEL(**spec.definition())(inputs=inputs, **spec.launch())[0]


def ref_gate_up(case: Case, d: dict) -> np.ndarray:
    v = case.variant()
    x, inds = f64(d["x"]), np.array(d["inds"])
    wg, wu = (dequantized(d[k], v.gate_up, case.mode) for k in ("g", "u"))
    h = np.zeros((case.n_tokens, case.top_k + case.n_shared, case.I))
    for t, j in itertools.product(range(case.n_tokens), range(case.top_k)):
        e = inds[t, j]
        h[t, j] = swiglu(wg[e] @ x[t], wu[e] @ x[t], case.limit)
    if case.n_shared:
        sg, su = (dequantized(d[k], v.shared_gate_up, case.shared_mode) for k in ("sg", "su"))
        hs = swiglu(x @ sg.T, x @ su.T, case.limit)  # the shared MLP at full width n * I
        h[:, case.top_k :] = hs.reshape(case.n_tokens, case.n_shared, case.I)
    return h


def ref_down(case: Case, d: dict, h: np.ndarray) -> np.ndarray:
    v = case.variant()
    inds, scores = np.array(d["inds"]), f64(d["scores"])
    wd = dequantized(d["d"], v.down, case.mode)
    y = np.zeros((case.n_tokens, case.D))
    for t, j in itertools.product(range(case.n_tokens), range(case.top_k)):
        y[t] += scores[t, j] * (wd[inds[t, j]] @ h[t, j])
    if case.n_shared:
        sd = dequantized(d["sd"], v.shared_down, case.shared_mode)
        y += h[:, case.top_k :].reshape(case.n_tokens, -1) @ sd.T
    return y


def check_case(case: Case, seed: int = 0) -> tuple[float, float]:
    d = make_data(case, seed)
    h = run_gate_up(case, d)
    assert h.shape == (case.n_tokens, case.top_k + case.n_shared, case.I)
    err_h = ulps(h, ref_gate_up(case, d), mx.float32)
    y = run_down(case, d, h)
    assert y.dtype == case.dtype and y.shape == (case.n_tokens, case.D)
    err_y = ulps(y, ref_down(case, d, f64(h)), case.dtype)
    print(f"{case}: h {err_h:.3g} fp32 EPS, y {err_y:.3g} EPS")
    assert err_h <= H_TOLERANCE
    assert err_y <= Y_TOLERANCE[case.dtype]
    return err_h, err_y


CASES = {
    # V2-Lite-like decode: 6 of 64 routed experts + 2 shared slots, K = 1408 for down
    "decode-f16-q4g64-K1408": Case(mx.float16, D=256, I=1408, top_k=6, n_shared=2),
    # mixed recipe: 8-bit gate/up, 4-bit down, other shared quantizations; 3 tokens
    "verify3-bf16-q8g128-down-q4g32": Case(
        mx.bfloat16, (8, 128), (4, 32), (4, 64), (8, 64), D=384, I=256, top_k=3, n_tokens=3
    ),
    # bit widths that straddle words (3, 6), float32 activations with bfloat16 scales, 8 tokens
    "verify8-f32-q3g32-down-q6g64": Case(
        mx.float32,
        (3, 32),
        (6, 64),
        D=320,
        I=192,
        E=4,
        top_k=2,
        n_tokens=8,
        scale_dtype=mx.bfloat16,
    ),
    # DeepSeek V4: mxfp4 routed experts (uint8 scales), an 8-bit affine shared expert (bf16
    # scales), the clamped SwiGLU; 6 of 8 experts
    "v4-bf16-mxfp4-shared-q8g64-clamp": Case(
        mx.bfloat16,
        shared_gate_up=(8, 64),
        shared_down=(8, 64),
        D=256,
        I=256,
        top_k=6,
        mode="mxfp4",
        limit=0.6,
    ),
    # mxfp4 everywhere (the shared expert too), 3 tokens, float32, clamped
    "v4-verify3-f32-all-mxfp4-clamp": Case(
        mx.float32,
        D=192,
        I=320,
        E=6,
        top_k=2,
        n_tokens=3,
        mode="mxfp4",
        shared_mode="mxfp4",
        limit=0.8,
    ),
    # affine routed experts, mxfp4 shared expert, float16, no clamp
    "f16-q4g32-shared-mxfp4": Case(
        mx.float16,
        (4, 32),
        (6, 64),
        D=128,
        I=192,
        E=4,
        top_k=2,
        n_tokens=2,
        shared_mode="mxfp4",
    ),
    # 2-bit and 5-bit, no shared experts, 2 tokens
    "f16-q2g32-down-q5g128-noshared": Case(
        mx.float16, (2, 32), (5, 128), D=256, I=384, E=6, top_k=4, n_shared=0, n_tokens=2
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_float64_reference(name):
    check_case(CASES[name])


def test_gate_up_with_partial_row_tiles_and_threadgroups():
    # I = 98 rows in tiles of 3: the last tile has two valid rows, and of the 33 tiles the last
    # threadgroup holds only one simdgroup (the grid counts threads, as MLX dispatches it)
    case = Case(mx.float16, (4, 32), D=128, I=98, E=4, top_k=2, n_shared=1, n_tokens=2, rows=3)
    d = make_data(case, parts=("gate_up",))
    spec, _ = kernel_specs(case.variant())
    assert spec.grid[0] == 32 * 33 and spec.grid[0] % spec.threadgroup[0] == 32
    h = run_gate_up(case, d)
    assert ulps(h, ref_gate_up(case, d), mx.float32) <= H_TOLERANCE


def test_down_with_an_output_size_not_a_multiple_of_the_tile():
    case = Case(
        mx.bfloat16,
        down=(8, 32),
        shared_down=(4, 64),
        D=98,
        I=192,
        E=5,
        top_k=3,
        n_shared=2,
        n_tokens=4,
    )
    d = make_data(case, parts=("down",))
    rng = np.random.default_rng(1)
    h = mx.array(rng.normal(size=(4, 5, 192)).astype(np.float32))
    y = run_down(case, d, h)
    assert ulps(y, ref_down(case, d, f64(h)), mx.bfloat16) <= Y_TOLERANCE[mx.bfloat16]


def _modules(dtype, q=(4, 64), shared_q=(4, 64), D=256, I=512, E=8, n_shared=2, seed=0):
    mx.random.seed(seed)
    switch = SwitchGLU(D, I, E)
    switch.set_dtype(dtype)
    nn.quantize(switch, q[1], q[0])
    shared = MLP(D, n_shared * I)
    shared.set_dtype(dtype)
    if shared_q:
        nn.quantize(shared, shared_q[1], shared_q[0])
    return switch, shared


def _route(rng, shape, E, k):
    inds = np.stack([rng.permutation(E)[:k] for _ in range(int(np.prod(shape)))])
    inds = mx.array(inds.reshape(*shape, k).astype(np.uint32))
    scores = mx.array(rng.uniform(0.1, 2.5, (*shape, k)).astype(np.float32))
    return inds, scores


def test_run_plan_with_mlx_lm_modules_matches_reference():
    switch, shared = _modules(mx.float16)
    rng = np.random.default_rng(3)
    x = mx.array(rng.normal(size=(2, 3, 256)).astype(np.float32)).astype(mx.float16)
    inds, scores = _route(rng, (2, 3), 8, 4)
    plan = kernels.plan_moe(x, inds, scores, switch, shared)
    assert plan is not None and plan.unfused_shared is None
    assert (plan.variant.n_tokens, plan.variant.n_shared, plan.variant.top_k) == (6, 2, 4)
    y = kernels.run_plan(plan, MAKE_KERNEL)
    assert y.shape == x.shape and y.dtype == mx.float16
    ref = moe_reference(x, inds, scores, switch, shared)
    assert ulps(y, ref, mx.float16) <= Y_TOLERANCE[mx.float16]
    # MLX's own path rounds its intermediates to float16: the runtime self-check must accept
    # this agreement (it only has to catch gross errors)
    with ops.use("mlx"):
        mlx_ref = ops.moe(x, inds, scores, switch, shared)
    err = float(mx.abs(y.astype(mx.float32) - mlx_ref.astype(mx.float32)).max())
    assert err <= metal_ops.SELF_CHECK_TOLERANCE[mx.float16] * float(mx.abs(mlx_ref).max())


def test_an_unquantized_shared_mlp_is_added_by_mlx():
    switch, shared = _modules(mx.float32, shared_q=None, D=128, I=128, E=4, n_shared=1)
    rng = np.random.default_rng(4)
    x = mx.array(rng.normal(size=(1, 128)).astype(np.float32))
    inds, scores = _route(rng, (1,), 4, 2)
    plan = kernels.plan_moe(x, inds, scores, switch, shared)
    assert plan.unfused_shared is shared and plan.variant.n_shared == 0
    y = kernels.run_plan(plan, MAKE_KERNEL)
    ref = moe_reference(x, inds, scores, switch, shared)
    assert ulps(y, ref, mx.float32) <= Y_TOLERANCE[mx.float32]


def _decline_cases():
    rng = np.random.default_rng(5)
    switch, shared = _modules(mx.float16, D=64, I=64, E=4, n_shared=1)
    x = mx.array(rng.normal(size=(1, 64)).astype(np.float16))
    inds, scores = _route(rng, (1,), 4, 2)
    x9 = mx.zeros((9, 64), mx.float16)
    i9, s9 = _route(rng, (9,), 4, 2)
    plain = SwitchGLU(64, 64, 4)
    mixed, _ = _modules(mx.float16, D=64, I=64, E=4, n_shared=1)
    mixed.up_proj = plain.up_proj.to_quantized(64, 8)
    fp8 = SwitchGLU(64, 64, 4)
    nn.quantize(fp8, 32, 8, mode="mxfp8")
    return {
        "9 tokens": (x9, i9, s9, switch, shared),
        "not quantized": (x.astype(mx.float32), inds, scores, plain, None),
        "gate_proj and up_proj are quantized differently": (x, inds, scores, mixed, shared),
        "not affine": (x, inds, scores, fp8, None),
        "activation dtype": (x.astype(mx.int32), inds, scores, switch, shared),
    }


def fresh_metal(monkeypatch) -> None:
    """The "metal" back-end's self-check state fresh, the emulator standing in for Metal."""
    monkeypatch.delenv(metal_ops.ENV_SWITCH, raising=False)
    if not ON_METAL:
        monkeypatch.setattr(mx.fast, "metal_kernel", MAKE_KERNEL)
    monkeypatch.setattr(metal_ops._State, "disabled", set())
    monkeypatch.setattr(metal_ops._State, "checked", set())


def test_unsupported_calls_are_declined_with_a_debug_log(caplog, monkeypatch):
    fresh_metal(monkeypatch)
    caplog.set_level("DEBUG", logger="mlx_deepseek.ops.metal")
    for reason, args in _decline_cases().items():
        with pytest.raises(Unsupported, match=reason):
            kernels.plan_moe(*args)
        caplog.clear()
        with ops.use("metal"):  # the dispatcher takes MLX's path and says why
            ops.moe(*args)
        assert reason in caplog.text


def test_fused_moe_is_off_without_metal_or_when_switched_off(monkeypatch):
    switch, shared = _modules(mx.float16, D=64, I=64, E=4, n_shared=1)
    x = mx.zeros((1, 64), mx.float16)
    inds, scores = _route(np.random.default_rng(6), (1,), 4, 2)
    fresh_metal(monkeypatch)
    launches = []
    monkeypatch.setattr(runtime, "launch", lambda *a, **k: launches.append(a) or [])
    if not ON_METAL:  # the back-end follows the device: not "metal" on this machine
        assert ops.backend.default_name() != "metal"
        ops.moe(x, inds, scores, switch, shared)
    monkeypatch.setenv(metal_ops.ENV_SWITCH, "0")
    with ops.use("metal"):
        assert not metal_ops.enabled("moe")
        y = ops.moe(x, inds, scores, switch, shared)
    assert not launches and y.shape == x.shape


def test_fused_moe_self_checks_once_then_falls_back_with_one_warning(monkeypatch):
    fresh_metal(monkeypatch)
    switch, shared = _modules(mx.float16, D=128, I=128, E=4, n_shared=1)
    rng = np.random.default_rng(7)
    x = mx.array(rng.normal(size=(1, 1, 128)).astype(np.float16))
    inds, scores = _route(rng, (1, 1), 4, 2)
    with ops.use("metal"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = ops.moe(x, inds, scores, switch, shared)
        assert [f for f, _ in metal_ops._State.checked] == ["moe"]
        ref = moe_reference(x, inds, scores, switch, shared)
        assert ulps(y, ref, mx.float16) <= Y_TOLERANCE[mx.float16]

        # a wrong kernel (routing weights doubled) is caught by the check of a new variant
        down = runtime.source("moe_down.metal")
        down = down.replace("scores[t * TOPK + j]", "2.0f * scores[t * TOPK + j]")
        monkeypatch.setitem(runtime._sources, "moe_down.metal", down)
        x2 = mx.concatenate([x, x], axis=1)
        inds2, scores2 = _route(rng, (1, 2), 4, 2)
        with pytest.warns(RuntimeWarning, match="disagree with MLX's reference"):
            y2 = ops.moe(x2, inds2, scores2, switch, shared)
        ref2 = moe_reference(x2, inds2, scores2, switch, shared)
        assert ulps(y2, ref2, mx.float16) <= 4 * Y_TOLERANCE[mx.float16]  # MLX's result
        assert metal_ops._State.disabled == {"moe"}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            launched = []
            monkeypatch.setattr(runtime, "launch", lambda *a, **k: launched.append(a) or [])
            ops.moe(x, inds, scores, switch, shared)
            assert not launched  # the family stays off, even for a checked variant


def test_a_kernel_that_fails_to_compile_falls_back_with_a_warning(monkeypatch):
    fresh_metal(monkeypatch)
    broken = runtime.source("moe_gate_up.metal") + "\nthis does not compile;\n"
    monkeypatch.setitem(runtime._sources, "moe_gate_up.metal", broken)
    switch, shared = _modules(mx.float16, D=64, I=64, E=4, n_shared=1)
    inds, scores = _route(np.random.default_rng(8), (1,), 4, 2)
    x = mx.zeros((1, 64), mx.float16)
    with ops.use("metal"), pytest.warns(RuntimeWarning, match="kernels failed"):
        y = ops.moe(x, inds, scores, switch, shared)
    # the shared experts of MLX's path then try the MLP kernels: the same broken source
    assert y.shape == x.shape and metal_ops._State.disabled == {"moe", "mlp"}


def _sweep():
    dtypes = (mx.float16, mx.bfloat16, mx.float32)
    grid = itertools.product(runtime.SUPPORTED_BITS, runtime.SUPPORTED_GROUP_SIZES, dtypes)
    for i, (bits, gs, dtype) in enumerate(grid):
        pick = random.Random(i).choice  # the other parameters vary independently of these
        down = (runtime.SUPPORTED_BITS[(i + 3) % 6], pick(runtime.SUPPORTED_GROUP_SIZES))
        yield Case(
            dtype,
            (bits, gs),
            down,
            D=256,
            I=pick((384, 1408)),
            E=6,
            top_k=pick((2, 4, 6)),
            n_shared=pick((0, 1, 2)),
            n_tokens=(1, 2, 3, 5, 8)[i % 5],
        )


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_sweep()), ids=lambda c: f"{c.dtype}-q{c.gate_up}-d{c.down}")
def test_every_variant_matches_float64_reference(case):
    check_case(case, seed=11)


def test_sweep_covers_every_bits_group_and_dtype():
    cases = list(_sweep())
    assert {(c.gate_up, c.dtype) for c in cases} == {
        ((b, g), d)
        for b in runtime.SUPPORTED_BITS
        for g in runtime.SUPPORTED_GROUP_SIZES
        for d in (mx.float16, mx.bfloat16, mx.float32)
    }
    assert {c.down[0] for c in cases} == set(runtime.SUPPORTED_BITS)
    assert {c.n_tokens for c in cases} >= {1, 8} and any(c.I == 1408 for c in cases)


def test_a_dense_mlp_runs_as_one_shared_slot():
    # no routed slot (top_k 0): the dense MLP's whole width (320, not a multiple of the row
    # tile) is one always-on slot; mixed quantization between gate/up and down
    mx.random.seed(9)
    mlp = MLP(128, 320)
    mlp.set_dtype(mx.bfloat16)
    nn.quantize(mlp, 64, 8, class_predicate=lambda p, m: p != "down_proj")
    mlp.down_proj = mlp.down_proj.to_quantized(32, 4)
    x = mx.array(np.random.default_rng(10).normal(size=(1, 3, 128)).astype(np.float32))
    x = x.astype(mx.bfloat16)
    plan = kernels.plan_mlp(x, mlp)
    v = plan.variant
    assert (v.top_k, v.n_shared, v.inter, v.gate_up, v.down) == (0, 1, 320, (8, 64), (4, 32))
    y = kernels.run_plan(plan, MAKE_KERNEL)
    w = {p: dequantize(*(getattr(mlp, p)[k] for k in ("weight", "scales", "biases")),
                       getattr(mlp, p).bits, getattr(mlp, p).group_size)
         for p in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
    xs = f64(x).reshape(3, 128)
    ref = (silu(xs @ w["gate_proj"].T) * (xs @ w["up_proj"].T)) @ w["down_proj"].T
    assert y.shape == x.shape and y.dtype == mx.bfloat16
    assert ulps(y, ref.reshape(x.shape), mx.bfloat16) <= Y_TOLERANCE[mx.bfloat16]
    with pytest.raises(Unsupported, match="activation dtype"):  # declined, not wrong
        kernels.plan_mlp(x.astype(mx.int32), mlp)
