"""Multi-head Latent Attention (MLA) with a latent KV cache.

Only the normalised latent `c_kv` [B, 1, S, kv_lora_rank] and the roped shared key `k_pe`
[B, 1, S, qk_rope_head_dim] are cached (both V2 and V3). `kv_b_proj` is held split per head:
`embed_q` (W_uk, stored [H, rank, nope]) and `unembed_out` (W_uv, stored [H, v, rank]).

- expanded (prefill, many queries): K_nope = c_kv @ W_uk, V = c_kv @ W_uv^T, then attention.
- absorbed (decode, few queries): q' = q_nope @ W_uk^T lives in latent space; scores are
  q'.c_kv + q_pe.k_pe and the output (softmax @ c_kv) @ W_uv^T — no per-head K/V at all.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear

from .. import ops
from .config import ModelArgs
from .rope import RoPE


# The absorbed path costs ~2*(rank+rope) per query per cached token and head, the expanded
# path ~(nope+v)*rank per cached token and head to expand K/V: absorb while L is below the
# ratio of the two (about 113 queries for DeepSeek's 512/64/128/128 shapes).
def use_absorbed(args: ModelArgs, num_queries: int) -> bool:
    expand_cost = (args.qk_nope_head_dim + args.v_head_dim) * args.kv_lora_rank
    absorb_cost = 2 * (args.kv_lora_rank + args.qk_rope_head_dim)
    return num_queries * absorb_cost < expand_cost


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.num_heads = H = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.rank = args.kv_lora_rank
        # None: choose per call with use_absorbed(); True/False force a path (tests, benchmarks)
        self.absorb: bool | None = None

        D, qk = args.hidden_size, args.qk_head_dim
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * qk, bias=False)
        rope = args.qk_rope_head_dim
        self.kv_a_proj_with_mqa = nn.Linear(D, self.rank + rope, bias=args.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=1e-6)
        self.embed_q = MultiLinear(args.qk_nope_head_dim, self.rank, H)  # W_uk^T: [H, rank, nope]
        self.unembed_out = MultiLinear(self.rank, args.v_head_dim, H)  # W_uv: [H, v, rank]
        self.o_proj = nn.Linear(H * args.v_head_dim, D, bias=args.attention_bias)
        self.rope = RoPE(args)

    def heads(self) -> ops.MLAHeads:
        a = self.args
        return ops.MLAHeads(
            self.embed_q,
            self.unembed_out,
            self.rope,
            self.num_heads,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            self.rank,
            a.v_head_dim,
            a.softmax_scale,
        )

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        """x [B, L, D] -> [B, L, D]. mask: None, ops.CAUSAL, or a boolean array broadcasting
        to [B, H, L, S] (True = attend; mlx-lm's batch caches make one)."""
        L = x.shape[1]
        offset = cache.offset if cache is not None else 0
        q_a = None if self.q_lora_rank is None else self.q_a_proj(x)
        c_kv, k_pe, q_a = ops.latent(
            self.kv_a_proj_with_mqa(x), self.kv_a_layernorm, self.rope, offset, q_a,
            self.get("q_a_layernorm"),
        )  # fmt: skip
        q = self.q_proj(x) if q_a is None else self.q_b_proj(q_a)  # [B, L, H * qk]
        if cache is not None:
            c_kv, k_pe = cache.update_and_fetch(c_kv, k_pe)  # [B, 1, S, *]
        absorb = self.absorb if self.absorb is not None else use_absorbed(self.args, L)
        attention = ops.absorbed_attention if absorb else ops.expanded_attention
        return self.o_proj(attention(q, c_kv, k_pe, self.heads(), mask, offset))
