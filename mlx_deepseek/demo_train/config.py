"""The demo model's shape: DeepSeek-V3's architecture at a tiny size, as a config.json dict."""

from __future__ import annotations

# The first phase trains on rows of SHORT_CONTEXT tokens with plain rope; the second, as
# DeepSeek extends its context, switches YaRN on (factor 4 over SHORT_CONTEXT) and trains on
# rows of LONG_CONTEXT tokens. MAX_CONTEXT: what YaRN's factor reaches (max_position_embeddings).
SHORT_CONTEXT = 512
LONG_CONTEXT = 1024
YARN_FACTOR = 4
MAX_CONTEXT = YARN_FACTOR * SHORT_CONTEXT
VOCAB_SIZE = 768

CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 2.5,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": MAX_CONTEXT,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": float(YARN_FACTOR),
        "original_max_position_embeddings": SHORT_CONTEXT,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "ep_size": 1,
    "pretraining_tp": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}


def count_parameters(cfg: dict = CONFIG) -> tuple[int, int, int]:
    """(main model total, MTP module, active per token in the main model), embeddings included."""
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    h = cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    attn = d * qr + qr + qr * h * (nope + rope)  # q_a_proj, q_a_layernorm, q_b_proj
    attn += d * (kr + rope) + kr  # kv_a_proj_with_mqa, kv_a_layernorm
    attn += kr * h * (nope + vd) + h * vd * d  # kv_b_proj, o_proj
    norms = 2 * d
    dense = 3 * d * cfg["intermediate_size"]
    expert = 3 * d * cfg["moe_intermediate_size"]
    e, k, s = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_shared_experts"]
    moe_total = e * expert + s * expert + e * d + e  # experts, shared, gate, bias
    moe_active = k * expert + s * expert + e * d
    n_dense = cfg["first_k_dense_replace"]
    n_moe = cfg["num_hidden_layers"] - n_dense
    embed = 2 * v * d + d  # embed_tokens, lm_head, final norm
    total = embed + n_dense * (attn + norms + dense) + n_moe * (attn + norms + moe_total)
    active = embed + n_dense * (attn + norms + dense) + n_moe * (attn + norms + moe_active)
    # MTP: enorm, hnorm, eh_proj, one MoE block, shared_head.norm (embedding/head shared).
    mtp = cfg["num_nextn_predict_layers"] * (3 * d + 2 * d * d + attn + norms + moe_total)
    return total, mtp, active
