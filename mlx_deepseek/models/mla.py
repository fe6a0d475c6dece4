"""Multi-head Latent Attention (MLA) with a latent KV cache.

Only the normalised latent `c_kv` [B, 1, S, kv_lora_rank] and the roped shared key `k_pe`
[B, 1, S, qk_rope_head_dim] are cached (both V2 and V3). `kv_b_proj` is held split per head:
`embed_q` (W_uk, stored [H, rank, nope]) and `unembed_out` (W_uv, stored [H, v, rank]).

- expanded (prefill, many queries): K_nope = c_kv @ W_uk, V = c_kv @ W_uv^T, then attention.
- absorbed (decode, few queries): q' = q_nope @ W_uk^T lives in latent space; scores are
  q'.c_kv + q_pe.k_pe and the output (softmax @ c_kv) @ W_uv^T — no per-head K/V at all.
Both add the rope part of the scores as an additive "mask" to one fused SDPA call. For 1-8
tokens on Metal the absorbed path runs as two custom kernels instead (mla_kernels.py), and the
latent's norm and RoPE as one (norm_kernels.py).
"""

from __future__ import annotations

from functools import partial, reduce
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear

from .. import cpu
from ..kernels.mla import fused_absorbed_attention
from ..kernels.norm import latent_norm_rope
from .config import ModelArgs
from .rope import RoPE

CAUSAL = "causal"  # the mask argument for causal attention (built per call as needed)


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
        self.nope = args.qk_nope_head_dim
        self.rope_dims = args.qk_rope_head_dim
        self.rank = args.kv_lora_rank
        self.scale = args.softmax_scale
        # None: choose per call with use_absorbed(); True/False force a path (tests, benchmarks)
        self.absorb: bool | None = None

        D, qk = args.hidden_size, args.qk_head_dim
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.rank + self.rope_dims, bias=args.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=1e-6)
        self.embed_q = MultiLinear(self.nope, self.rank, H)  # W_uk^T: [H, rank, nope]
        self.unembed_out = MultiLinear(self.rank, args.v_head_dim, H)  # W_uv: [H, v, rank]
        self.o_proj = nn.Linear(H * args.v_head_dim, D, bias=args.attention_bias)
        self.rope = RoPE(args)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        """x [B, L, D] -> [B, L, D]. mask: None (no mask), CAUSAL, or a boolean array
        [L, S] (True = attend)."""
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q_a = None if self.q_lora_rank is None else self.q_a_proj(x)
        c_kv, k_pe, q_a = self._latent(self.kv_a_proj_with_mqa(x), offset, q_a)  # [B, 1, L, *]
        q = self.q_proj(x) if q_a is None else self.q_b_proj(q_a)  # [B, L, H * qk]
        if cache is not None:
            c_kv, k_pe = cache.update_and_fetch(c_kv, k_pe)  # [B, 1, S, *]
        # the kernels imply the causal mask (a single query sees every key)
        fusable = (mask is None and L == 1) or (isinstance(mask, str) and mask == CAUSAL)
        if isinstance(mask, str):
            if mask != CAUSAL:
                raise ValueError(f"mask {mask!r}: give None, {CAUSAL!r} or a boolean array")
            mask = causal_mask(L, offset)

        H = self.num_heads
        q_nope, q_pe = mx.split(q.reshape(B, L, H, -1).transpose(0, 2, 1, 3), [self.nope], -1)
        absorb = self.absorb if self.absorb is not None else use_absorbed(self.args, L)
        if absorb:
            # on the CPU, shared out across its streams
            out = self._absorbed_split(q_nope, q_pe, c_kv, k_pe, mask, offset)
            if out is None:
                q_lat = self.embed_q(q_nope)  # [B, H, L, rank]

                def reference() -> mx.array:
                    return self._absorbed(q_pe, q_lat, c_kv, k_pe, mask, offset)

                if fusable:
                    out = fused_absorbed_attention(self, q, q_lat, c_kv, k_pe, offset, reference)
                if out is None:
                    out = reference()
        else:
            out = self._expanded(q_nope, q_pe, c_kv, k_pe, mask, offset)
        return self.o_proj(out)

    def _latent(self, kv: mx.array, offset: int, q_a: mx.array | None) -> tuple:
        """kv_a_proj_with_mqa's output [B, L, rank + rope] -> the normed c_kv [B, 1, L, rank]
        and the roped k_pe [B, 1, L, rope] that the cache holds, and q_a_layernorm(q_a)
        (None without q LoRA): one kernel where it applies."""
        q_norm = self.get("q_a_layernorm")
        fused = latent_norm_rope(kv, self.kv_a_layernorm, self.rope, self.rank, offset, q_a, q_norm)
        if fused is not None:
            return fused if q_a is not None else (*fused, None)
        c_kv, k_pe = mx.split(kv, [self.rank], axis=-1)
        c_kv = mx.expand_dims(self.kv_a_layernorm(c_kv), 1)
        k_pe = self.rope(mx.expand_dims(k_pe, 1), offset)
        return c_kv, k_pe, None if q_a is None else q_norm(q_a)

    def _pe_scores(self, q_pe, k_pe, mask, offset: int) -> mx.array:
        """The rope part of the scores, pre-scaled and masked, as SDPA's additive mask:
        [B, H, L, S]. All heads share the one latent head: fold them into the query axis
        ([B, 1, H*L, .]) so each product reads the cache once, not once per head."""
        B, H, L, _ = q_pe.shape
        S = k_pe.shape[2]
        q_pe = self.rope(q_pe, offset)
        q_pe = (q_pe * self.scale).reshape(B, 1, H * L, -1)
        pe_scores = (q_pe @ k_pe.swapaxes(-1, -2)).reshape(B, H, L, S)
        if mask is not None:
            pe_scores = mx.where(
                mask, pe_scores, mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype)
            )
        return pe_scores

    def _absorbed(self, q_pe, q_lat, c_kv, k_pe, mask, offset: int) -> mx.array:
        """Attention in latent space -> [B, L, H * v] (MLX's path)."""
        B, H, L, _ = q_lat.shape
        S = k_pe.shape[2]
        pe_scores = self._pe_scores(q_pe, k_pe, mask, offset)
        out = mx.fast.scaled_dot_product_attention(
            q_lat.reshape(B, 1, H * L, -1),
            c_kv,
            c_kv,
            scale=self.scale,
            mask=pe_scores.reshape(B, 1, H * L, S),
        )
        out = self.unembed_out(out.reshape(B, H, L, -1))  # [B, H, L, v]
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)

    def _absorbed_split(self, q_nope, q_pe, c_kv, k_pe, mask, offset: int) -> mx.array | None:
        """The absorbed path shared out across the CPU streams, or None when it should not
        split: W_uk and W_uv by heads, the attention itself by cached positions (each part
        reads 1/n of the cache for all heads; the parts merge by their softmax maxima and
        sums, as flash-decoding does)."""
        streams = cpu.workers()
        reads = c_kv.nbytes + k_pe.nbytes + self.embed_q["weight"].nbytes
        reads += self.unembed_out["weight"].nbytes
        n = min(len(streams), reads // cpu.MIN_PART_BYTES)
        if n < 2:
            return None
        B, H, L, _ = q_nope.shape
        S = c_kv.shape[2]
        heads = cpu.ranges(H, n)

        def by_heads(layer: nn.Module, x: mx.array) -> mx.array:
            parts = [partial(head_slice, layer, x[:, lo:hi], lo, hi) for lo, hi in heads]
            return mx.concatenate(cpu.parallel(parts, streams), axis=1)

        q_lat = by_heads(self.embed_q, q_nope) * self.scale  # [B, H, L, rank]
        q_lat = q_lat.reshape(B, 1, H * L, -1)

        def part(lo: int, hi: int) -> tuple[mx.array, mx.array, mx.array]:
            c = c_kv[:, :, lo:hi]
            part_mask = None if mask is None else mask[:, lo:hi]
            s = self._pe_scores(q_pe, k_pe[:, :, lo:hi], part_mask, offset)  # [B, H, L, hi-lo]
            s = q_lat @ c.swapaxes(-1, -2) + s.reshape(B, 1, H * L, -1)
            m = s.max(axis=-1, keepdims=True)  # finite: masked scores are finfo.min, not -inf
            p = exp_nonpositive(s - m)
            return m, p.sum(axis=-1, keepdims=True), p @ c

        positions = cpu.ranges(S, n)
        parts = cpu.parallel([partial(part, lo, hi) for lo, hi in positions], streams)
        m = reduce(mx.maximum, [pm for pm, _, _ in parts])
        weights = [mx.exp(pm - m) for pm, _, _ in parts]  # ~0 for a part wholly masked
        total = reduce(mx.add, [w * pl for w, (_, pl, _) in zip(weights, parts, strict=True)])
        out = reduce(mx.add, [w * po for w, (_, _, po) in zip(weights, parts, strict=True)])
        out = (out / total).astype(q_lat.dtype).reshape(B, H, L, -1)
        out = by_heads(self.unembed_out, out)  # [B, H, L, v]
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask, offset: int) -> mx.array:
        """Per-head K and V expanded from the latent -> [B, L, H * v] (prefill). On the CPU a
        share of the heads runs on each of its streams."""
        B, H, L, _ = q_nope.shape
        pe_scores = self._pe_scores(q_pe, k_pe, mask, offset)

        def heads(lo: int, hi: int) -> mx.array:
            k_nope = head_slice(self.embed_q, c_kv, lo, hi, transpose=False)  # [B, h, S, nope]
            v = head_slice(self.unembed_out, c_kv, lo, hi)  # [B, h, S, v]
            return mx.fast.scaled_dot_product_attention(
                q_nope[:, lo:hi], k_nope, v, scale=self.scale, mask=pe_scores[:, lo:hi]
            )

        streams = cpu.workers()
        n = min(len(streams), H)
        if n < 2:
            out = heads(0, H)
        else:
            parts = [partial(heads, lo, hi) for lo, hi in cpu.ranges(H, n)]
            out = mx.concatenate(cpu.parallel(parts, streams), axis=1)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


def head_slice(layer: nn.Module, x: mx.array, lo: int, hi: int, transpose: bool = True) -> mx.array:
    """Heads [lo, hi) of a (quantized) mlx-lm MultiLinear [H, out, in] applied to x
    (dequantized for a long prefill on the CPU)."""
    return cpu.layer_matmul(layer, x, slice(lo, hi), transpose)


@mx.compile
def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 (softmax numerators) in float32, ~4x faster than mx.exp on the CPU
    (MLX's CPU exp is scalar; this compiles to one vectorisable loop). x = k ln2 + y with
    integer k and |y| <= ln2/2 (Cody-Waite: ln2 in two parts, so y is exact to float32),
    e^y by its Taylor series to degree 8, 2^k from the float's exponent bits: a few ulp down
    to exp(-87) = 1.6e-38, where it stops (below, a float32 loses digits; such numerators
    vanish next to the maximum's 1 anyway)."""
    x = mx.maximum(x.astype(mx.float32), -87.0)
    k = mx.round(x * 1.4426950408889634)
    y = (x - k * 0.693145751953125) - k * 1.4286068203094173e-06
    p = 1.0 / 40320
    for c in (1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * y + c
    two_k = ((k.astype(mx.int32) + 127) << 23).view(mx.float32)
    return p * two_k


def causal_mask(L: int, offset: int) -> mx.array | None:
    """Boolean [L, offset + L] mask (True = attend), or None for a single query."""
    if L == 1:
        return None
    rows = mx.arange(offset, offset + L)[:, None]
    cols = mx.arange(offset + L)[None]
    return cols <= rows
