"""DeepSeek V4's config.json: the official fields and the ones transformers' save_pretrained
writes, resolved to one set (Hugging Face names).

The attention kind of each layer comes from `layer_types` (transformers) or `compress_ratios`
(DeepSeek: 0 = sliding window only, 4 = compressed sparse, other = heavily compressed; the
entries past num_hidden_layers are the MTP layers'); hash routing from `mlp_layer_types` or
`num_hash_layers`; RoPE from `rope_scaling` (official) or transformers' nested
`rope_parameters` {main, compress}. YaRN applies to the compressed layers only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .cache import latent_bytes_per_token, latent_group_size

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
DEFAULT_RATES = {CSA: 4, HCA: 128}
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
DEFAULT_HASH_LAYERS = 3


@dataclass
class ModelArgs:
    """The fields of a DeepSeek V4 `config.json` this port uses (Hugging Face names).

    Unknown fields are ignored; impossible values raise ConfigError naming the field.
    `layer_types` covers the main layers and then the MTP layers.
    """

    model_type: str = "deepseek_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN of the compressed layers, or None
    layer_types: list[str] = field(default_factory=list)
    compress_rates: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_RATES))
    hash_layers: list[bool] = field(default_factory=list)
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    torch_dtype: str | None = None
    quantization: dict[str, Any] | None = field(default=None, repr=False)  # MLX's section
    quantization_config: dict[str, Any] | None = field(default=None, repr=False)  # DeepSeek's

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Build from a V4 config dict, official or transformers-written."""
        config = dict(config)
        if config.get("model_type") != "deepseek_v4":
            raise ConfigError(f"{source}: model_type={config.get('model_type')!r} is not V4")
        n = config.get("num_hidden_layers")
        if not isinstance(n, int) or n <= 0:
            raise ConfigError(f"{source}: num_hidden_layers={n!r} must be a positive integer")
        n_mtp = config.get("num_nextn_predict_layers", 1)
        if not isinstance(n_mtp, int) or n_mtp < 0:
            raise ConfigError(f"{source}: num_nextn_predict_layers={n_mtp!r} must be >= 0")
        config["layer_types"], config["compress_rates"] = _layer_types(config, n, n_mtp, source)
        config["hash_layers"] = _hash_layers(config, n, source)
        _resolve_rope(config, source)
        if config.get("dtype") and not config.get("torch_dtype"):
            config["torch_dtype"] = config["dtype"]
        names = {f.name for f in dataclasses.fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in names})
        args.validate(source)
        return args

    # ---- derived values ------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The model_type the checkpoint's config.json gives (as V2/V3's ModelArgs.label)."""
        return self.model_type

    def layer_type(self, index: int) -> str:
        """The attention kind of layer `index` (main layers, then the MTP layers)."""
        return self.layer_types[index] if index < len(self.layer_types) else SLIDING

    def compress_ratio(self, index: int) -> int:
        kind = self.layer_type(index)
        return 0 if kind == SLIDING else self.compress_rates[kind]

    def is_hash_layer(self, index: int) -> bool:
        return index < len(self.hash_layers) and self.hash_layers[index]

    def cache_values_per_token(self) -> int:
        """Values the main layers' compressed caches grow by per token (the windows are
        bounded: see window_values): 512/4 + 128/4 in a compressed sparse layer, 512/128 in a
        heavily compressed one, as fractions (Flash: 3,440)."""
        total = 0.0
        for i in range(self.num_hidden_layers):
            ratio = self.compress_ratio(i)
            if ratio:
                total += self.head_dim / ratio
                if self.layer_type(i) == CSA:
                    total += self.index_head_dim / ratio
        return round(total)

    def window_values(self, layers: int | None = None) -> int:
        """Values the sliding windows hold once full, in all main layers."""
        layers = self.num_hidden_layers if layers is None else layers
        return layers * self.sliding_window * self.head_dim

    def cache_bytes(self, context: int, dtype_size: int = 2, kv_bits: int | None = None) -> int:
        """Cache bytes of all layers (MTP included) for `context` tokens; kv_bits: the
        compressed rows quantized (their non-RoPE channels in groups: kv_group_size)."""
        row = latent_bytes_per_token(
            self.head_dim - self.qk_rope_head_dim,
            self.qk_rope_head_dim,
            dtype_size,
            kv_bits,
            None if kv_bits is None else self.kv_group_size(),
        )
        total = 0
        for i in range(self.num_hidden_layers + self.num_nextn_predict_layers):
            total += min(context, self.sliding_window) * self.head_dim * dtype_size
            ratio = self.compress_ratio(i)
            if ratio:
                total += (context // ratio) * row
                if self.layer_type(i) == CSA:
                    total += (context // ratio) * self.index_head_dim * dtype_size
        return total

    def kv_group_size(self) -> int:
        """The quantization group size along the compressed rows' non-RoPE channels
        (DeepSeekError when MLX cannot group them)."""
        body = self.head_dim - self.qk_rope_head_dim
        return latent_group_size(body, what="head_dim - qk_rope_head_dim")

    # ---- validation ----------------------------------------------------------------------

    def validate(self, source: str = "config.json") -> None:
        def bad(field_name: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {field_name}={getattr(self, field_name)!r} {why}")

        for name in (
            "vocab_size",
            "hidden_size",
            "moe_intermediate_size",
            "num_attention_heads",
            "head_dim",
            "qk_rope_head_dim",
            "q_lora_rank",
            "num_experts_per_tok",
            "n_routed_experts",
            "hc_mult",
            "hc_sinkhorn_iters",
            "sliding_window",
            "o_groups",
            "o_lora_rank",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.num_key_value_heads != 1:
            raise bad("num_key_value_heads", "must be 1 (V4 attention shares one K=V head)")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise bad("qk_rope_head_dim", f"must be even and at most head_dim={self.head_dim}")
        if self.qk_rope_head_dim > self.index_head_dim:
            raise bad("qk_rope_head_dim", f"exceeds index_head_dim={self.index_head_dim}")
        if self.num_attention_heads % self.o_groups:
            raise bad("o_groups", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"exceeds n_routed_experts={self.n_routed_experts}")
        if self.n_shared_experts != 1:
            raise bad("n_shared_experts", "must be 1 (every V4 MoE layer has one shared expert)")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"must be one of {', '.join(SCORING_FUNCS)}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "is not supported; DeepSeek V4 uses silu")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "is not supported: V4 has its own head")
        for kind, rate in self.compress_rates.items():
            if kind not in (CSA, HCA) or not isinstance(rate, int) or rate < 1:
                raise ConfigError(
                    f"{source}: compress_rates[{kind!r}]={rate!r} must be a positive integer "
                    f"for {CSA} or {HCA}"
                )
        if self.rope_scaling is not None:
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ConfigError(f"{source}: rope_scaling is missing {key!r} (needed by yarn)")


def _layer_types(
    config: dict[str, Any], n: int, n_mtp: int, source: str
) -> tuple[list[str], dict[str, int]]:
    """Per layer (main, then MTP) attention kinds, and the ratio of each compressed kind."""
    rates = dict(DEFAULT_RATES)
    given_rates = config.get("compress_rates")
    if given_rates is not None:
        if not isinstance(given_rates, dict):
            raise ConfigError(f"{source}: compress_rates={given_rates!r} must be an object")
        rates.update(given_rates)
    for kind, key in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
        if config.get(key) is not None:
            rates[kind] = config[key]
    ratios = config.get("compress_ratios")
    kinds_from_ratios: list[str] = []
    if ratios is not None:
        if not isinstance(ratios, list) or not all(isinstance(r, int) and r >= 0 for r in ratios):
            raise ConfigError(f"{source}: compress_ratios must be a list of integers >= 0")
        heavy = {r for r in ratios if r not in (0, 4)}
        if len(heavy) > 1:
            raise ConfigError(
                f"{source}: compress_ratios mixes heavy ratios {sorted(heavy)}; one is supported"
            )
        rates[CSA] = 4
        if heavy:
            rates[HCA] = heavy.pop()
        kinds_from_ratios = [SLIDING if r == 0 else CSA if r == 4 else HCA for r in ratios]
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) < n:
            raise ConfigError(
                f"{source}: layer_types has {len(types) if isinstance(types, list) else 0} "
                f"entries, num_hidden_layers={n} needs one per layer"
            )
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(
                f"{source}: layer_types entry {bad[0]!r} is not one of {', '.join(LAYER_TYPES)}"
            )
        main = list(types[:n])
    elif ratios is not None:
        if len(ratios) < n:
            raise ConfigError(
                f"{source}: compress_ratios has {len(ratios)} entries, num_hidden_layers={n} "
                "needs one per layer"
            )
        main = kinds_from_ratios[:n]
    else:  # transformers' default: two heavily compressed layers, then sparse / heavy in turn
        main = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    extra = kinds_from_ratios[n:]
    mtp = [extra[j] if j < len(extra) else SLIDING for j in range(n_mtp)]
    return main + mtp, rates


def _hash_layers(config: dict[str, Any], n: int, source: str) -> list[bool]:
    types = config.get("mlp_layer_types")
    if types is not None:
        if not isinstance(types, list) or any(t not in ("hash_moe", "moe") for t in types):
            raise ConfigError(f"{source}: mlp_layer_types entries must be 'hash_moe' or 'moe'")
        return [t == "hash_moe" for t in types[:n]]
    count = config.get("num_hash_layers", DEFAULT_HASH_LAYERS)
    if not isinstance(count, int) or count < 0:
        raise ConfigError(f"{source}: num_hash_layers={count!r} must be an integer >= 0")
    return [i < count for i in range(n)]


def _resolve_rope(config: dict[str, Any], source: str) -> None:
    """Fill rope_theta, compress_rope_theta, rope_scaling (YaRN or None) and qk_rope_head_dim
    from whichever form the config uses."""
    params = config.pop("rope_parameters", None) or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        main, compress = params["main"], dict(params["compress"])
        if "rope_theta" in main:
            config["rope_theta"] = main["rope_theta"]
        if "rope_theta" in compress:
            config["compress_rope_theta"] = compress.pop("rope_theta")
        factor = main.get("partial_rotary_factor") or compress.get("partial_rotary_factor")
        if factor and not config.get("qk_rope_head_dim"):
            config["partial_rotary_factor"] = factor
        scaling = compress
    else:
        scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "yarn":
        config["rope_scaling"] = {
            k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")
        }
    elif kind == "default":
        config["rope_scaling"] = None
    else:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (default or yarn)")
    if not config.get("qk_rope_head_dim"):
        factor = config.get("partial_rotary_factor")
        head_dim = config.get("head_dim", 512)
        config["qk_rope_head_dim"] = int(head_dim * factor) if factor else 64
