"""Tiny DeepSeek checkpoints built at test time with transformers' own model classes.

Random weights in the real Hugging Face layout (per-expert tensors, kv_b_proj, ...), saved
as safetensors; the torch model is returned too as the reference implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# one tiny config per routing method; small but with every structural feature on
FAMILIES = {
    # V2-Lite-like: greedy softmax routing, no q LoRA, 2 shared experts
    "v2_greedy": dict(
        model_type="deepseek_v2",
        q_lora_rank=None,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
    ),
    # V2-like: group-limited greedy with q LoRA
    "v2_group": dict(
        model_type="deepseek_v2",
        q_lora_rank=24,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=16.0,
        norm_topk_prob=False,
    ),
    # V3-like: sigmoid noaux_tc with the correction bias
    "v3_noaux": dict(
        model_type="deepseek_v3",
        q_lora_rank=24,
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    # V3 without q LoRA
    "v3_noaux_noqlora": dict(
        model_type="deepseek_v3",
        q_lora_rank=None,
        topk_method="noaux_tc",
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    # V3.2: V3 plus the lightning indexer (16 indexer heads: no exact ties at the top-k edge)
    "v32": dict(
        model_type="deepseek_v32",
        q_lora_rank=24,
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        index_topk=8,
        index_n_heads=16,
        index_head_dim=32,
    ),
}

BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=24,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    # YaRN on, with an mscale correction that is not 1
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
    },
    bos_token_id=0,
    eos_token_id=1,
)


def hf_config(family: str, **overrides):
    from transformers import DeepseekV2Config, DeepseekV3Config, DeepseekV32Config

    fields = {**BASE, **FAMILIES[family], **overrides}
    model_type = fields.pop("model_type")
    if model_type == "deepseek_v2":
        fields["scoring_func"] = "softmax"
        return DeepseekV2Config(**fields)
    if model_type == "deepseek_v32":
        for name in ("topk_method", "num_key_value_heads"):
            fields.pop(name, None)  # V3.2's config has no such field (noaux_tc is implied)
        return DeepseekV32Config(**fields)
    return DeepseekV3Config(**fields)


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers DeepSeek model with weights large enough to route decisively."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    cls = {
        "deepseek_v2": DeepseekV2ForCausalLM,
        "deepseek_v3": DeepseekV3ForCausalLM,
        "deepseek_v32": DeepseekV32ForCausalLM,
    }[config.model_type]
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def save_hf_checkpoint(
    model, path: Path, max_shard_size: str | None = None, rope_format: str = "deepseek"
) -> Path:
    """save_pretrained, then (rope_format="deepseek") rewrite transformers 5's `rope_parameters`
    as DeepSeek's own repos write it: `rope_scaling` plus a top-level `rope_theta`."""
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if rope_format == "deepseek":
        config = read_config(path)
        params = dict(config.pop("rope_parameters"))
        config["rope_theta"] = params.pop("rope_theta")
        params.pop("rope_type", None)
        config["rope_scaling"] = params
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float()


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def add_mtp_layer(path: Path, seed: int = 1, same_copies: bool = True) -> dict:
    """Append DeepSeek-V3's MTP layer (index num_hidden_layers) to a saved checkpoint.

    Its decoder block copies the last layer's tensor names with fresh random values; its
    embed_tokens / shared_head.head equal the main model's (as DeepSeek ships them) unless
    same_copies is False. Returns the MTP tensors (numpy) by their checkpoint names.
    """
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = Path(path)
    config = read_config(path)
    n = config["num_hidden_layers"]
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    rng = np.random.default_rng(seed)
    mtp = {}
    prefix = f"model.layers.{n - 1}."
    for name, t in tensors.items():
        if name.startswith(prefix):
            local = name[len(prefix) :]
            if local.endswith("norm.weight"):
                value = 1.0 + 0.1 * rng.standard_normal(t.shape)
            elif local.endswith("e_score_correction_bias"):
                value = 0.1 * rng.standard_normal(t.shape)
            else:
                value = rng.standard_normal(t.shape) / t.shape[-1] ** 0.5
            mtp[f"model.layers.{n}.{local}"] = value.astype(t.dtype)
    H = config["hidden_size"]
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{n}.{norm}.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(
            np.float32
        )
    mtp[f"model.layers.{n}.eh_proj.weight"] = (
        rng.standard_normal((H, 2 * H)) / (2 * H) ** 0.5
    ).astype(np.float32)
    embed, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    if not same_copies:
        embed = embed + 0.01 * rng.standard_normal(embed.shape).astype(np.float32)
        head = head + 0.01 * rng.standard_normal(head.shape).astype(np.float32)
    mtp[f"model.layers.{n}.embed_tokens.weight"] = embed.copy()
    mtp[f"model.layers.{n}.shared_head.head.weight"] = head.copy()
    save_file({**tensors, **mtp}, str(file), metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return mtp
