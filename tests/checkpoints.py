"""Tiny DeepSeek checkpoints built at test time with transformers' own model classes.

Random weights in the real Hugging Face layout (per-expert tensors, kv_b_proj, ...), saved
as safetensors; the torch model is returned too as the reference implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mlx_deepseek.models.tiny import ROUTINGS, YARN_V3, tiny_config

# one tiny config per routing method (mlx_deepseek.models.tiny: the project's one factory)
FAMILIES = ROUTINGS


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64 (b: the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_config(family: str, **overrides):
    """transformers' config object for tiny_config(family, **overrides)."""
    from transformers import DeepseekV2Config, DeepseekV3Config, DeepseekV32Config

    fields = tiny_config(family, **overrides)
    model_type = fields.pop("model_type")
    if model_type == "deepseek_v32":
        for name in ("topk_method", "scoring_func", "architectures"):
            fields.pop(name, None)  # V3.2's config has no such field (noaux_tc is implied)
        return DeepseekV32Config(**fields)
    cls = DeepseekV2Config if model_type == "deepseek_v2" else DeepseekV3Config
    return cls(**fields)


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers DeepSeek model with weights large enough to route decisively."""
    return build_from_config(hf_config(family, **overrides), seed)


def build_from_config(config, seed: int = 0):
    """build_hf_model for any transformers DeepseekV2Config / V3Config / V32Config."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM

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


# ---- Moonshot's models: DeepSeek-V3's architecture under Kimi / Moonlight configs ---------

# what Moonshot's models share: one expert group, rope_theta 50000
MOONSHOT = dict(n_group=1, topk_group=1, rope_theta=50000.0)
KIMI = {
    # K2 / K2-Instruct / K2-Thinking: sigmoid noaux_tc, scaling 2.827, V3's YaRN with
    # beta_fast = beta_slow = 1 (K2's own values)
    "kimi_k2": dict(
        MOONSHOT,
        family="v3_noaux",
        n_routed_experts=12,
        num_experts_per_tok=4,
        routed_scaling_factor=2.827,
        rope_scaling={
            **YARN_V3,
            "factor": 32.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
        },
    ),
    # Moonlight-16B-A3B: no q LoRA, 6 of 64 experts (here 16) + 2 shared, scaling 2.446
    "moonlight": dict(
        MOONSHOT,
        family="v3_noaux_noqlora",
        n_routed_experts=16,
        num_experts_per_tok=6,
        n_shared_experts=2,
        routed_scaling_factor=2.446,
        rope_scaling=None,
    ),
}

INT4_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 32,
                "dynamic": False,
                "actorder": None,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
        }
    },
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|down)_proj.*",
    ],
    "kv_cache_scheme": None,
}


def build_kimi_model(name: str, seed: int = 0):
    fields = dict(KIMI[name])
    return build_hf_model(fields.pop("family"), seed=seed, **fields)


def int4_quantize(w, group: int = 32, bits: int = 4):
    """Symmetric group quantization as compressed-tensors does: (q int8, bf16 scales)."""

    top = 2 ** (bits - 1)
    out, cols = w.shape
    g = w.reshape(out, cols // group, group).astype(np.float32)
    scale = torch.tensor(np.abs(g).max(-1) / (top - 1)).to(torch.bfloat16)
    s = scale.float().numpy()
    q = np.clip(np.round(g / s[..., None]), -top, top - 1).astype(np.int8).reshape(out, cols)
    return q, scale


def pack_int32(q, bits: int = 4):
    """compressed-tensors' pack_to_int32: u = q + 2^(b-1), 32/b per word, low bits first."""

    per = 32 // bits
    u = (q.astype(np.int64) + 2 ** (bits - 1)).astype(np.uint32)
    packed = np.zeros((u.shape[0], u.shape[1] // per), np.uint32)
    for i in range(per):
        packed |= u[:, i::per] << np.uint32(bits * i)
    return packed.view(np.int32)


def write_int4_kimi(model, path: Path, ref_path: Path, bits: int = 4, group: int = 32) -> dict:
    """K2-Thinking's layout: routed experts packed (compressed-tensors), the rest float32.
    Also writes `ref_path`: the same model with the experts' dequantized values (for
    transformers). Returns {expert weight name: (q, scale)}."""
    from safetensors.torch import load_file, save_file

    save_hf_checkpoint(model, ref_path)  # rope_scaling as Moonshot's configs write it
    tensors = load_file(str(ref_path / "model.safetensors"))
    packed_out, ref_out, quantized = {}, {}, {}
    for name, t in tensors.items():
        if ".mlp.experts." in name and name.endswith(".weight"):
            q, scale = int4_quantize(t.numpy(), group, bits)
            quantized[name] = (q, scale)
            base = name[: -len("weight")]
            packed_out[base + "weight_packed"] = torch.from_numpy(pack_int32(q, bits))
            packed_out[base + "weight_scale"] = scale
            packed_out[base + "weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            deq = (
                q.astype(np.float32).reshape(q.shape[0], -1, group)
                * scale.float().numpy()[..., None]
            )
            ref_out[name] = torch.from_numpy(deq.reshape(q.shape))
        else:
            packed_out[name] = ref_out[name] = t
    save_file(ref_out, str(ref_path / "model.safetensors"), metadata={"format": "pt"})
    path.mkdir(parents=True, exist_ok=True)
    save_file(packed_out, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = read_config(ref_path)
    qc = json.loads(json.dumps(INT4_CONFIG))
    qc["config_groups"]["group_0"]["weights"].update(num_bits=bits, group_size=group)
    config.update(model_type="kimi_k2", quantization_config=qc)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return quantized


def as_kimi_k25(path: Path) -> None:
    """Turn a saved kimi_k2 / deepseek_v3 checkpoint into K2.5's layout: the config as
    text_config inside a kimi_k25 wrapper (with a vision config), the tensors under
    `language_model.`, plus vision tower / projector tensors."""
    from safetensors.torch import load_file, save_file

    config = read_config(path)
    qc = config.pop("quantization_config", None)
    text = {**config, "model_type": "kimi_k2"}
    wrapper = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": {"patch_size": 14, "hidden_size": 16, "num_hidden_layers": 1},
        "tie_word_embeddings": True,  # the wrapper's default; the text config's value rules
    }
    if qc is not None:
        wrapper["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(wrapper, indent=2))
    tensors = {f"language_model.{k}": v for k, v in load_file(path / "model.safetensors").items()}
    tensors["vision_tower.patch_embed.proj.weight"] = torch.randn(16, 3, 14, 14)
    tensors["mm_projector.proj.0.weight"] = torch.randn(64, 64)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
