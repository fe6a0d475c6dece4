"""Tiny DeepSeek checkpoints built at test time with transformers' own model classes.

Random weights in the real Hugging Face layout (per-expert tensors, kv_b_proj, ...), saved
as safetensors; the torch model is returned too as the reference implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlx_deepseek.models.tiny import ROUTINGS, tiny_config

# one tiny config per routing method (mlx_deepseek.models.tiny: the project's one factory)
FAMILIES = ROUTINGS


def hf_config(family: str, **overrides):
    """transformers' config object for tiny_config(family, **overrides)."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    fields = tiny_config(family, **overrides)
    cls = DeepseekV2Config if fields.pop("model_type") == "deepseek_v2" else DeepseekV3Config
    return cls(**fields)


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers DeepSeek model with weights large enough to route decisively."""
    return build_from_config(hf_config(family, **overrides), seed)


def build_from_config(config, seed: int = 0):
    """build_hf_model for any transformers DeepseekV2Config / DeepseekV3Config."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cls = DeepseekV2ForCausalLM if config.model_type == "deepseek_v2" else DeepseekV3ForCausalLM
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
