"""Synthetic DeepSeek configs: the one factory for the tests, the bench and synthetic checkpoints.

`tiny_config(routing, **overrides)` gives a config.json dict (Hugging Face field names) that
is small but has every structural feature on: a dense layer then MoE layers, shared experts,
YaRN with an mscale correction that is not 1. `routing` names a preset of ROUTINGS (each of
DeepSeek's routing methods, with and without q LoRA) or a model_type (its usual preset);
`overrides` set sizes or anything else.

The other sizes: WIDTHS_64 and `convertible_config` (widths in whole 64-groups, for 4-bit
conversion), `tiny_v1_config` (DeepSeekMoE 16B), `tiny_v4_config` (V4 in DeepSeek's release
layout, `release_config`). RELEASES and V4_FLASH are the real models' configs, whose
per-layer shapes the bench's synthetic shapes keep.
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
# V4's (no mscale: V4 scales its attention by the YaRN factor alone)
YARN_V4: dict[str, Any] = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32,
    "beta_slow": 1,
}

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

# the tests' widths: small, every MLA dimension a different number
WIDTHS: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=24,
)
BASE: dict[str, Any] = dict(
    WIDTHS,
    num_hidden_layers=3,
    n_routed_experts=8,
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


def tiny_v1_config(**changes: Any) -> dict[str, Any]:
    """A tiny DeepSeekMoE 16B config (model_type `deepseek`; its structure: MHA, softmax greedy
    top-k, 2 shared experts, first layer dense): BASE without MLA's fields, then `changes`."""
    mla = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    config = {k: v for k, v in BASE.items() if k not in mla}
    config.update(
        architectures=["DeepseekForCausalLM"],
        model_type="deepseek",
        intermediate_size=128,
        num_key_value_heads=config["num_attention_heads"],
        n_shared_experts=2,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        max_position_embeddings=4096,
        rope_scaling=None,
        torch_dtype="bfloat16",
    )
    return config | changes


# a few MB with every width in whole 64-groups (4-bit group-64 quantization, the kernels' tiles):
# the bench's tiny shapes and the decode-kernel tests
WIDTHS_64: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
)
# BASE's hidden size and RoPE dims, the other widths whole 64-groups: the converter's tests'
# checkpoints (q LoRA, dense + MoE layers, one shared expert; MTP for V3: `convertible_config`)
CONVERTIBLE: dict[str, Any] = dict(
    intermediate_size=128,
    moe_intermediate_size=64,
    kv_lora_rank=64,
    q_lora_rank=64,
    qk_nope_head_dim=64,
    v_head_dim=32,
    n_shared_experts=1,
    num_experts_per_tok=2,
    torch_dtype="bfloat16",
)


def convertible_config(model_type: str = "deepseek_v3", **overrides: Any) -> dict[str, Any]:
    """tiny_config with the CONVERTIBLE widths; V3's with 2 groups and an MTP layer."""
    if model_type == "deepseek_v3":
        overrides = dict(n_group=2, topk_group=1, num_nextn_predict_layers=1) | overrides
    return tiny_config(model_type, **{**CONVERTIBLE, **overrides})


# the real releases' config.json fields that shape the model (the bench's shapes keep the
# per-layer ones; the quantization study counts their bytes)
RELEASES: dict[str, dict[str, Any]] = {
    "V2-Lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, kv_lora_rank=512,
        q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1,
        first_k_dense_replace=1,
    ),
    "V3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, kv_lora_rank=512,
        q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        topk_method="noaux_tc", scoring_func="sigmoid", n_group=8, topk_group=4,
        first_k_dense_replace=3,
    ),
}  # fmt: skip

# DeepSeek-V4-Flash's config.json (the fields this port reads): two sliding-window layers, then
# compressed sparse (ratio 4) and heavily compressed (ratio 128) in turn; the MTP layer's last
V4_FLASH: dict[str, Any] = {
    "model_type": "deepseek_v4",
    "vocab_size": 129280,
    "hidden_size": 4096,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "num_experts_per_tok": 6,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_hash_layers": 3,
    "num_nextn_predict_layers": 1,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "hc_mult": 4,
    "sliding_window": 128,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": YARN_V4,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "max_position_embeddings": 1048576,
}

FP8_BLOCK = 128  # the release's FP8 scale blocks: 128 x 128


def release_config(**fields: Any) -> dict[str, Any]:
    """A V4 config.json as DeepSeek writes it (compress_ratios, num_hash_layers, rope_scaling,
    FP8 quantization_config), Flash's values unless given."""
    config: dict[str, Any] = {
        "model_type": "deepseek_v4",
        "architectures": ["DeepseekV4ForCausalLM"],
        "torch_dtype": "bfloat16",
        "num_nextn_predict_layers": 0,
        "rope_scaling": dict(YARN_V4),
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    config.update(fields)
    return config


# a V4 model of a few MB with every layer kind: window 8, top-4 of the indexer
TINY_V4: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=128,
    moe_intermediate_size=64,
    num_attention_heads=4,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=64,
    num_experts_per_tok=2,
    n_routed_experts=4,
    o_groups=2,
    o_lora_rank=64,
    index_n_heads=2,
    index_head_dim=32,
    index_topk=4,
    sliding_window=8,
    hc_mult=2,
    hc_sinkhorn_iters=3,
    num_hash_layers=1,
    max_position_embeddings=65536,
)


def tiny_v4_config(ratios: list[int], **overrides: Any) -> dict[str, Any]:
    """A release-layout V4 config of TINY_V4's sizes, one layer per entry of `ratios` (0:
    sliding window, 4: compressed sparse, more: heavily compressed), no MTP module."""
    layers = dict(num_hidden_layers=len(ratios), compress_ratios=list(ratios))
    return release_config(**{**TINY_V4, **layers, **overrides})
