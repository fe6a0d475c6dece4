"""The "mlx" back-end: every op in MLX's own operations (the reference for the others)."""

from __future__ import annotations

from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn

from .types import CAUSAL, MLAHeads, Routing


def add_rms_norm(
    x: mx.array, r: mx.array | None, norm: nn.Module, float32_copy: bool = False
) -> tuple[mx.array, ...]:
    h = x if r is None else x + r
    y = norm(h)
    return (h, y, y.astype(mx.float32)) if float32_copy else (h, y)


def embed(
    embedding: nn.Module, tokens: mx.array, norm: nn.Module | None = None
) -> tuple[mx.array, mx.array | None]:
    h = embedding(tokens)
    return h, None if norm is None else norm(h)


def latent(
    kv: mx.array,
    norm: nn.Module,
    rope,
    offset: int | mx.array,
    q_a: mx.array | None = None,
    q_norm: nn.Module | None = None,
) -> tuple[mx.array, mx.array, mx.array | None]:
    c_kv, k_pe = mx.split(kv, [norm.weight.shape[0]], axis=-1)
    c_kv = mx.expand_dims(norm(c_kv), 1)  # [B, 1, L, rank]
    k_pe = rope(mx.expand_dims(k_pe, 1), offset)  # [B, 1, L, rope]
    return c_kv, k_pe, None if q_a is None else q_norm(q_a)


# ---- MLA attention ---------------------------------------------------------------------------


def causal_mask(L: int, offset: int) -> mx.array | None:
    """Boolean [L, offset + L] mask (True = attend), or None for a single query."""
    if L == 1:
        return None
    rows = mx.arange(offset, offset + L)[:, None]
    cols = mx.arange(offset + L)[None]
    return cols <= rows


def boolean_mask(mask, L: int, offset: int | mx.array) -> mx.array | None:
    """The mask argument (None, CAUSAL, or a boolean array broadcasting to [B, H, L, S]) as
    an array or None."""
    if isinstance(mask, str):
        if mask != CAUSAL:
            raise ValueError(f"mask {mask!r}: give None, {CAUSAL!r} or a boolean array")
        if not isinstance(offset, int):
            raise ValueError("a causal mask needs an int offset: batch caches give an array mask")
        return causal_mask(L, offset)
    return mask


def split_q(q: mx.array, mla: MLAHeads) -> tuple[mx.array, mx.array]:
    """q_proj's output [B, L, H * (nope + rope)] -> q_nope [B, H, L, nope], q_pe [B, H, L, rope]."""
    B, L, _ = q.shape
    q = q.reshape(B, L, mla.heads, -1).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [mla.nope], axis=-1)
    return q_nope, q_pe


def pe_scores(
    q_pe: mx.array, k_pe: mx.array, mla: MLAHeads, mask: mx.array | None, offset
) -> mx.array:
    """The rope part of the scores, pre-scaled and masked, as SDPA's additive mask:
    [B, H, L, S]. All heads share the one latent head: fold them into the query axis
    ([B, 1, H*L, .]) so each product reads the cache once, not once per head."""
    B, H, L, _ = q_pe.shape
    S = k_pe.shape[2]
    q_pe = mla.rope(q_pe, offset)
    q_pe = (q_pe * mla.scale).reshape(B, 1, H * L, -1)
    scores = (q_pe @ k_pe.swapaxes(-1, -2)).reshape(B, H, L, S)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    return scores


def absorbed_attention(q: mx.array, c_kv, k_pe, mla: MLAHeads, mask, offset) -> mx.array:
    """Attention in latent space -> [B, L, H * v]: q' = q_nope W_uk lives in latent space;
    scores q'.c_kv + q_pe.k_pe; output (softmax @ c_kv) W_uv^T — no per-head K/V at all.
    A quantized c_kv is read by quantized matmuls (see `latent_scores`)."""
    B, L, _ = q.shape
    k_pe = dense(k_pe, mla.rope_dims)
    H, S = mla.heads, k_pe.shape[2]
    q_nope, q_pe = split_q(q, mla)
    scores = pe_scores(q_pe, k_pe, mla, boolean_mask(mask, L, offset), offset)
    q_lat = mla.embed_q(q_nope)  # [B, H, L, rank]
    if is_quantized(c_kv):
        q_lat = (q_lat * mla.scale).reshape(B, 1, H * L, -1)
        s = latent_scores(q_lat, c_kv, mla.rank) + scores.reshape(B, 1, H * L, S)
        p = mx.softmax(s.astype(mx.float32), axis=-1).astype(q_lat.dtype)
        out = latent_mix(p, c_kv, mla.rank)  # [B, 1, H * L, rank]
    else:
        out = mx.fast.scaled_dot_product_attention(
            q_lat.reshape(B, 1, H * L, -1),
            c_kv,
            c_kv,
            scale=mla.scale,
            mask=scores.reshape(B, 1, H * L, S),
        )
    out = mla.unembed_out(out.reshape(B, H, L, -1))  # [B, H, L, v]
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


def expanded_attention(q: mx.array, c_kv, k_pe, mla: MLAHeads, mask, offset) -> mx.array:
    """Per-head K and V expanded from the latent -> [B, L, H * v] (prefill); a quantized
    cache is dequantized first (K and V are expanded to full precision anyway)."""
    B, L, _ = q.shape
    c_kv, k_pe = dense(c_kv, mla.rank), dense(k_pe, mla.rope_dims)
    q_nope, q_pe = split_q(q, mla)
    scores = pe_scores(q_pe, k_pe, mla, boolean_mask(mask, L, offset), offset)
    k_nope = mla.embed_q(c_kv, transpose=False)  # [B, H, S, nope]
    v = mla.unembed_out(c_kv)  # [B, H, S, v]
    out = mx.fast.scaled_dot_product_attention(q_nope, k_nope, v, scale=mla.scale, mask=scores)
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


# ---- the latent cache, full precision or quantized -------------------------------------------
# A quantized cache entry is MLX's affine triple (packed uint32 [..., S, dim * bits / 32],
# scales [..., S, dim / group], biases [same]), quantized along the last axis: what the
# models.cache.QuantizedKVCache holds for c_kv (and mlx-lm's own QuantizedKVCache for both).


def is_quantized(c) -> bool:
    """Whether a cache entry is a quantized triple rather than an array."""
    return isinstance(c, tuple | list)


def latent_format(c, dim: int) -> tuple[int, int]:
    """(group size, bits) of a quantized entry whose rows are `dim` wide."""
    packed, scales = c[0], c[1]
    return dim // scales.shape[-1], packed.shape[-1] * 32 // dim


def dense(c, dim: int) -> mx.array:
    """A cache entry as an array (dequantized when quantized, in its scales' dtype)."""
    if not is_quantized(c):
        return c
    group_size, bits = latent_format(c, dim)
    return mx.dequantize(*c, group_size=group_size, bits=bits)


def latent_nbytes(c) -> int:
    return sum(a.nbytes for a in c) if is_quantized(c) else c.nbytes


def latent_slice(c, lo: int, hi: int):
    """Cached positions [lo, hi) of an entry [B, 1, S, *] (each array of a triple)."""
    if is_quantized(c):
        return tuple(a[:, :, lo:hi] for a in c)
    return c[:, :, lo:hi]


def latent_scores(q: mx.array, c, dim: int) -> mx.array:
    """q [B, 1, M, dim] @ c^T -> [B, 1, M, S], c full precision or quantized."""
    if not is_quantized(c):
        return q @ c.swapaxes(-1, -2)
    group_size, bits = latent_format(c, dim)
    return mx.quantized_matmul(q, *c, transpose=True, group_size=group_size, bits=bits)


def latent_mix(p: mx.array, c, dim: int) -> mx.array:
    """p [B, 1, M, S] @ c -> [B, 1, M, dim], c full precision or quantized."""
    if not is_quantized(c):
        return p @ c
    group_size, bits = latent_format(c, dim)
    return mx.quantized_matmul(p, *c, transpose=False, group_size=group_size, bits=bits)


# ---- routing, MLPs and experts ---------------------------------------------------------------


def _route(logits: mx.array, bias: mx.array | None, routing: Routing) -> tuple[mx.array, mx.array]:
    if routing.scoring_func == "softmax":
        scores = mx.softmax(logits, axis=-1, precise=True)
    else:
        scores = mx.sigmoid(logits)
    choice = scores + bias if bias is not None else scores
    if routing.topk_method != "greedy" and routing.n_group > 1:
        grouped = mx.unflatten(choice, -1, (routing.n_group, -1))  # [..., G, E/G]
        if routing.topk_method == "group_limited_greedy":
            group_scores = grouped.max(axis=-1, keepdims=True)
        else:  # noaux_tc: sum of the two best (bias-corrected) scores in the group
            group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1, keepdims=True)
        n_drop = routing.n_group - routing.topk_group
        if n_drop > 0:
            drop = mx.argpartition(group_scores, kth=n_drop - 1, axis=-2)[..., :n_drop, :]
            grouped = mx.put_along_axis(grouped, drop, mx.array(-mx.inf, grouped.dtype), axis=-2)
        choice = mx.flatten(grouped, -2, -1)
    k = routing.top_k
    inds = mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k]
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if routing.scoring_func == "sigmoid":
        # DeepSeek-V3: normalise the original sigmoid scores, then scale
        if routing.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        weights = weights * routing.routed_scaling_factor
    elif k > 1 and routing.norm_topk_prob:
        # DeepSeek-V2's original rule: renormalise instead of scaling
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    else:
        weights = weights * routing.routed_scaling_factor
    return inds, weights


@cache
def _compiled_route(routing: Routing):
    return mx.compile(lambda logits, bias: _route(logits, bias, routing))


def route(logits: mx.array, bias: mx.array | None, routing: Routing) -> tuple[mx.array, mx.array]:
    """Router logits [..., E] (float32) -> (expert indices [..., k], weights [..., k] float32)."""
    return _compiled_route(routing)(logits, bias)


def mlp(x: mx.array, layer: nn.Module) -> mx.array:
    return layer.down_proj(nn.silu(layer.gate_proj(x)) * layer.up_proj(x))


@partial(mx.compile, shapeless=True)
def _clamped_swiglu(gate: mx.array, up: mx.array, limit: mx.array) -> mx.array:
    return nn.silu(mx.minimum(gate, limit)) * mx.clip(up, -limit, limit)


def swiglu(gate: mx.array, up: mx.array, swiglu_limit: float = 0.0) -> mx.array:
    """silu(gate) * up; with a limit > 0 (DeepSeek V4's clamped SwiGLU) the gate is capped at
    the limit and up clipped to [-limit, limit] first."""
    if not swiglu_limit:
        return nn.silu(gate) * up
    return _clamped_swiglu(gate, up, mx.array(swiglu_limit, dtype=gate.dtype))


def shared_mlp(shared: nn.Module, x: mx.array, swiglu_limit: float = 0.0) -> mx.array:
    """A shared expert's SwiGLU MLP (gate_proj, up_proj, down_proj) at x; clamped at the limit."""
    if not swiglu_limit:
        return shared(x)
    return shared.down_proj(swiglu(shared.gate_proj(x), shared.up_proj(x), swiglu_limit))


def _sort_by_expert(x: mx.array, inds: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """x [..., 1, 1, D] and inds [..., k] -> x repeated per slot in expert order [T*k, 1, D],
    the sorted indices [T*k] and the order that undoes it (as mlx-lm's SwitchGLU sorts)."""
    k = inds.shape[-1]
    flat = inds.flatten()
    order = mx.argsort(flat)
    inv = mx.argsort(order)
    return x.flatten(0, -3)[order // k], flat[order], inv


def switch_glu(
    experts: nn.Module, x: mx.array, inds: mx.array, swiglu_limit: float = 0.0
) -> mx.array:
    """mlx-lm's SwitchGLU at x [..., D] for the experts inds [..., k] -> [..., k, D], its SwiGLU
    clamped at swiglu_limit (0: the module's own call)."""
    if not swiglu_limit:
        return experts(x, inds)
    h = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
    do_sort = inds.size >= 64  # many tokens: gather_qmm reads each expert once
    idx, inv = inds, None
    if do_sort:
        h, idx, inv = _sort_by_expert(h, inds)
    up = experts.up_proj(h, idx, sorted_indices=do_sort)
    gate = experts.gate_proj(h, idx, sorted_indices=do_sort)
    y = experts.down_proj(swiglu(gate, up, swiglu_limit), idx, sorted_indices=do_sort)
    if do_sort:
        y = y[inv].reshape(*inds.shape, 1, -1)
    return y.squeeze(-2)


def _switch_glu_float32(
    experts: nn.Module, x: mx.array, inds: mx.array, swiglu_limit: float = 0.0
) -> mx.array:
    """SwitchGLU computed in float32 with mx.gather_mm: [..., D] -> [..., k, D]. MLX's CPU
    gather_mm only takes float32."""

    def project(layer: nn.Module, h: mx.array) -> mx.array:
        w = layer.weight.astype(mx.float32).swapaxes(-1, -2)
        return mx.gather_mm(h, w, rhs_indices=inds)

    h = mx.expand_dims(x.astype(mx.float32), (-2, -3))  # [..., 1, 1, D]
    h = swiglu(project(experts.gate_proj, h), project(experts.up_proj, h), swiglu_limit)
    return project(experts.down_proj, h).squeeze(-2)


def moe(
    x: mx.array,
    inds: mx.array,
    weights: mx.array,
    experts: nn.Module,
    shared: nn.Module | None,
    swiglu_limit: float = 0.0,
) -> mx.array:
    """sum_j weights[..., j] * expert_{inds[..., j]}(x) + shared(x), in x.dtype.

    x: [..., D]; inds: [..., k] int; weights: [..., k] float32 routing weights (the routed
    scaling factor already applied); experts: mlx-lm's SwitchGLU (gather_qmm / gather_mm,
    sorting the tokens by expert for large batches); swiglu_limit > 0 clamps every expert's
    SwiGLU, the shared one's too (DeepSeek V4).
    """
    unquantized = "scales" not in experts.gate_proj
    if unquantized and x.dtype != mx.float32 and mx.default_device() == mx.cpu:
        y = _switch_glu_float32(experts, x, inds, swiglu_limit)
    else:
        y = switch_glu(experts, x, inds, swiglu_limit)  # [..., k, D]
    y = (y * weights[..., None]).sum(axis=-2).astype(x.dtype)  # combined in float32
    if shared is not None:
        y = y + shared_mlp(shared, x, swiglu_limit)
    return y


def prepare(model: nn.Module) -> int:
    """Nothing to change in the model for MLX's own ops."""
    return 0
