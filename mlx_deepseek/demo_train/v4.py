"""The V4 demo (`train --arch v4`): DeepSeek V4's architecture at the demo's size, its
training-time start and caches, and DeepSeek's own checkpoint layout for the export.

The model is the product's `mlx_deepseek.models.deepseek_v4.Model`, trained through its
inference path: every step runs the rows through fresh caches (one prefill), exactly the
math `generate` runs. The caches also collect the lightning indexer's loss (its KL to the
main attention, v4_attention.indexer_loss): the indexer's top-k is a choice, so nothing else
trains it.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_deepseek.models.deepseek_v4 import Model
from mlx_deepseek.models.v4_cache import V4Cache
from mlx_deepseek.models.v4_config import CSA, HCA, SLIDING

from .config import CONFIG, MAX_CONTEXT

VOCAB_SIZE = 768
# one window-only layer (hash-routed), one compressed sparse (ratio 4, the indexer's top-k),
# one heavily compressed (ratio 16: 64 rows at 1,024 tokens); the MTP layer window-only.
# transformers' field names (its config class knows only DeepSeek's ratio 128 in
# `compress_ratios`, and AutoTokenizer reads config.json)
LAYER_TYPES = [SLIDING, CSA, HCA]
COMPRESS_RATES = {CSA: 4, HCA: 16}

CONFIG_V4: dict = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 80,
    "qk_rope_head_dim": 16,
    "q_lora_rank": 64,
    "o_groups": 2,
    "o_lora_rank": 64,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "num_hash_layers": 1,
    "layer_types": LAYER_TYPES,
    "compress_rates": COMPRESS_RATES,
    "sliding_window": 64,
    "index_n_heads": 4,
    "index_head_dim": 32,
    "index_topk": 16,
    "hc_mult": 2,
    "hc_sinkhorn_iters": 10,
    "hc_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": MAX_CONTEXT,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    # the V3 demo's YaRN (V4 applies it to the compressed layers; no attention scale)
    "rope_scaling": {k: v for k, v in CONFIG["rope_scaling"].items() if "mscale" not in k},
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}


def init_model(model: Model, seed: int = 0) -> Model:
    """A trainable start: the model class holds zeros where checkpoints fill in values. The
    routers get a Linear layer's random start, the hyper-connections small random mixes (all
    zeros would keep the copies identical forever), the hash layers a random balanced
    token -> experts table."""
    rng = mx.random.key(seed)
    updates = []
    for name, p in tree_flatten(model.parameters()):
        rng, k = mx.random.split(rng)
        if name.endswith("ffn.gate.weight"):
            updates.append((name, mx.random.uniform(-1, 1, p.shape, key=k) / math.sqrt(p.shape[1])))
        elif name.endswith("_fn"):  # hc_{attn,ffn}_fn, norm.hc_fn [mix, hc * D]
            updates.append((name, 0.5 * mx.random.normal(p.shape, key=k) / math.sqrt(p.shape[1])))
        elif name.endswith("tid2eid"):
            vocab, top_k = p.shape
            E = model.args.n_routed_experts
            order = mx.argsort(mx.random.uniform(shape=(vocab, E), key=k), axis=-1)
            updates.append((name, order[:, :top_k].astype(mx.int32)))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    return model


def training_cache(model) -> V4Cache | None:
    """Fresh caches for one training forward that collect the indexer's loss (None for the
    V3 demo, which trains without a cache)."""
    if model.model_type != "deepseek_v4":
        return None
    cache = model.make_cache()
    for c in [*cache, *cache.mtp]:
        c.index_losses = []
    return cache


def index_loss(cache: V4Cache | None) -> mx.array:
    """The mean of the indexer losses a training forward collected (0 without any)."""
    losses = [] if cache is None else [x for c in [*cache, *cache.mtp] for x in c.index_losses]
    return sum(losses) / len(losses) if losses else mx.array(0.0)


# ---- DeepSeek's checkpoint layout ----------------------------------------------------------

_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.norm.hc_fn": "hc_head_fn",
    "model.norm.hc_base": "hc_head_base",
    "model.norm.hc_scale": "hc_head_scale",
}
_SHARED = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def official_tensors(model: Model) -> dict[str, mx.array]:
    """The model's parameters under DeepSeek V4's own names (what v4_weights reads back):
    `embed`, `head`, `hc_head_*`, `layers.N.*` and `mtp.J.*` with per-expert w1 / w2 / w3."""
    out: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        if name in _TOP:
            out[_TOP[name]] = value
            continue
        hf = name.removeprefix("model.").replace(".norm.hc_", ".hc_head_")
        for proj, w in _SHARED.items():
            hf = hf.replace(f"shared_experts.{proj}.", f"shared_experts.{w}.")
        if ".ffn.switch_mlp." in hf:
            prefix, proj = hf.split(".switch_mlp.")
            w = _SHARED[proj.split(".")[0]]
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{w}.weight"] = value[e]
        else:
            out[hf] = value
    return out


def export_v4(model: Model, config: dict, out: Path) -> dict[str, mx.array]:
    """config.json and the float32 weights (the hash tables int32) in DeepSeek's layout;
    `out` already holds the tokenizer files."""
    from .export import write_shards

    tensors = {
        k: v if v.dtype == mx.int32 else v.astype(mx.float32)
        for k, v in official_tensors(model).items()
    }
    write_shards(tensors, lambda k: k.startswith("mtp."), config, out)
    return tensors


def count_parameters_v4(cfg: dict = CONFIG_V4) -> tuple[int, int, int]:
    """(main model total, MTP module, active per token in the main model), as
    config.count_parameters; counted on the model itself (the hash tables included)."""
    from mlx_deepseek.models.deepseek_v4 import ModelArgs

    model = Model(ModelArgs.from_dict(cfg))
    sizes = {name: p.size for name, p in tree_flatten(model.parameters())}
    mtp = sum(n for name, n in sizes.items() if name.startswith("mtp."))
    total = sum(sizes.values()) - mtp
    idle = cfg["n_routed_experts"] - cfg["num_experts_per_tok"]
    expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    return total, mtp, total - cfg["num_hidden_layers"] * idle * expert
