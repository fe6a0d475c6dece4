"""The small value types the ops take (shared by the model files and every back-end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.nn as nn

CAUSAL = "causal"  # the mask argument for causal attention (built per call as needed)


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
