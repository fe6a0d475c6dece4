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
        index_n_heads=16,
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
        index_n_heads=16,
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
        index_n_heads=12,
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
            "original_max_position_embeddings": 256,
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


# ---- DeepSeek's own layout (FP8 / FP4) and the MTP layer ------------------------------------

FP4_VALUES = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32
)
FP8_NAMES = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "e_proj", "h_proj")


def _official_name(name: str) -> str:
    """transformers' saved name -> DeepSeek's (the checkpoint on the hub)."""
    body = name[len("model.") :] if name.startswith("model.") else name
    top = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn"}
    top |= {"hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
    return top.get(body, body)


def _is_fp8(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    return name.endswith(".weight") and (
        leaf[-2] in FP8_NAMES or ".shared_experts." in name or ".indexer.wq_b." in name
    )


def encode_fp8(w: np.ndarray, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """float [R, C] -> (e4m3 weight, ue8m0 scale per block x block, its float32 decoding)."""
    R, C = w.shape
    nr, nc = -(-R // block), -(-C // block)
    exps = np.zeros((nr, nc), np.int32)
    out = np.zeros_like(w, dtype=np.float32)
    codes = torch.zeros((R, C), dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            e = int(np.ceil(np.log2(max(np.abs(tile).max(), 1e-30) / 448.0)))
            q = torch.from_numpy(tile / 2.0**e).to(torch.float8_e4m3fn)
            codes[i * block : (i + 1) * block, j * block : (j + 1) * block] = q
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] = (
                q.float().numpy() * 2.0**e
            )
            exps[i, j] = e
    scale = torch.from_numpy((exps + 127).astype(np.uint8)).view(torch.float8_e8m0fnu)
    return codes, scale, out


def encode_fp4(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """float [R, C] -> (e2m1 int8 [R, C/2] low nibble first, E8M0 [R, C/32], float32 decoding)."""
    R, C = w.shape
    groups = w.reshape(R, C // 32, 32)
    e = np.ceil(np.log2(np.maximum(np.abs(groups).max(-1), 1e-30) / 6.0)).astype(np.int32)
    scaled = groups / 2.0 ** e[..., None]
    codes = np.abs(scaled[..., None] - FP4_VALUES).argmin(-1).astype(np.uint8).reshape(R, C)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    decoded = FP4_VALUES[codes].reshape(R, C // 32, 32) * 2.0 ** e[..., None]
    scale = torch.from_numpy((e + 127).astype(np.uint8)).view(torch.float8_e8m0fnu)
    return torch.from_numpy(packed.view(np.int8)), scale, decoded.reshape(R, C)


def mtp_tensors(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random MTP layer tensors (DeepSeek's names `mtp.0.*`), shaped by our own model."""
    from mlx.utils import tree_flatten

    from mlx_deepseek.models.deepseek_v4 import Model, ModelArgs

    args = ModelArgs.from_dict(config)
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in tree_flatten(Model(args).mtp[0].parameters()):
        shape = tuple(p.shape)
        if name.endswith("tid2eid"):
            continue
        if "switch_mlp" in name:
            proj = name.split(".")[-2]
            w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
            for e in range(shape[0]):
                value = rng.standard_normal(shape[1:]) / shape[-1] ** 0.5
                out[f"mtp.0.ffn.experts.{e}.{w}.weight"] = value.astype(np.float32)
            continue
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("hc_scale") or name.endswith("_scale"):
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 0.5 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / shape[-1] ** 0.5
        name = name.replace("norm.hc_", "hc_head_")
        for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            name = name.replace(f"shared_experts.{proj}.", f"shared_experts.{w}.")
        out[f"mtp.0.{name}"] = value.astype(np.float32)
    return out


def write_official(
    src: Path, dst: Path, quantize: bool, mtp_seed: int | None = None, mtp_ratio: int = 0
) -> dict[str, np.ndarray]:
    """DeepSeek's layout of a transformers-saved checkpoint (+ a random MTP layer of attention
    ratio `mtp_ratio`): config.json with compress_ratios / num_hash_layers / rope_scaling,
    FP8 linears and FP4 routed experts when `quantize`. Returns every tensor as the float32
    values the checkpoint encodes."""
    import json

    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    tensors = {_official_name(k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    rates = config.pop("compress_rates")
    kinds = config.pop("layer_types")
    ratios = [0 if k == SLIDING else rates[k] for k in kinds]
    if mtp_seed is not None:
        ratios.append(mtp_ratio)
    params = config.pop("rope_parameters")
    config |= {
        "compress_ratios": ratios,
        "num_hash_layers": sum(t == "hash_moe" for t in config.pop("mlp_layer_types")),
        "rope_theta": params["main"]["rope_theta"],
        "compress_rope_theta": params["compress"]["rope_theta"],
        "rope_scaling": {
            k: v
            for k, v in params["compress"].items()
            if k not in ("rope_theta", "partial_rotary_factor", "attention_factor")
        },
        "num_nextn_predict_layers": 1 if mtp_seed is not None else 0,
        "qk_rope_head_dim": config["qk_rope_head_dim"],
    }
    config.pop("partial_rotary_factor")
    if mtp_seed is not None:
        config["model_type"] = "deepseek_v4"
        tensors |= mtp_tensors(config, mtp_seed)
    if quantize:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        }
    out, values = {}, {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if quantize and ".experts." in name and name.endswith(".weight"):
            w, s, values[name] = encode_fp4(value.astype(np.float32))
            out[name], out[name[: -len("weight")] + "scale"] = w, s
        elif quantize and _is_fp8(name):
            w, s, values[name] = encode_fp8(value.astype(np.float32))
            out[name], out[name[: -len("weight")] + "scale"] = w, s
        else:
            out[name] = torch.from_numpy(value.copy())
            values[name] = value
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return values


def _transformers_name(name: str) -> str:
    if name.startswith("layers.") or name.startswith("norm."):
        return f"model.{name}"
    top = {"embed.weight": "model.embed_tokens.weight", "hc_head_fn": "model.hc_head.hc_fn"}
    top |= {"hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
    return top.get(name, name)


def transformers_oracle(
    src: Path, values: dict[str, np.ndarray], dst: Path, mtp_ratio: int | None = None
):
    """transformers' model over the float values of a DeepSeek-layout checkpoint (`src`'s
    transformers config). With mtp_ratio: one more layer, the MTP block (that attention
    ratio), whose collapse and norm replace the head's, so that the model's last layer +
    head compute the MTP module."""
    mtp = mtp_ratio is not None
    import json

    from safetensors.torch import save_file
    from transformers import DeepseekV4ForCausalLM

    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    tensors = {}
    for name, value in values.items():
        if name.startswith("mtp."):
            if not mtp:
                continue
            local = name[len("mtp.0.") :]
            if local.split(".")[0] in ("e_proj", "h_proj", "enorm", "hnorm"):
                continue
            name = (
                local
                if local == "norm.weight" or local.startswith("hc_head")
                else (f"layers.{n}.{local}")
            )
        tensors[_transformers_name(name)] = torch.from_numpy(np.array(value, np.float32))
    if mtp:
        kind = {0: SLIDING, 4: CSA}.get(mtp_ratio, HCA)
        config["num_hidden_layers"] = n + 1
        config["layer_types"] = config["layer_types"] + [kind]
        config["mlp_layer_types"] = config["mlp_layer_types"] + ["moe"]
    for k, v in tensors.items():
        if k.endswith("tid2eid"):
            tensors[k] = v.long()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return DeepseekV4ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()


@torch.no_grad()
def boundary_ties(model, tokens) -> list[tuple[int, int, int]]:
    """(layer, batch row, position) where transformers' indexer has to choose between equal
    scores at its top-k boundary (torch and MLX may then keep different rows)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Indexer

    found, hooks = [], []
    for i, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if isinstance(module, DeepseekV4Indexer):

                def hook(mod, args, out, i=i, k=module.index_topk, r=module.compress_rate):
                    scores = out.numpy()  # [B, S, T]
                    for b in range(scores.shape[0]):
                        for p in range(scores.shape[1]):
                            v = np.sort(scores[b, p, : (p + 1) // r])[::-1]
                            if len(v) > k and v[k - 1] == v[k]:
                                found.append((i, b, p))

                hooks.append(module.scorer.register_forward_hook(hook))
    model(torch.tensor(np.asarray(tokens)))
    for h in hooks:
        h.remove()
    return found
