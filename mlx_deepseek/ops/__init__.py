"""The named operations the model files use: one signature each, one implementation per
back-end, the back-end chosen once.

Back-ends (a module each, with every op below):
- "mlx" (mlx.py): MLX's own operations, the reference the others are checked against;
- "cpu" (cpu.py): MLX's CPU back-end with this project's strategies: decode split across
  CPU streams, prefill through dequantized BLAS matmuls;
- "metal" (metal.py): a Mac's GPU with the fused Metal kernels (mlx_deepseek/kernels/)
  where they apply, each kernel variant checked against "mlx" on first use.
`backend.resolve()` picks one for the default device (mlx_deepseek.load calls it);
`use(name)` switches for a block (tests, benchmarks); MLX_DEEPSEEK_BACKEND forces one.

Every op returns its result: choosing a path is the back-end's business, never the model's.

DeepSeek V4's own ops (hc_mixes, hc_pre, hc_post, hc_head, sinkhorn, compress_pool,
index_scores, select_topk, gather_rows, dense_rows, shared_kv_attention) have their MLX reference in
v4.py; a back-end module overrides one by defining a function of the same name.

sparse.py holds DeepSeek V3.2's own operations (the lightning indexer's scores and top-k,
attention over the selected latent rows) as plain MLX functions the V3.2 model calls.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..offload.experts import StreamedExperts
from . import v4
from .backend import active, current, resolve, use
from .types import CAUSAL, LatentEntry, MLAHeads, Routing, SplitRows

__all__ = [
    "CAUSAL",
    "MLAHeads",
    "Routing",
    "SplitRows",
    "absorbed_attention",
    "active",
    "add_rms_norm",
    "compress_pool",
    "current",
    "dense_rows",
    "embed",
    "expanded_attention",
    "gather_rows",
    "hc_head",
    "hc_mixes",
    "hc_post",
    "hc_pre",
    "index_scores",
    "latent",
    "mlp",
    "moe",
    "prepare",
    "resolve",
    "route",
    "select_topk",
    "shared_kv_attention",
    "sinkhorn",
    "use",
]


def add_rms_norm(
    x: mx.array, r: mx.array | None, norm: nn.Module, float32_copy: bool = False
) -> tuple[mx.array, ...]:
    """(h, norm(h)) with h = x + r (r None: h = x); with float32_copy also norm(h) in
    float32 (a float32 router's input)."""
    return active().add_rms_norm(x, r, norm, float32_copy)


def embed(
    embedding: nn.Module, tokens: mx.array, norm: nn.Module | None = None
) -> tuple[mx.array, mx.array | None]:
    """(embedding(tokens) [..., D], norm of it or None without a norm)."""
    return active().embed(embedding, tokens, norm)


def latent(
    kv: mx.array,
    norm: nn.Module,
    rope,
    offset: int | mx.array,
    q_a: mx.array | None = None,
    q_norm: nn.Module | None = None,
) -> tuple[mx.array, mx.array, mx.array | None]:
    """MLA's latent: kv_a_proj_with_mqa's output [B, L, rank + rope] -> the normed c_kv
    [B, 1, L, rank] and k_pe [B, 1, L, rope] roped at positions offset + l (what the cache
    holds), and q_norm(q_a) (None without q LoRA)."""
    return active().latent(kv, norm, rope, offset, q_a, q_norm)


def absorbed_attention(
    q: mx.array, c_kv: LatentEntry, k_pe: LatentEntry, mla: MLAHeads, mask, offset: int | mx.array
) -> mx.array:
    """MLA attention in latent space (decode, few queries) -> o_proj's input [B, L, H * v].

    q: the query projection [B, L, H * (nope + rope)], q_pe not yet roped; c_kv [B, 1, S,
    rank], k_pe [B, 1, S, rope]: the cache after the update, each an array or (a quantized
    cache) MLX's affine triple (packed, scales, biases) along the last axis; mask: None,
    CAUSAL or a boolean array broadcasting to [B, H, L, S]; offset: position of the first
    query (an array [B] for mlx-lm's batch caches)."""
    return active().absorbed_attention(q, c_kv, k_pe, mla, mask, offset)


def expanded_attention(
    q: mx.array, c_kv: LatentEntry, k_pe: LatentEntry, mla: MLAHeads, mask, offset: int | mx.array
) -> mx.array:
    """MLA attention with per-head K and V expanded from the latent (prefill); the same
    arguments and result as absorbed_attention."""
    return active().expanded_attention(q, c_kv, k_pe, mla, mask, offset)


def route(logits: mx.array, bias: mx.array | None, routing: Routing) -> tuple[mx.array, mx.array]:
    """Router logits [..., E] float32 -> (expert indices [..., k], weights [..., k] float32)."""
    return active().route(logits, bias, routing)


def mlp(x: mx.array, layer: nn.Module) -> mx.array:
    """A SwiGLU MLP (gate_proj, up_proj, down_proj): down(silu(gate(x)) * up(x))."""
    return active().mlp(x, layer)


def moe(
    x: mx.array,
    inds: mx.array,
    weights: mx.array,
    experts: nn.Module,
    shared: nn.Module | None,
    swiglu_limit: float = 0.0,
) -> mx.array:
    """A MoE layer's experts: sum_j weights[..., j] * expert_{inds[..., j]}(x) + shared(x).

    experts: mlx-lm's SwitchGLU with stacked [E, out, in] weights (its own activation the
    plain SwiGLU), or the experts streamed from the checkpoint (offload.StreamedExperts: it
    makes the chosen experts resident in its bank of slots and runs the back-end's moe there);
    shared: the shared experts' MLP (gate_proj, up_proj, down_proj) or None; weights already
    carry the routed scaling factor; swiglu_limit > 0: every expert's SwiGLU, the shared one's
    too, is silu(min(gate, limit)) * clip(up, -limit, limit) (DeepSeek V4)."""
    if isinstance(experts, StreamedExperts):
        return experts.moe(x, inds, weights, shared, swiglu_limit, active().moe)
    return active().moe(x, inds, weights, experts, shared, swiglu_limit)


def prepare(model: nn.Module) -> int:
    """The back-end's one-time changes to a loaded model (the CPU's row-split layers)."""
    return active().prepare(model)


# ---- DeepSeek V4 (reference: v4.py) -----------------------------------------------------------


def _v4(name: str):
    """The active back-end's implementation of V4 op `name`, else MLX's (v4.py)."""
    return getattr(active(), name, None) or getattr(v4, name)


def sinkhorn(comb: mx.array, iters: int, eps: float) -> mx.array:
    """Positive matrices [..., n, n] projected towards doubly-stochastic ones."""
    return _v4("sinkhorn")(comb, iters, eps)


def hc_mixes(
    x: mx.array,
    fn: mx.array,
    base: mx.array,
    scale: mx.array,
    *,
    iters: int,
    eps: float,
    norm_eps: float,
) -> tuple[mx.array, mx.array, mx.array]:
    """The hyper-connection weights of the copies x [B, L, hc, D]: (pre [B, L, hc], post
    [B, L, hc], comb [B, L, hc, hc]), float32."""
    return _v4("hc_mixes")(x, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps)


def hc_pre(x: mx.array, pre: mx.array) -> mx.array:
    """The copies [B, L, hc, D] collapsed with weights pre [B, L, hc] -> [B, L, D]."""
    return _v4("hc_pre")(x, pre)


def hc_post(y: mx.array, residual: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """A block's output [B, L, D] expanded into the copies, plus the copies mixed by comb."""
    return _v4("hc_post")(y, residual, post, comb)


def hc_head(
    x: mx.array, fn: mx.array, base: mx.array, scale: mx.array, *, eps: float, norm_eps: float
) -> mx.array:
    """The last layer's copies [B, L, hc, D] collapsed for the head -> [B, L, D]."""
    return _v4("hc_head")(x, fn, base, scale, eps=eps, norm_eps=norm_eps)


def compress_pool(kv: mx.array, score: mx.array, overlap: bool) -> mx.array:
    """Gated softmax pooling of whole windows [B, n + overlap, ratio, (1 + overlap) * d]
    -> one row per window [B, n, d], float32."""
    return _v4("compress_pool")(kv, score, overlap)


def index_scores(q: mx.array, rows: mx.array, weights: mx.array, scale: float) -> mx.array:
    """The lightning indexer's scores [B, L, N] of queries q [B, H, L, d] for rows [B, N, d]."""
    return _v4("index_scores")(q, rows, weights, scale)


def select_topk(scores: mx.array, k: int) -> mx.array:
    """Indices [..., k] of the k best scores, ties to the earlier row."""
    return _v4("select_topk")(scores, k)


def gather_rows(rows: mx.array | SplitRows, idx: mx.array) -> mx.array | SplitRows:
    """rows [B, N, d] at idx [B, k] -> [B, k, d] (quantized rows stay quantized)."""
    return _v4("gather_rows")(rows, idx)


def dense_rows(rows: mx.array | SplitRows, dim: int) -> mx.array:
    """V4's rows [B, n, dim] as an array (quantized ones dequantized)."""
    return _v4("dense_rows")(rows, dim)


def shared_kv_attention(
    q: mx.array,
    kv: mx.array,
    sinks: mx.array,
    scale: float,
    mask: mx.array | None = None,
    rows: SplitRows | None = None,
) -> mx.array:
    """Attention of q [B, H, L, d] over one K=V head [B, S, d] (then `rows`, n quantized
    K=V rows read in place, when given) with per-head sinks [H]; mask [B, L, S + n]."""
    return _v4("shared_kv_attention")(q, kv, sinks, scale, mask, rows)
