"""DeepSeek V4's own operations, as plain MLX (the reference every other back-end must match).

- Manifold-constrained hyper-connections (mHC): the residual stream is `hc` copies
  [B, L, hc, D]; `hc_mixes` computes from them the collapse weights `pre` [B, L, hc], the
  expansion weights `post` [B, L, hc] and the mixing matrix `comb` [B, L, hc, hc] (projected
  onto doubly-stochastic matrices by `sinkhorn`); `hc_pre` collapses, `hc_post` expands a
  block's output and mixes the copies, `hc_head` collapses the last layer's copies.
- The compressor's gated softmax pooling over a window of tokens (`compress_pool`).
- The lightning indexer's scores and its top-k (`index_scores`, `select_topk`); V3.2's
  sparse attention (sparse.py) uses the same two.
- Attention with one shared K=V head and per-head sinks (`shared_kv_attention`), and the
  row gather that feeds it the selected compressed rows at decode (`gather_rows`).
- The quantized compressed rows (--kv-bits; types.SplitRows: the non-RoPE channels in MLX's
  affine groups, the RoPE channels at full precision): `shared_kv_attention` reads them
  directly with quantized matmuls (the helpers V2/V3's quantized latent uses, mlx.py),
  `gather_rows` gathers them still quantized, `dense_rows` dequantizes them (prefill).

All mixing weights and softmaxes are computed in float32, as DeepSeek's code does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import mlx.core as mx

from .mlx import dense, latent_mix, latent_scores
from .types import SplitRows

# below this many float32 elements an [L, H, N] index-score block is computed in one piece
INDEX_BLOCK_ELEMENTS = 1 << 25
# the low 32 bits of a selection key: (2^32 - 1) - row, so the earlier row ranks higher
_ROW_FIELD = (1 << 32) - 1


# ---- hyper-connections ---------------------------------------------------------------------


def sinkhorn(comb: mx.array, iters: int, eps: float) -> mx.array:
    """Project positive matrices [..., n, n] towards doubly-stochastic ones: a column
    normalisation, then `iters - 1` row + column rounds (DeepSeek's hc_split_sinkhorn).
    One compiled graph: unfused, its ~6 * iters tiny ops (twice per layer) were most of a
    decode step's dispatches."""
    return _compiled_sinkhorn(int(iters), float(eps))(comb)


@cache
def _compiled_sinkhorn(iters: int, eps: float) -> Callable[[mx.array], mx.array]:
    def rounds(comb: mx.array) -> mx.array:
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
            comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        return comb

    return mx.compile(rounds)


def _flat_rms(x: mx.array, norm_eps: float) -> tuple[mx.array, mx.array]:
    """x [B, L, hc, D] -> (float32 [B, L, hc*D], its 1/rms [B, L, 1])."""
    flat = x.reshape(*x.shape[:-2], -1).astype(mx.float32)
    return flat, mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + norm_eps)


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
    """x [B, L, hc, D]; fn [(2 + hc) * hc, hc * D]; base [(2 + hc) * hc]; scale [3]
    -> (pre [B, L, hc], post [B, L, hc], comb [B, L, hc, hc]), float32."""
    hc = x.shape[-2]
    flat, inv_rms = _flat_rms(x, norm_eps)
    mixes = (flat @ fn.astype(mx.float32).T) * inv_rms  # [B, L, (2 + hc) * hc]
    base = base.astype(mx.float32)
    scale = scale.astype(mx.float32)
    pre = mx.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * mx.sigmoid(mixes[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    logits = mixes[..., 2 * hc :] * scale[2] + base[2 * hc :]
    comb = mx.softmax(logits.reshape(*logits.shape[:-1], hc, hc), axis=-1, precise=True) + eps
    return pre, post, sinkhorn(comb, iters, eps)


def hc_pre(x: mx.array, pre: mx.array) -> mx.array:
    """Collapse the copies: sum_j pre[..., j] * x[..., j, :] -> [B, L, D] in x.dtype."""
    return (pre[..., None] * x.astype(mx.float32)).sum(axis=-2).astype(x.dtype)


def hc_post(y: mx.array, residual: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """Expand a block's output y [B, L, D] into the copies and mix the residual copies
    [B, L, hc, D]: out[k] = post[k] * y + sum_j comb[j, k] * residual[j]."""
    dtype = residual.dtype
    mixed = comb.astype(dtype).swapaxes(-1, -2) @ residual  # [B, L, hc, D]
    return post.astype(dtype)[..., None] * y[..., None, :] + mixed


def hc_head(
    x: mx.array, fn: mx.array, base: mx.array, scale: mx.array, *, eps: float, norm_eps: float
) -> mx.array:
    """The final collapse of the copies [B, L, hc, D] -> [B, L, D]; fn [hc, hc * D]."""
    flat, inv_rms = _flat_rms(x, norm_eps)
    mixes = (flat @ fn.astype(mx.float32).T) * inv_rms
    pre = mx.sigmoid(mixes * scale.astype(mx.float32) + base.astype(mx.float32)) + eps
    return hc_pre(x, pre)


# ---- the compressor ------------------------------------------------------------------------


def compress_pool(kv: mx.array, score: mx.array, overlap: bool) -> mx.array:
    """Gated softmax pooling of whole windows -> one row per window, float32 [B, n, d].

    kv, score: [B, n + overlap, ratio, (1 + overlap) * d], score already holding the position
    bias. Without overlap each window pools its own `ratio` tokens. With overlap a row pools
    2 * ratio slots: the first half (Ca) of the window before it and the second half (Cb) of
    its own; input window 0 is that previous window (zeros / -inf where none exists).
    """
    kv = kv.astype(mx.float32)
    score = score.astype(mx.float32)
    if overlap:
        d = kv.shape[-1] // 2
        kv = mx.concatenate([kv[:, :-1, :, :d], kv[:, 1:, :, d:]], axis=2)
        score = mx.concatenate([score[:, :-1, :, :d], score[:, 1:, :, d:]], axis=2)
    weights = mx.softmax(score, axis=2, precise=True)  # per channel, over the window's slots
    return (kv * weights).sum(axis=2)


# ---- the lightning indexer -----------------------------------------------------------------


def index_scores(q: mx.array, rows: mx.array, weights: mx.array, scale: float) -> mx.array:
    """sum_h relu(q_h . row) * scale * weights_h for every query and row, float32.

    q [B, H, L, d]; rows [B, N, d]; weights [B, L, H] -> [B, L, N]. Long prefills are scored
    in blocks of queries so the [H, L, N] products never all exist at once.
    """
    B, H, L, d = q.shape
    N = rows.shape[1]
    keys = rows.astype(mx.float32).swapaxes(-1, -2)  # [B, d, N]
    w = (weights.astype(mx.float32) * scale).swapaxes(-1, -2)[..., None]  # [B, H, L, 1]
    step = max(1, INDEX_BLOCK_ELEMENTS // max(1, H * N))
    parts = []
    for lo in range(0, L, step):
        ql = q[:, :, lo : lo + step].astype(mx.float32)
        l = ql.shape[2]
        # all heads' queries as rows of one matmul (reads the rows once)
        s = (ql.reshape(B, H * l, d) @ keys).reshape(B, H, l, N)
        parts.append((mx.maximum(s, 0.0) * w[:, :, lo : lo + step]).sum(axis=1))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def selection_keys(scores: mx.array) -> mx.array:
    """int64 keys [..., N] ordered as (score, then the EARLIER row first) for scores [..., N].

    Each float32 score is mapped to an order-preserving int32 (negative floats order the other
    way round as integers: their magnitude bits are flipped; -0.0 counts as 0.0) and combined
    with its row into one int64, so all keys are distinct and any correct top-k algorithm
    (argpartition, a sort, on any device) returns the same set, exact ties included.
    """
    scores = mx.where(scores == 0, mx.array(0.0, mx.float32), scores.astype(mx.float32))
    bits = scores.view(mx.int32)
    ordered = mx.where(bits < 0, mx.bitwise_xor(bits, mx.array(0x7FFFFFFF, mx.int32)), bits)
    rows = mx.arange(scores.shape[-1], dtype=mx.int64)
    return ordered.astype(mx.int64) * (1 << 32) + (_ROW_FIELD - rows)


def select_topk(scores: mx.array, k: int) -> mx.array:
    """Indices [..., k] of the k highest scores [..., N] (masked rows at -inf), in no
    particular order. Exact ties (relu makes many scores exactly 0.0, and equal non-zero
    scores happen too) go to the earlier row (`selection_keys`), so every path that computes
    the same scores (prefill, decode, any back-end) picks the same rows."""
    N = scores.shape[-1]
    if k >= N:
        return mx.broadcast_to(mx.arange(N, dtype=mx.int32), (*scores.shape[:-1], N))
    keys = mx.stop_gradient(selection_keys(scores))  # a choice: no gradient flows through
    return mx.argpartition(keys, kth=N - k, axis=-1)[..., N - k :].astype(mx.int32)


# ---- attention -----------------------------------------------------------------------------


def gather_rows(rows: mx.array | SplitRows, idx: mx.array) -> mx.array | SplitRows:
    """rows [B, N, d] (or quantized: each part gathered, still quantized), idx [B, k] ->
    the selected rows [B, k, d]."""
    at = idx[..., None].astype(mx.int32)
    if isinstance(rows, SplitRows):
        return SplitRows(*(mx.take_along_axis(a, at, axis=1) for a in rows))
    return mx.take_along_axis(rows, at, axis=1)


def dense_rows(rows: mx.array | SplitRows, dim: int) -> mx.array:
    """Rows [B, n, dim] as an array: quantized ones dequantized (in their scales' dtype)."""
    if not isinstance(rows, SplitRows):
        return rows
    body = dense(tuple(rows[:3]), dim - rows.rope.shape[-1])
    return mx.concatenate([body, rows.rope.astype(body.dtype)], axis=-1)


def shared_kv_attention(
    q: mx.array,
    kv: mx.array,
    sinks: mx.array,
    scale: float,
    mask: mx.array | None = None,
    rows: SplitRows | None = None,
) -> mx.array:
    """Multi-query attention where one head [B, S, d] is both K and V, with a learned sink
    logit per head (softmax over the scores and the sink, the sink's share dropped).

    q [B, H, L, d]; sinks [H]; mask bool [B, L, S + n] (True = attend) or None; rows: n more
    K=V rows after kv, quantized (SplitRows), read in place -> [B, H, L, d].
    """
    if rows is not None:
        return _split_attention(q, kv, rows, sinks, scale, mask)
    k = kv[:, None]
    m = None if mask is None else mask[:, None]
    return mx.fast.scaled_dot_product_attention(
        q, k, k, scale=scale, mask=m, sinks=sinks.astype(q.dtype)
    )


def _split_attention(q, kv, rows: SplitRows, sinks, scale, mask) -> mx.array:
    """shared_kv_attention over [kv; rows] with rows quantized: the scores and the weighted
    sum of the quantized channels are quantized matmuls, the RoPE channels and the full
    precision rows plain ones; the softmax (with the sinks) in float32."""
    B, H, L, d = q.shape
    r = rows.rope.shape[-1]
    body, quant = d - r, tuple(rows[:3])
    qf = (q.astype(mx.float32) * scale).reshape(B, H * L, d)
    kf = kv.astype(mx.float32)
    s_kv = qf @ kf.swapaxes(-1, -2)  # [B, H * L, S]
    s_rows = latent_scores(qf[..., :body], quant, body)
    s_rows = s_rows + qf[..., body:] @ rows.rope.astype(mx.float32).swapaxes(-1, -2)
    s = mx.concatenate([s_kv, s_rows.astype(mx.float32)], axis=-1).reshape(B, H, L, -1)
    if mask is not None:
        s = mx.where(mask[:, None], s, -mx.inf)
    sink = sinks.astype(mx.float32).reshape(1, H, 1, 1)
    m = mx.maximum(s.max(axis=-1, keepdims=True), sink)  # finite: the sink is
    e = mx.exp(s - m)
    p = (e / (e.sum(axis=-1, keepdims=True) + mx.exp(sink - m))).reshape(B, H * L, -1)
    S = kv.shape[1]
    p_kv, p_rows = p[..., :S], p[..., S:]
    out_body = latent_mix(p_rows, quant, body).astype(mx.float32)
    out_rope = p_rows @ rows.rope.astype(mx.float32)
    out = p_kv @ kf + mx.concatenate([out_body, out_rope], axis=-1)
    return out.reshape(B, H, L, d).astype(q.dtype)
