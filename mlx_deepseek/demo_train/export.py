"""Write a trained Model in DeepSeek's own Hugging Face layout.

Exactly what a DeepSeek-V3 checkpoint looks like, in float32: config.json, sharded
safetensors with model.safetensors.index.json, per-expert tensors
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``, the un-split
``self_attn.kv_b_proj.weight`` [H*(nope+v), kv_lora_rank], the router's
``e_score_correction_bias``, and the MTP module as layer ``num_hidden_layers`` with its own
``embed_tokens`` and ``shared_head.head`` copies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_deepseek.models.deepseek_v3 import Model

# Both demos sample at 0.6 / 0.95 (V3.1's card), demo-v4 included: V4's own 1.0 / 1.0 lets a
# 1.5 MB model's noisy tail through ("23 + 45 = 69." now and then at 1.0).
GENERATION_CONFIG = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
}


def hf_tensors(model: Model) -> dict[str, mx.array]:
    """The model's parameters under DeepSeek's Hugging Face names."""
    n_main = model.args.num_hidden_layers
    params = dict(tree_flatten(model.parameters()))
    out: dict[str, mx.array] = {}
    for name, value in params.items():
        hf = name
        if name.startswith("mtp."):
            j, rest = name[len("mtp.") :].split(".", 1)
            hf = f"model.layers.{n_main + int(j)}.{rest}"
        if ".self_attn.embed_q." in name:
            w_uk = value.swapaxes(-1, -2)  # [H, nope, rank]
            w_uv = params[name.replace(".embed_q.", ".unembed_out.")]  # [H, v, rank]
            kv_b = mx.concatenate([w_uk, w_uv], axis=1)  # [H, nope + v, rank]
            out[hf.replace(".embed_q.", ".kv_b_proj.")] = kv_b.reshape(-1, kv_b.shape[-1])
        elif ".self_attn.unembed_out." in name:
            continue  # folded into kv_b_proj above
        elif ".mlp.switch_mlp." in name:
            prefix, proj = hf.split(".switch_mlp.")
            proj = proj.split(".")[0]
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{proj}.weight"] = value[e]
        else:
            out[hf] = value
    # DeepSeek's MTP layer carries its own copies of the embedding and the output head.
    for j in range(len(model.mtp)):
        layer = f"model.layers.{n_main + j}"
        out.setdefault(f"{layer}.embed_tokens.weight", params["model.embed_tokens.weight"])
        out.setdefault(f"{layer}.shared_head.head.weight", params["lm_head.weight"])
    return out


def export_hf(model: Model, config: dict, out: Path) -> None:
    """Write config.json and two safetensors shards (main layers; the MTP layer) + index into
    `out`, which already holds the tokenizer files."""
    tensors = {k: v.astype(mx.float32) for k, v in hf_tensors(model).items()}
    mtp_prefix = f"model.layers.{model.args.num_hidden_layers}."
    write_shards(tensors, lambda k: k.startswith(mtp_prefix), config, out)


def write_shards(
    tensors: dict[str, mx.array], is_mtp: Callable[[str], bool], config: dict, out: Path
) -> None:
    """config.json, generation_config.json and the tensors in two shards (the main model;
    the MTP layers) with model.safetensors.index.json."""
    out.mkdir(parents=True, exist_ok=True)
    shards = [
        {k: v for k, v in tensors.items() if not is_mtp(k)},
        {k: v for k, v in tensors.items() if is_mtp(k)},
    ]
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = dict(sorted(shard.items()))
        mx.save_safetensors(str(out / fname), shard, metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
