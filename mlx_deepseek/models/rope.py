"""Rotary position embedding in DeepSeek's interleaved layout, with YaRN scaling."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from .config import ModelArgs


def _yarn_get_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dims: int, base: float, yarn: dict[str, Any] | None = None) -> mx.array:
    """Inverse frequencies [dims / 2] of RoPE over `dims` channels; with a YaRN config
    (`factor`, `original_max_position_embeddings`, `beta_fast`, `beta_slow`) they blend
    interpolation and extrapolation across the correction range (DeepSeek's formulas)."""
    inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    if yarn is None:
        return inv_freq
    factor = float(yarn["factor"])
    original = yarn["original_max_position_embeddings"]
    beta_fast = yarn.get("beta_fast") or 32
    beta_slow = yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dims * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dims - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 where the original frequency is kept
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation


class RoPE:
    """Rotates the `dims` rope channels of q_pe / k_pe (interleaved pairs (x0,x1),(x2,x3),...;
    with traditional=False the half-split pairs (x_i, x_{i+dims/2}), as V3.2's indexer does).

    For YaRN the frequencies blend interpolation and extrapolation between the correction
    range [low, high] (DeepSeek's formulas, `original_max_position_embeddings` based), and the
    rotated values are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    """

    def __init__(self, args: ModelArgs, traditional: bool = True):
        dims = args.qk_rope_head_dim
        self.traditional = traditional
        self.dims = dims
        self.mscale = 1.0
        cfg = args.rope_scaling if args.rope_type == "yarn" else None
        inv_freq = rope_inv_freq(dims, args.rope_theta, cfg)
        if cfg is not None:
            factor = float(cfg["factor"])
            self.mscale = _yarn_get_mscale(factor, cfg.get("mscale", 1)) / _yarn_get_mscale(
                factor, cfg.get("mscale_all_dim", 0)
            )
        # mx.fast.rope takes wavelengths-per-radian ("freqs"), the reciprocal of inv_freq.
        self.freqs = 1.0 / inv_freq
        mx.eval(self.freqs)  # a constant: computed now, not in whichever thread first runs

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        # x: [B, H, L, dims]
        if self.mscale != 1.0:
            x = x * self.mscale
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self.freqs,
        )
