"""The small value types the ops take (shared by the model files and every back-end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

CAUSAL = "causal"  # the mask argument for causal attention (built per call as needed)

# A latent cache entry: an array, or a quantized cache's MLX affine triple (packed uint32,
# scales, biases), quantized along the last axis
LatentEntry = mx.array | tuple[mx.array, mx.array, mx.array]


class SplitRows(NamedTuple):
    """DeepSeek V4's quantized K=V rows [B, n, d] (its compressed rows with --kv-bits): the
    first d - r channels as MLX's affine triple along the channels (packed uint32
    [B, n, (d - r) * bits / 32], scales and biases [B, n, (d - r) / group]) and the last r
    (the RoPE part) at full precision in `rope` [B, n, r]."""

    packed: mx.array
    scales: mx.array
    biases: mx.array
    rope: mx.array


class MLAHeads(NamedTuple):
    """What MLA's attention ops need of a layer: kv_b_proj's two halves (mlx-lm MultiLinear
    layers, maybe quantized), the RoPE of the rope dims, and the shapes."""

    embed_q: nn.Module  # W_uk^T: [H, rank, nope]
    unembed_out: nn.Module  # W_uv: [H, v, rank]
    rope: Any  # models.rope.RoPE
    heads: int
    nope: int
    rope_dims: int
    rank: int
    v_dim: int
    scale: float  # the softmax scale (YaRN's mscale correction included)


@dataclass(frozen=True)
class Routing:
    """A MoE router's rule (DeepSeek's config fields; see ops.mlx.route). A frozen
    dataclass, not a tuple: modules keep it as a plain attribute, not a child."""

    top_k: int
    topk_method: str  # greedy | group_limited_greedy | noaux_tc
    scoring_func: str  # softmax | sigmoid
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
