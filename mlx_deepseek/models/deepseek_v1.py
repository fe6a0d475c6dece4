"""DeepSeekMoE 16B (model_type `deepseek`): multi-head attention with DeepSeekMoE.

The first DeepSeek MoE: plain multi-head attention (no MLA: per-head K and V cached,
`num_key_value_heads` of head_dim = hidden_size / num_attention_heads), half-split RoPE over
the whole head, and V2's DeepSeekMoE (softmax greedy top-6 of 64 routed experts + 2 shared,
first layer dense) from moe.py. Parameter names are the checkpoint's (and mlx-lm's
deepseek.py), so its checkpoints and mlx-lm's load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from . import config, deepseek_v3


@dataclass
class ModelArgs(config.ModelArgs):
    """DeepSeekMoE's fields (Hugging Face names); MLA's fields are unused."""

    model_type: str = "deepseek"
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    first_k_dense_replace: int = 1
    q_lora_rank: int | None = None
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    n_group: int | None = None
    topk_group: int | None = None

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("deepseek",)
    REQUIRED: ClassVar[tuple[str, ...]] = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
    )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def kv_values_per_layer(self) -> int:
        """Per-head keys and values."""
        return 2 * self.kv_heads * self.head_dim

    def validate_attention(self, source: str) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise self.field_error(source, name, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ConfigError(
                f"{source}: hidden_size={self.hidden_size} must be num_attention_heads="
                f"{self.num_attention_heads} times an even head size"
            )
        kv = self.kv_heads
        if not isinstance(kv, int) or kv <= 0 or self.num_attention_heads % kv:
            raise self.field_error(
                source,
                "num_key_value_heads",
                f"must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.rope_type not in ("default", "linear"):
            raise ConfigError(
                f"{source}: rope_scaling type {self.rope_type!r} is not supported by "
                "DeepSeekMoE (default or linear)"
            )
        if self.rope_type == "linear" and not self.rope_scaling.get("factor"):
            raise ConfigError(f"{source}: rope_scaling is missing 'factor' (needed by linear)")


class Attention(nn.Module):
    """Multi-head attention (grouped when num_key_value_heads < heads) with a K/V cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.kv_heads
        hd = args.head_dim
        D, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(D, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=bias)
        self.scale = hd**-0.5
        linear = args.rope_type == "linear"
        self.rope = nn.RoPE(
            hd,
            traditional=False,
            base=args.rope_theta,
            scale=1.0 / float(args.rope_scaling["factor"]) if linear else 1.0,
        )

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        """x [B, L, D] -> [B, L, D]; mask: None, "causal" or a boolean [L, S] array."""
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, kv_heads, S, head_dim]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Model(deepseek_v3.Model):
    attention_class = Attention
