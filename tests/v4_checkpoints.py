"""Tiny DeepSeek V4 checkpoints built at test time with transformers' own model class.

transformers initialises several V4 parameters to constants (norms to 1, sinks / position
biases / hyper-connection bases / correction biases to 0, the hash table to 0): they are
randomized here so that every one of them matters in the comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SLIDING, CSA, HCA = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)

# several shapes: windows, ratios, heads, hc_mult, hash layers, layer orders
SHAPES = {
    "mixed": dict(
        layer_types=[SLIDING, CSA, HCA, CSA],
        compress_rates={CSA: 4, HCA: 8},
        sliding_window=8,
        num_attention_heads=4,
        hc_mult=2,
        num_hash_layers=2,
        index_topk=3,
        index_n_heads=4,
    ),
    "hca_first": dict(
        layer_types=[HCA, CSA, CSA],
        compress_rates={CSA: 4, HCA: 16},
        sliding_window=6,
        num_attention_heads=8,
        o_groups=4,
        hc_mult=3,
        num_hash_layers=1,
        index_topk=5,
        index_n_heads=8,
    ),
    "csa_ratio2": dict(
        layer_types=[CSA, SLIDING, HCA],
        compress_rates={CSA: 2, HCA: 4},
        sliding_window=5,
        num_attention_heads=2,
        o_groups=1,
        hc_mult=4,
        num_hash_layers=0,
        index_topk=4,
        index_n_heads=6,
        scoring_func="sigmoid",
    ),
}


def v4_config(shape: str = "mixed", **overrides):
    from transformers import DeepseekV4Config

    fields = dict(
        vocab_size=96,
        hidden_size=32,
        moe_intermediate_size=16,
        num_attention_heads=4,
        head_dim=32,
        partial_rotary_factor=8 / 32,
        q_lora_rank=16,
        num_experts_per_tok=2,
        n_routed_experts=6,
        o_groups=2,
        o_lora_rank=8,
        index_head_dim=16,
        hc_sinkhorn_iters=5,
        routed_scaling_factor=1.5,
        swiglu_limit=0.6,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
    )
    fields.update(SHAPES[shape])
    fields.update(overrides)
    fields["num_hidden_layers"] = len(fields["layer_types"])
    return DeepseekV4Config(**fields)


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Give the parameters transformers sets to constants random values (and scale the
    rest so activations stay in a range where every part of the model shows)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t, scale, shift=0.0):
        t.copy_(torch.randn(t.shape, generator=g) * scale + shift)

    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            rnd(p, 0.2, 1.0)
        elif name.endswith("sinks"):
            rnd(p, 1.0)
        elif name.endswith("position_bias"):
            rnd(p, 0.7)
        elif name.endswith(".fn") or name.endswith("hc_fn"):
            rnd(p, 0.3)
        elif name.endswith(".base") or name.endswith("hc_base"):
            rnd(p, 0.5)
        elif name.endswith(".scale") or name.endswith("hc_scale"):
            rnd(p, 0.3, 1.0)
        elif name.endswith("gate.weight"):
            rnd(p, 0.5)
        else:
            rnd(p, 1.0 / max(p.shape[-1], 1) ** 0.5)
    cfg = model.config
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            rnd(b, 0.3)
        elif name.endswith("tid2eid"):
            rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: b.shape[1]] for _ in b]
            b.copy_(torch.stack(rows))


def build_v4(shape: str = "mixed", seed: int = 0, **overrides):
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(v4_config(shape, **overrides)).eval()
    randomize(model, seed)
    return model


def save_v4(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@torch.no_grad()
def v4_logits(model, tokens) -> np.ndarray:
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()
