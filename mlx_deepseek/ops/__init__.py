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

from collections.abc import Callable
from functools import wraps
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn

from ..offload.experts import StreamedExperts
from . import v4
from .backend import active, current, resolve, use
from .types import CAUSAL, LatentEntry, MLAHeads, Routing, SplitRows

Op = TypeVar("Op", bound=Callable)

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


# ---- DeepSeek V4: each op has its MLX reference's signature and documentation (v4.py) --------


def _v4_op(reference: Op) -> Op:
    """ops.<name> for V4 op `reference` (v4.<name>): the active back-end's function of that
    name where it defines one, else the reference."""
    name = reference.__name__

    @wraps(reference)
    def op(*args, **kwargs):
        return (getattr(active(), name, None) or reference)(*args, **kwargs)

    return op


sinkhorn = _v4_op(v4.sinkhorn)
hc_mixes = _v4_op(v4.hc_mixes)
hc_pre = _v4_op(v4.hc_pre)
hc_post = _v4_op(v4.hc_post)
hc_head = _v4_op(v4.hc_head)
compress_pool = _v4_op(v4.compress_pool)
index_scores = _v4_op(v4.index_scores)
select_topk = _v4_op(v4.select_topk)
gather_rows = _v4_op(v4.gather_rows)
dense_rows = _v4_op(v4.dense_rows)
shared_kv_attention = _v4_op(v4.shared_kv_attention)
