"""FP8 e4m3 weights with per-block `weight_scale_inv` -> floating point.

DeepSeek-V3/R1 store most linear weights as float8_e4m3fn with one float32 scale per
128x128 block (`weight_block_size` in config.json); edge blocks are partial. The value of
element (i, j) is fp8(W[i, j]) * scale_inv[i // br, j // bc], computed here in float32: the
fp8 decode is exact, so the only rounding is the one float32 multiply.
"""

from __future__ import annotations

import math

import mlx.core as mx

DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """The `weight_scale_inv` shape a 2-D fp8 weight of `shape` must have."""
    rows, cols = shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def dequantize_fp8(
    weight: mx.array, scale_inv: mx.array, block: tuple[int, int] = DEFAULT_BLOCK
) -> mx.array:
    """weight: uint8 [R, C] holding e4m3 bit patterns; scale_inv: [ceil(R/br), ceil(C/bc)].

    Returns float32 [R, C]. `weight` may be a row slice of a larger tensor as long as it
    starts on a block boundary and `scale_inv` holds the matching block rows.
    """
    if weight.dtype != mx.uint8:
        raise TypeError(f"fp8 weights must be passed as their uint8 bytes, got {weight.dtype}")
    rows, cols = weight.shape
    br, bc = block
    nr, nc = scale_shape((rows, cols), block)
    if tuple(scale_inv.shape) != (nr, nc):
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, expected {(nr, nc)}")
    w = mx.from_fp8(weight, dtype=mx.float32)  # exact: every e4m3 value is a float32
    pad_r, pad_c = nr * br - rows, nc * bc - cols
    if pad_r or pad_c:
        w = mx.pad(w, ((0, pad_r), (0, pad_c)))
    # [nr, br, nc, bc] * [nr, 1, nc, 1]: each block times its own scale, no full-size scale map
    w = w.reshape(nr, br, nc, bc) * scale_inv.astype(mx.float32)[:, None, :, None]
    w = w.reshape(nr * br, nc * bc)
    if pad_r or pad_c:
        w = w[:rows, :cols]
    return w
