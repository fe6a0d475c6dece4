"""Small DeepSeek configs: the one factory for the tests, the bench and synthetic checkpoints.

`tiny_config(routing, **overrides)` gives a config.json dict (Hugging Face field names) that
is small but has every structural feature on: a dense layer then MoE layers, shared experts,
YaRN with an mscale correction that is not 1. `routing` names a preset of ROUTINGS (each of
DeepSeek's routing methods, with and without q LoRA) or a model_type (its usual preset);
`overrides` set sizes or anything else.
"""

from __future__ import annotations

from typing import Any

# YaRN on, with an mscale correction that is not 1 (the tests' default)
YARN: dict[str, Any] = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}
# the real releases' YaRN: V2 / V2-Lite, and V3 / R1
YARN_V2: dict[str, Any] = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
YARN_V3: dict[str, Any] = {**YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}

# one preset per routing method: small but with every structural feature on
ROUTINGS: dict[str, dict[str, Any]] = {
    # V2-Lite-like: greedy softmax routing, no q LoRA, 2 shared experts
    "v2_greedy": dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="greedy",
                      scoring_func="softmax", n_group=1, topk_group=1, n_shared_experts=2,
                      routed_scaling_factor=1.0, norm_topk_prob=False),
    # V2-like: group-limited greedy with q LoRA
    "v2_group": dict(model_type="deepseek_v2", q_lora_rank=24, topk_method="group_limited_greedy",
                     scoring_func="softmax", n_group=4, topk_group=2, n_shared_experts=1,
                     routed_scaling_factor=16.0, norm_topk_prob=False),
    # V3-like: sigmoid noaux_tc with the correction bias
    "v3_noaux": dict(model_type="deepseek_v3", q_lora_rank=24, topk_method="noaux_tc",
                     scoring_func="sigmoid", n_group=4, topk_group=2, n_shared_experts=1,
                     routed_scaling_factor=2.5, norm_topk_prob=True),
    # V3 without q LoRA
    "v3_noaux_noqlora": dict(model_type="deepseek_v3", q_lora_rank=None, topk_method="noaux_tc",
                             scoring_func="sigmoid", n_group=2, topk_group=1, n_shared_experts=1,
                             routed_scaling_factor=2.5, norm_topk_prob=True),
    # V3.2: V3 plus the lightning indexer; top-8 of 16 indexer heads (no exact ties at the
    # top-k edge: with so many heads a score is rarely exactly 0)
    "v32": dict(model_type="deepseek_v32", q_lora_rank=24, topk_method="noaux_tc",
                scoring_func="sigmoid", n_group=4, topk_group=2, n_shared_experts=1,
                routed_scaling_factor=2.5, norm_topk_prob=True, index_topk=8,
                index_n_heads=16, index_head_dim=32),
}  # fmt: skip
PRESET_OF_MODEL_TYPE = {
    "deepseek_v2": "v2_greedy",
    "deepseek_v3": "v3_noaux",
    "deepseek_v32": "v32",
}
ARCHITECTURES = {
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
}

BASE: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=24,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=0,
    eos_token_id=1,
)


def tiny_config(routing: str = "v3_noaux", **overrides: Any) -> dict[str, Any]:
    """A config.json dict: BASE, YARN, the routing preset, then `overrides`.
    num_key_value_heads follows num_attention_heads unless given."""
    preset = ROUTINGS[PRESET_OF_MODEL_TYPE.get(routing, routing)]
    config: dict[str, Any] = {**BASE, "rope_scaling": dict(YARN), **preset, **overrides}
    config.setdefault("architectures", [ARCHITECTURES[config["model_type"]]])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    return config
