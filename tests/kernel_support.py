"""What the kernel tests share: the kernel maker (the real Metal one on a Mac, else the CPU
emulator of Metal), float64 references of MLX's quantized format, and the "metal" back-end
switched on for a block."""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek import ops
from mlx_deepseek.kernels import runtime
from mlx_deepseek.ops import metal as metal_ops

ON_METAL = mx.metal.is_available()
if ON_METAL:
    MAKE_KERNEL = mx.fast.metal_kernel
else:
    from metal_emulator import metal_kernel as MAKE_KERNEL

EPS = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}
# Errors are max |kernel - reference| / max |reference| in units of EPS. h is float32 summed in
# fp32; y is rounded once to the activation dtype (<= 0.5 of its EPS) after fp32 sums.
H_TOLERANCE = 16.0  # fp32 EPS
Y_TOLERANCE = {mx.float16: 1.0, mx.bfloat16: 1.0, mx.float32: 16.0}


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def unpack(words: mx.array, bits: int) -> np.ndarray:
    """uint32 words [..., n] -> values [..., n * 32 / bits]: value i in bits [bits*i, bits*(i+1))
    of the little-endian bit stream."""
    w = np.array(words)
    stream = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(*w.shape[:-1], -1, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(-1)


def dequantize(wq: mx.array, scales: mx.array, biases: mx.array, bits: int, gs: int) -> np.ndarray:
    q = unpack(wq, bits)
    grouped = q.reshape(*q.shape[:-1], -1, gs)
    return (grouped * f64(scales)[..., None] + f64(biases)[..., None]).reshape(q.shape)


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def dequantize_mxfp4(wq: mx.array, scales: mx.array) -> np.ndarray:
    """MLX's mxfp4 by the format: FP4 e2m1 codes (4 bits each, low nibble first) times
    2^(s - 127) for the E8M0 scale byte s of each group of 32."""
    q = E2M1[unpack(wq, 4)]
    grouped = q.reshape(*q.shape[:-1], -1, 32)
    scale = np.ldexp(1.0, np.array(scales).astype(np.int64) - 127)
    return (grouped * scale[..., None]).reshape(q.shape)


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def swiglu(gate: np.ndarray, up: np.ndarray, limit: float = 0.0) -> np.ndarray:
    """silu(gate) * up, clamped as DeepSeek V4 does for a limit > 0."""
    if limit > 0:
        gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
    return silu(gate) * up


def layer_weight(layer) -> np.ndarray:
    """A Linear / SwitchLinear's weight in float64: as is, or dequantized (affine or mxfp4)."""
    if "scales" not in layer:
        return f64(layer.weight)
    if getattr(layer, "mode", "affine") == "mxfp4":
        return dequantize_mxfp4(layer.weight, layer.scales)
    return dequantize(layer.weight, layer.scales, layer.biases, layer.bits, layer.group_size)


def moe_reference(x, inds, scores, switch, shared, limit: float = 0.0) -> np.ndarray:
    """ops.moe in float64, token by token: sum_j scores[t, j] * expert_{inds[t, j]}(x[t]) +
    shared(x[t]) (shared may be None), every SwiGLU clamped at `limit` when it is > 0."""
    xs = f64(x).reshape(-1, x.shape[-1])
    ii = np.array(inds).reshape(len(xs), -1)
    ss = f64(scores).reshape(ii.shape)
    projections = ("gate_proj", "up_proj", "down_proj")
    wg, wu, wd = (layer_weight(getattr(switch, p)) for p in projections)
    y = np.zeros_like(xs)
    for t, j in itertools.product(range(len(xs)), range(ii.shape[1])):
        e = ii[t, j]
        y[t] += ss[t, j] * (wd[e] @ swiglu(wg[e] @ xs[t], wu[e] @ xs[t], limit))
    if shared is not None:
        sg, su, sd = (layer_weight(getattr(shared, p)) for p in projections)
        y += swiglu(xs @ sg.T, xs @ su.T, limit) @ sd.T
    return y.reshape(x.shape)


def ulps(got: mx.array, ref: np.ndarray, dtype) -> float:
    return float(np.abs(f64(got) - ref).max() / np.abs(ref).max() / EPS[dtype])


@contextmanager
def metal(monkeypatch, *families: str):
    """The "metal" back-end as on a Mac (the emulator standing in for the GPU where there is
    none), with a fresh self-check state; afterwards, each of `families` must have run its
    kernels (passed the self-check), not fallen back to MLX."""
    monkeypatch.delenv(metal_ops.ENV_SWITCH, raising=False)
    monkeypatch.setattr(metal_ops._State, "disabled", set())
    monkeypatch.setattr(metal_ops._State, "checked", set())
    if not ON_METAL:
        monkeypatch.setattr(mx.fast, "metal_kernel", MAKE_KERNEL)
        monkeypatch.setattr(runtime, "available", lambda: True)
    with ops.use("metal"):
        yield
    ran = {family for family, _ in metal_ops._State.checked}
    assert set(families) <= ran and not metal_ops._State.disabled, (ran, metal_ops._State.disabled)
