"""A float64 NumPy transcription of DeepSeek's V3.2 attention layer (the reference in tests).

Transcribed from DeepSeek's own inference/model.py (V3.2-Exp): MLA's prefill path (per-head
K/V expanded from the latent, scores over every position) with the lightning indexer's
top-k turned into an additive mask, exactly as `MLA.forward` does with `mask` set, and the
indexer of `Indexer.forward` without its numeric shortcuts (Hadamard rotation, FP8). One
change from that file, the fix DeepSeek published later: the indexer's RoPE rotates
half-split pairs (x_i, x_{i+d/2}); MLA's stays interleaved (x_{2i}, x_{2i+1}).

Ties in the indexer's top-k go to the lower position (a stable sort), the rule
mlx_deepseek.ops.sparse documents. Weights are given by their Hugging Face names (the
`self_attn.` prefix removed), as float64 arrays.
"""

from __future__ import annotations

import math

import numpy as np


def inv_freq(dims: int, theta: float, rope_scaling: dict | None) -> np.ndarray:
    """DeepSeek's precompute_freqs_cis frequencies, with YaRN when rope_scaling asks."""
    freqs = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    if rope_scaling:
        factor = rope_scaling["factor"]
        original = rope_scaling["original_max_position_embeddings"]
        fast, slow = rope_scaling.get("beta_fast", 32), rope_scaling.get("beta_slow", 1)

        def corr(rotations: float) -> float:
            return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(corr(fast)), 0)
        high = min(math.ceil(corr(slow)), dims - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dims // 2) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def rope(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotate the last axis of x [T, ..., d] at `positions` [T]."""
    angle = positions[:, None] * freqs[None]  # [T, d/2]
    shape = (len(positions),) + (1,) * (x.ndim - 2) + (-1,)
    cos, sin = np.cos(angle).reshape(shape), np.sin(angle).reshape(shape)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def indexer_scores(W: dict, x: np.ndarray, qr: np.ndarray, cfg: dict, freqs) -> np.ndarray:
    """Index scores [T, T] (causal: -inf after the query) for tokens at positions 0..T-1."""
    T = x.shape[0]
    Hi, Di, r = cfg["index_n_heads"], cfg["index_head_dim"], cfg["qk_rope_head_dim"]
    pos = np.arange(T, dtype=np.float64)
    q = (qr @ W["indexer.wq_b.weight"].T).reshape(T, Hi, Di)
    q = np.concatenate([rope(q[..., :r], pos, freqs, interleaved=False), q[..., r:]], -1)
    norm = W["indexer.k_norm.weight"], W["indexer.k_norm.bias"]
    k = layer_norm(x @ W["indexer.wk.weight"].T, *norm)
    k = np.concatenate([rope(k[..., :r], pos, freqs, interleaved=False), k[..., r:]], -1)
    weights = (x @ W["indexer.weights_proj.weight"].T) * Hi**-0.5 * Di**-0.5  # [T, Hi]
    dots = np.maximum(np.einsum("thd,sd->ths", q, k), 0.0)
    score = np.einsum("th,ths->ts", weights, dots)
    return np.where(np.tril(np.ones((T, T), bool)), score, -np.inf)


def topk_sets(score: np.ndarray, topk: int) -> np.ndarray:
    """[T, K] positions of the K = min(topk, T) best scores per row; ties: lower position."""
    K = min(topk, score.shape[-1])
    return np.argsort(-score, axis=-1, kind="stable")[:, :K]


def attention(W: dict, x: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The layer's output [T, hidden] for normed inputs x [T, hidden] at positions 0..T-1,
    with the index scores [T, T] and the selected positions [T, K]."""
    T = x.shape[0]
    H, nope, rdim = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    v_dim, rank = cfg["v_head_dim"], cfg["kv_lora_rank"]
    freqs = inv_freq(rdim, cfg["rope_theta"], cfg.get("rope_scaling"))
    pos = np.arange(T, dtype=np.float64)

    qr = rms_norm(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"])
    q = (qr @ W["q_b_proj.weight"].T).reshape(T, H, nope + rdim)
    q_nope, q_pe = q[..., :nope], rope(q[..., nope:], pos, freqs, interleaved=True)
    kv = x @ W["kv_a_proj_with_mqa.weight"].T
    c = rms_norm(kv[:, :rank], W["kv_a_layernorm.weight"])
    k_pe = rope(kv[:, None, rank:], pos, freqs, interleaved=True)  # [T, 1, rope]
    kvb = (c @ W["kv_b_proj.weight"].T).reshape(T, H, nope + v_dim)
    k_nope, v = kvb[..., :nope], kvb[..., nope:]
    k = np.concatenate([k_nope, np.broadcast_to(k_pe, (T, H, rdim))], -1)
    scale = (nope + rdim) ** -0.5
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("mscale_all_dim"):
        m = 0.1 * scaling["mscale_all_dim"] * math.log(scaling["factor"]) + 1.0
        scale *= m * m
    scores = np.einsum("shd,thd->sht", np.concatenate([q_nope, q_pe], -1), k) * scale

    index = indexer_scores(W, x, qr, cfg, freqs)
    chosen = topk_sets(index, cfg["index_topk"])
    index_mask = np.full((T, T), -np.inf)
    np.put_along_axis(index_mask, chosen, 0.0, axis=-1)
    index_mask += np.where(np.tril(np.ones((T, T), bool)), 0.0, -np.inf)
    scores = scores + index_mask[:, None, :]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("sht,thd->shd", p, v).reshape(T, H * v_dim)
    return out @ W["o_proj.weight"].T, index, chosen
