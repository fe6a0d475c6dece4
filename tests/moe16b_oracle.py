"""A float64 torch transcription of DeepSeek's own DeepSeekMoE 16B code (the
`modeling_deepseek.py` shipped in deepseek-ai/deepseek-moe-16b-base, model_type `deepseek`),
the reference for tests/test_deepseek_v1.py: transformers has no class for this family.

Written from that file's inference path, not from mlx-deepseek or mlx-lm:
- DeepseekRMSNorm: weight * x / sqrt(mean(x^2) + eps);
- DeepseekRotaryEmbedding (+ the Linear scaling variant: positions divided by `factor`):
  inv_freq = base^(-2i/d) over the whole head, `rotate_half` (the half-split layout);
- DeepseekAttention: q/k/v/o projections (bias = attention_bias), K/V heads repeated
  (`repeat_kv`), softmax(q k^T / sqrt(head_dim) + causal mask) v;
- DeepseekMLP: down(silu(gate(x)) * up(x));
- MoEGate: scores = softmax(x W^T); torch.topk(k = num_experts_per_tok); when top_k > 1 and
  norm_topk_prob, weights / (sum + 1e-20); no scaling factor;
- DeepseekMoE: sum_k weight_k * expert_k(x), plus shared_experts(x) (one MLP of
  moe_intermediate_size * n_shared_experts);
- layer i is MoE when n_routed_experts and i >= first_k_dense_replace and
  i % moe_layer_freq == 0, else a DeepseekMLP of intermediate_size.
"""

from __future__ import annotations

import numpy as np
import torch


def _t(w: dict, name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(w[name], np.float64))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _linear(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    y = x @ _t(w, prefix + ".weight").T
    return y + _t(w, prefix + ".bias") if prefix + ".bias" in w else y


def _mlp(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    gate = torch.nn.functional.silu(_linear(w, prefix + ".gate_proj", x))
    return _linear(w, prefix + ".down_proj", gate * _linear(w, prefix + ".up_proj", x))


def _attention(w: dict, prefix: str, x: torch.Tensor, c: dict) -> torch.Tensor:
    T = x.shape[0]
    H = c["num_attention_heads"]
    Hkv = c.get("num_key_value_heads") or H
    d = c["hidden_size"] // H
    q = _linear(w, prefix + ".q_proj", x).view(T, H, d).transpose(0, 1)
    k = _linear(w, prefix + ".k_proj", x).view(T, Hkv, d).transpose(0, 1)
    v = _linear(w, prefix + ".v_proj", x).view(T, Hkv, d).transpose(0, 1)
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    t = torch.arange(T, dtype=torch.float64)
    scaling = c.get("rope_scaling")
    if scaling:  # DeepseekLinearScalingRotaryEmbedding
        t = t / float(scaling["factor"])
    emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)  # [T, d]
    cos, sin = emb.cos(), emb.sin()
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(H // Hkv, dim=0)  # repeat_kv
    v = v.repeat_interleave(H // Hkv, dim=0)
    scores = q @ k.transpose(-1, -2) / d**0.5
    scores = scores + torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    out = torch.softmax(scores, dim=-1) @ v  # [H, T, d]
    return _linear(w, prefix + ".o_proj", out.transpose(0, 1).reshape(T, H * d))


def _moe(w: dict, prefix: str, x: torch.Tensor, c: dict) -> torch.Tensor:
    scores = torch.softmax(x @ _t(w, prefix + ".gate.weight").T, dim=-1)
    k = c["num_experts_per_tok"]
    topk_weight, topk_idx = torch.topk(scores, k=k, dim=-1, sorted=False)
    if k > 1 and c.get("norm_topk_prob"):
        topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            e = int(topk_idx[t, j])
            y[t] += topk_weight[t, j] * _mlp(w, f"{prefix}.experts.{e}", x[t : t + 1])[0]
    if c.get("n_shared_experts"):
        y = y + _mlp(w, prefix + ".shared_experts", x)
    return y


def logits(weights: dict[str, np.ndarray], config: dict, tokens: np.ndarray) -> np.ndarray:
    """DeepseekForCausalLM's logits for one sequence `tokens` [T] -> [T, vocab], float64."""
    w, c = weights, config
    eps = c["rms_norm_eps"]
    h = _t(w, "model.embed_tokens.weight")[torch.from_numpy(np.asarray(tokens))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = _rms(h, _t(w, p + ".input_layernorm.weight"), eps)
        h = h + _attention(w, p + ".self_attn", x, c)
        x = _rms(h, _t(w, p + ".post_attention_layernorm.weight"), eps)
        moe = (
            c.get("n_routed_experts") is not None
            and i >= c.get("first_k_dense_replace", 0)
            and i % c.get("moe_layer_freq", 1) == 0
        )
        h = h + (_moe(w, p + ".mlp", x, c) if moe else _mlp(w, p + ".mlp", x))
    h = _rms(h, _t(w, "model.norm.weight"), eps)
    head = "model.embed_tokens.weight" if c.get("tie_word_embeddings") else "lm_head.weight"
    return (h @ _t(w, head).T).numpy()
