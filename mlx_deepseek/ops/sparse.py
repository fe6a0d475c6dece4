"""DeepSeek Sparse Attention (V3.2's lightning indexer), on the named ops the V4 indexer
shares (ops.index_scores, ops.select_topk) plus plain MLX for the gathered attention.

Per query, the indexer scores every visible key position (DeepSeek's inference/model.py,
V3.2-Exp, with the half-split RoPE fix):

    score[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])        (w carries both scales)

and the query attends, with MLA in its absorbed (latent) form, only to the `topk` best
positions: the cost of attention is O(topk) per query whatever the context. Queries are
processed in chunks so that no [queries, heads, keys] block exceeds BLOCK_ELEMENTS: a long
prefill never holds a T x T matrix.

Ties. relu makes a score exactly 0.0 whenever every indexer head has q.k <= 0, and exact
ties at the top-k boundary are then common (with few heads). The selection here is a
function of the scores alone: among equal scores the LOWER position wins
(ops.v4.selection_keys: each score mapped to an order-preserving integer and combined with
the position into one int64 key, so every key is distinct and any correct top-k algorithm,
CPU or GPU, argpartition or a sort, returns the same set; -0.0 counts as 0.0). Prefill,
chunked prefill and decode select with that one function on every back-end.
"""

from __future__ import annotations

import mlx.core as mx

from . import index_scores as _index_scores
from . import select_topk as _select_topk

# the largest [queries, heads, keys] (or [queries, topk, latent]) block built at once
BLOCK_ELEMENTS = 1 << 24


def causal(L: int, S: int, offset: int) -> mx.array:
    """Which of S key positions each of L queries at offset .. offset + L - 1 sees: [1, L, S]."""
    return (mx.arange(S)[None] <= mx.arange(offset, offset + L)[:, None])[None]


def visible_positions(mask, L: int, S: int, offset: int | mx.array) -> mx.array | None:
    """An attention mask argument (None: every position; "causal"; or a boolean array
    broadcasting to [B, H, L, S], one for all heads) as [B or 1, L, S], or None."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal" or not isinstance(offset, int):
            raise ValueError(f"mask {mask!r}: give None, 'causal' (int offset) or an array")
        return causal(L, S, offset)
    return mask.reshape(-1, *mask.shape[-2:]) if mask.ndim < 4 else mask[:, 0]


def select_topk(
    scores: mx.array, topk: int, visible: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """The `topk` best visible key positions for each query (ops.select_topk's rule: ties to
    the lower position).

    scores: [B, L, S]; visible: boolean, broadcasting to [B, L, S] (None: all). Returns
    (positions [B, L, K] int32, valid [B, L, K] bool) with K = min(topk, S); a position is
    invalid when the query may not see it (a causal query at position p < K - 1 sees only
    p + 1 keys).
    """
    if visible is not None:
        scores = mx.where(visible, scores, mx.array(-mx.inf, mx.float32))
    idx = _select_topk(scores, min(topk, scores.shape[-1]))
    if visible is None:
        return idx, mx.ones(idx.shape, dtype=mx.bool_)
    return idx, mx.take_along_axis(mx.broadcast_to(visible, scores.shape), idx, axis=-1)


def gather_attention(
    q_lat: mx.array,
    q_pe: mx.array,
    c_kv: mx.array,
    k_pe: mx.array,
    idx: mx.array,
    valid: mx.array,
    scale: float,
) -> mx.array:
    """MLA's absorbed attention over the selected latent rows only.

    q_lat: [B, H, L, rank] (q_nope @ W_uk); q_pe: [B, H, L, rope] (roped); c_kv: [B, S, rank];
    k_pe: [B, S, rope]; idx / valid: [B, L, K]. Returns the attention-weighted latent
    [B, H, L, rank] (W_uv is applied by the caller). Reads K rows per query, not S.
    """
    B, H, L, R = q_lat.shape
    K = idx.shape[-1]
    rows = idx.reshape(B, L * K, 1)  # gathered along the positions of each batch row

    def gather(a: mx.array) -> mx.array:  # [B, S, d] -> [B*L, 1, K, d]
        picked = mx.take_along_axis(a, mx.broadcast_to(rows, (B, L * K, a.shape[-1])), axis=1)
        return picked.reshape(B * L, 1, K, -1)

    c, kp = gather(c_kv), gather(k_pe)
    # one query position per batch row; its H heads share the one latent head
    q = q_lat.transpose(0, 2, 1, 3).reshape(B * L, 1, H, R)
    qp = (q_pe * scale).transpose(0, 2, 1, 3).reshape(B * L, 1, H, -1)
    pe = qp @ kp.swapaxes(-1, -2)  # [B*L, 1, H, K], the rope part of the scores
    low = mx.array(mx.finfo(pe.dtype).min, pe.dtype)
    pe = mx.where(valid.reshape(B * L, 1, 1, K), pe, low)
    out = mx.fast.scaled_dot_product_attention(q, c, c, scale=scale, mask=pe)
    return out.reshape(B, L, H, R).transpose(0, 2, 1, 3)


def query_chunk(num_queries: int, keys: int, index_heads: int, heads: int, topk: int, rank: int):
    """Queries per chunk so that no intermediate block exceeds BLOCK_ELEMENTS."""
    per_query = max(index_heads * keys, min(topk, keys) * max(rank, heads))
    return max(1, min(num_queries, BLOCK_ELEMENTS // max(per_query, 1)))


def sparse_attention(
    q_index: mx.array,
    k_index: mx.array,
    weights: mx.array,
    q_lat: mx.array,
    q_pe: mx.array,
    c_kv: mx.array,
    k_pe: mx.array,
    *,
    visible: mx.array | None,
    topk: int,
    scale: float,
    chunk: int | None = None,
) -> mx.array:
    """DeepSeek Sparse Attention for L queries over S cached positions.

    q_index: [B, L, Hi, Di], k_index: [B, S, Di], weights: [B, L, Hi] (the indexer);
    q_lat, q_pe, c_kv, k_pe: MLA's absorbed operands (gather_attention); visible: which
    positions each query may see, [B or 1, L, S] (visible_positions). Queries go in chunks
    of `chunk` (default: query_chunk) -> the attention-weighted latent [B, H, L, rank].
    """
    B, H, L, R = q_lat.shape
    S = c_kv.shape[1]
    if chunk is None:
        chunk = query_chunk(L, S, q_index.shape[2], H, topk, R)
    outs = []
    for lo in range(0, L, chunk):
        hi = min(L, lo + chunk)
        # ops.index_scores takes queries as [B, H, L, D]; the weights carry both scales
        q = q_index[:, lo:hi].transpose(0, 2, 1, 3)
        scores = _index_scores(q, k_index, weights[:, lo:hi], 1.0)
        idx, valid = select_topk(scores, topk, None if visible is None else visible[:, lo:hi])
        outs.append(
            gather_attention(q_lat[:, :, lo:hi], q_pe[:, :, lo:hi], c_kv, k_pe, idx, valid, scale)
        )
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
