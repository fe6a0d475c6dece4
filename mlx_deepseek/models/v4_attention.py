"""DeepSeek V4 attention: one shared K=V head, a sliding window, and per layer kind the
compressed rows (heavily compressed: all of them; compressed sparse: the indexer's top-k).

Shapes: x [B, L, D]; q [B, H, L, hd]; the window / compressed rows [B, S, hd], used as both
keys and values. RoPE rotates the LAST qk_rope_head_dim channels (interleaved pairs); the
sliding-only layers use rope_theta without YaRN, the compressed ones compress_rope_theta with
YaRN (cos/sin unscaled), for q, k, the compressed rows and the indexer alike. A compressed
row w pools tokens [w * ratio, (w + 1) * ratio) (and the window before, for ratio-4 overlap),
is roped at position w * ratio, and is visible to position p iff w < (p + 1) // ratio.

Decode reads the window and, in a compressed sparse layer, only the top-k compressed rows
the indexer picks (gathered); prefill chunks attend over the window and all compressed rows
under a mask holding the per-query top-k (the same rows, without gathering [L, k, hd]).
With kv_bits the compressed rows are quantized (ops.SplitRows): decode reads them in place,
a prefill chunk dequantizes them once for the fused attention.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from .rope import rope_inv_freq
from .v4_cache import RowBuffer, V4LayerCache
from .v4_config import CSA, SLIDING, ModelArgs


class TailRoPE:
    """Interleaved RoPE on the last `dims` channels of x [..., L, d] at positions
    (offset + i) * scale; inverse=True rotates back."""

    def __init__(self, dims: int, inv_freq: mx.array):
        self.dims = dims
        self.freqs = 1.0 / inv_freq  # mx.fast.rope takes the reciprocal frequencies

    def __call__(
        self, x: mx.array, offset: int, scale: float = 1.0, inverse: bool = False
    ) -> mx.array:
        rd = self.dims
        pe = mx.fast.rope(
            x[..., -rd:],
            rd,
            traditional=True,
            base=None,
            scale=-scale if inverse else scale,
            offset=offset,
            freqs=self.freqs,
        )
        if rd == x.shape[-1]:
            return pe
        return mx.concatenate([x[..., :-rd], pe.astype(x.dtype)], axis=-1)


def layer_rope(args: ModelArgs, index: int) -> TailRoPE:
    if args.layer_type(index) == SLIDING:
        inv_freq = rope_inv_freq(args.qk_rope_head_dim, args.rope_theta)
    else:
        inv_freq = rope_inv_freq(args.qk_rope_head_dim, args.compress_rope_theta, args.rope_scaling)
    return TailRoPE(args.qk_rope_head_dim, inv_freq)


class Compressor(nn.Module):
    """Gated softmax pooling of every `ratio` tokens into one RMS-normed, roped row of
    `head_dim`. With overlap each token projects two series (2 * head_dim): Ca feeds the
    next window's row, Cb its own."""

    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, overlap: bool):
        super().__init__()
        width = (1 + overlap) * head_dim
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        self.wkv = nn.Linear(args.hidden_size, width, bias=False)
        self.wgate = nn.Linear(args.hidden_size, width, bias=False)
        self.ape = mx.zeros((ratio, width), dtype=mx.float32)  # the position bias
        self.norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)

    def __call__(
        self, x: mx.array, state: RowBuffer, offset: int, rope: TailRoPE
    ) -> mx.array | None:
        """Project x [B, L, D] (positions offset...) into `state`; the rows of the windows
        that closed, [B, n, head_dim], or None."""
        B, L, _ = x.shape
        r = self.ratio
        slots = (offset + mx.arange(L)) % r
        score = self.wgate(x).astype(mx.float32) + self.ape[slots]
        state.append(mx.concatenate([self.wkv(x).astype(mx.float32), score], axis=-1))
        first, last = offset // r, (offset + L) // r  # rows [first, last) close now
        if last == first:
            return None
        lo = (first - int(self.overlap)) * r
        chunk = state.rows(max(lo, 0), last * r)
        chunk = chunk.reshape(B, -1, r, chunk.shape[-1])  # [B, windows, r, 2 * width]
        kv, score = mx.split(chunk, 2, axis=-1)
        if lo < 0:  # row 0 has no window before it: zero values, -inf logits
            kv = mx.concatenate([mx.zeros_like(kv[:, :1]), kv], axis=1)
            score = mx.concatenate([mx.full(score[:, :1].shape, -mx.inf), score], axis=1)
        pooled = ops.compress_pool(kv, score, self.overlap)  # [B, last - first, head_dim]
        rows = self.norm(pooled.astype(x.dtype))
        return rope(rows, first, scale=r)


class Indexer(nn.Module):
    """The lightning indexer: its own compressor (index_head_dim, overlapping windows) and
    scores sum_h relu(q_h . k) * w_h(x) / sqrt(index_head_dim * index_n_heads) -> top-k."""

    def __init__(self, args: ModelArgs, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.topk, self.ratio = args.index_topk, ratio
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(args, ratio, self.head_dim, overlap=True)

    def scores(
        self, x: mx.array, qr: mx.array, rows: mx.array, offset: int, rope: TailRoPE
    ) -> mx.array:
        """Index scores [B, L, N] float32 for queries at offset...; rows [B, N, index_head_dim];
        rows a query cannot see at -inf (prefill)."""
        B, L, _ = x.shape
        q = self.wq_b(qr).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = rope(q, offset)
        w = self.weights_proj(x).astype(mx.float32) * self.n_heads**-0.5
        scores = ops.index_scores(q, rows, w, self.head_dim**-0.5)  # [B, L, N]
        if L > 1:
            scores = mx.where(visible(offset, L, rows.shape[1], self.ratio), scores, -mx.inf)
        return scores

    def select(
        self, x: mx.array, qr: mx.array, rows: mx.array, offset: int, rope: TailRoPE
    ) -> mx.array:
        """Top-k row indices [B, L, k] for queries at offset...; rows [B, N, index_head_dim].
        A query with fewer than k visible rows gets invisible ones too: mask them."""
        scores = self.scores(x, qr, rows, offset, rope)
        return ops.select_topk(scores, min(self.topk, rows.shape[1]))


def visible(offset: int, L: int, n: int, ratio: int) -> mx.array:
    """[L, n]: compressed row w is visible to position p = offset + i iff w < (p + 1) // ratio."""
    limit = (offset + mx.arange(L) + 1) // ratio
    return mx.arange(n)[None] < limit[:, None]


def indexer_loss(
    q: mx.array, rows: mx.array, scale: float, scores: mx.array, seen: mx.array
) -> mx.array:
    """The lightning indexer's training loss (DeepSeek V3.2's dense warm-up, used by
    demo_train): KL(p || softmax(index scores)) per query, p the main attention's weights over
    the compressed rows the query sees, summed over heads and renormalised (a fixed target),
    averaged over the queries that see a row.

    q [B, H, L, hd] (normed, roped); rows [B, N, hd]; scores [B, L, N]; seen bool [L, N]."""
    far = mx.array(-1e30, mx.float32)
    s = (q.astype(mx.float32) * scale) @ rows.astype(mx.float32)[:, None].swapaxes(-1, -2)
    p = mx.softmax(mx.where(seen, s, far), axis=-1, precise=True).sum(axis=1)  # [B, L, N]
    p = mx.stop_gradient(mx.where(seen, p / p.sum(axis=-1, keepdims=True), 0.0))
    log_q = nn.log_softmax(mx.where(seen, scores, far), axis=-1)
    kl = (p * (mx.log(mx.maximum(p, 1e-30)) - log_q)).sum(axis=-1)  # [B, L]
    queries = seen.any(axis=-1)  # [L]
    return (kl * queries).sum() / (kl.shape[0] * mx.maximum(queries.sum(), 1))


class V4Attention(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        D, H, hd = args.hidden_size, args.num_attention_heads, args.head_dim
        self.kind, self.ratio = args.layer_type(index), args.compress_ratio(index)
        self.n_heads, self.head_dim, self.groups = H, hd, args.o_groups
        self.window_size, self.eps = args.sliding_window, args.rms_norm_eps
        self.scale = hd**-0.5
        self.wq_a = nn.Linear(D, args.q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(args.q_lora_rank, eps=args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        self.wkv = nn.Linear(D, hd, bias=False)
        self.norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        # grouped low-rank output: heads in o_groups groups, each projected to o_lora_rank
        self.wo_a = nn.Linear(H * hd // args.o_groups, args.o_groups * args.o_lora_rank, False)
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, D, bias=False)
        self.attn_sink = mx.zeros((H,), dtype=mx.float32)
        if self.ratio:
            self.compressor = Compressor(args, self.ratio, hd, overlap=self.kind == CSA)
        if self.kind == CSA:
            self.indexer = Indexer(args, self.ratio)
        self.rope = layer_rope(args, index)

    def make_cache(self, quant: tuple[int, int] | None = None) -> V4LayerCache:
        """An empty cache; quant: (group size, bits) to keep the compressed rows quantized."""
        csa = self.kind == CSA
        return V4LayerCache(self.window_size, self.ratio, csa, csa, self.rope.dims, quant)

    def __call__(self, x: mx.array, cache: V4LayerCache) -> mx.array:
        B, L, _ = x.shape
        H, hd = self.n_heads, self.head_dim
        offset = cache.offset
        qr = self.q_norm(self.wq_a(x))  # [B, L, q_lora_rank]
        q = self.wq_b(qr).reshape(B, L, H, hd).transpose(0, 2, 1, 3)
        q = self.rope(mx.fast.rms_norm(q, None, self.eps), offset)  # unweighted per-head norm
        kv = self.rope(self.norm(self.wkv(x)), offset)  # [B, L, hd]

        cache.window.append(kv)
        lo = max(0, offset - (self.window_size - 1))
        keys = cache.window.rows(lo, offset + L)  # [B, S_w, hd]
        mask = quantized = None
        if L > 1:
            qpos = offset + mx.arange(L)[:, None]
            kpos = lo + mx.arange(keys.shape[1])[None]
            mask = ((kpos <= qpos) & (kpos > qpos - self.window_size))[None]  # [1, L, S_w]
        if self.ratio:
            keys, mask, quantized = self._compressed(x, q, qr, cache, keys, mask)
        out = ops.shared_kv_attention(q, keys, self.attn_sink, self.scale, mask, quantized)
        cache.advance(L)
        out = self.rope(out, offset, inverse=True)  # undo RoPE on the value's rope channels
        return self.wo_b(self._grouped_out(out.transpose(0, 2, 1, 3)))

    def _compressed(self, x, q, qr, cache: V4LayerCache, keys, mask):
        """Append the rows that closed -> (keys, mask) extended with the compressed rows, and
        the quantized rows a decode step reads after keys (None: all in keys). A cache with
        `index_losses` (training) collects the indexer's loss; the indexer then sees its
        inputs without gradient (only that loss trains it, as in DeepSeek V3.2)."""
        B, L, _ = x.shape
        offset = cache.offset
        rows = self.compressor(x, cache.comp_state, offset, self.rope)
        if rows is not None:
            cache.compressed.append(rows)
        training = cache.index_losses is not None
        ix, iqr = (mx.stop_gradient(x), mx.stop_gradient(qr)) if training else (x, qr)
        if self.kind == CSA:
            rows = self.indexer.compressor(ix, cache.index_state, offset, self.rope)
            if rows is not None:
                cache.indexer.append(rows)
        n = cache.compressed.end
        if n == 0:
            return keys, mask, None
        compressed = cache.compressed.all()  # [B, n, hd], or quantized: ops.SplitRows
        if L == 1:  # decode: a compressed sparse layer reads only the k selected rows
            if self.kind == CSA:
                idx = self.indexer.select(x, qr, cache.indexer.all(), offset, self.rope)
                compressed = ops.gather_rows(compressed, idx[:, 0])  # idx [B, 1, k]
            if isinstance(compressed, ops.SplitRows):
                return keys, mask, compressed
            return mx.concatenate([keys, compressed], axis=1), mask, None
        seen = visible(offset, L, n, self.ratio)  # [L, n]
        if self.kind == CSA:
            scores = self.indexer.scores(ix, iqr, cache.indexer.all(), offset, self.rope)
            idx = ops.select_topk(scores, min(self.indexer.topk, n))  # [B, L, k]
            picked = mx.put_along_axis(
                mx.zeros((B, L, n), dtype=mx.bool_), idx, mx.array(True), axis=-1
            )
            comp_mask = picked & seen[None]
            if training:
                loss = indexer_loss(q, compressed, self.scale, scores, seen)
                cache.index_losses.append(loss)
        else:
            comp_mask = mx.broadcast_to(seen[None], (B, L, n))
        mask = mx.concatenate([mx.broadcast_to(mask, (B, *mask.shape[1:])), comp_mask], axis=-1)
        compressed = ops.dense_rows(compressed, keys.shape[-1]).astype(keys.dtype)
        return mx.concatenate([keys, compressed], axis=1), mask, None

    def _grouped_out(self, out: mx.array) -> mx.array:
        """[B, L, H, hd] -> [B, L, o_groups * o_lora_rank]: group g's heads through its own
        block of wo_a."""
        B, L = out.shape[:2]
        G = self.groups
        x = out.reshape(B * L, G, -1).swapaxes(0, 1)  # [G, B*L, H*hd/G]
        layer = self.wo_a

        def per_group(a: mx.array) -> mx.array:  # [G * o_lora_rank, k] -> [G, o_lora_rank, k]
            return a.reshape(G, -1, a.shape[-1])

        if "scales" in layer:  # quantized: one batched quantized matmul over the groups
            biases = layer.get("biases")
            y = mx.quantized_matmul(
                x,
                per_group(layer["weight"]),
                per_group(layer["scales"]),
                None if biases is None else per_group(biases),
                transpose=True,
                group_size=layer.group_size,
                bits=layer.bits,
                mode=layer.mode,
            )
        else:
            y = x @ per_group(layer["weight"]).swapaxes(-1, -2)  # [G, B*L, o_lora_rank]
        return y.swapaxes(0, 1).reshape(B, L, -1)
