"""Model configuration: Hugging Face `config.json` fields for DeepSeek V2 / V3."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..safetensors_check import json_type
from .config_fields import check_fields, show

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
# What a config that leaves a field out (or null) means, per model_type: DeepSeek's and
# transformers' V2 classes route by softmax + greedy (V3's: the dataclass defaults below).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False},
}
# DeepSeek's own V2 configuration class spells its default "gready"
TOPK_ALIASES = {"gready": "greedy"}


@dataclass
class ModelArgs:
    """The fields of a DeepSeek `config.json` this port uses (Hugging Face names).

    Unknown fields are ignored; impossible values raise ConfigError naming the field.
    """

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    n_group: int | None = 1
    topk_group: int | None = 1
    num_experts_per_tok: int | None = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    torch_dtype: str | None = None
    quantization: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Build from a config dict (`rope_scaling`, or transformers 5's `rope_parameters`)."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: holds a JSON {json_type(config)}, not an object")
        config = dict(config)
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            from . import family

            family(model_type, source)  # raises, naming what is supported
            raise ConfigError(
                f"{source}: model_type={show(model_type)} is not a DeepSeek V2/V3 model"
            )
        for key, value in FAMILY_DEFAULTS.get(model_type, {}).items():
            if config.get(key) is None:
                config[key] = value
        if isinstance(config.get("topk_method"), str):
            config["topk_method"] = TOPK_ALIASES.get(config["topk_method"], config["topk_method"])
        required = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "kv_lora_rank",
            "intermediate_size",
        )
        missing = [k for k in required if config.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")

        # transformers 5 stores rope settings as `rope_parameters` (with rope_theta inside)
        params = config.pop("rope_parameters", None)
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters={show(params)} is not an object or null")
        if params and not config.get("rope_scaling"):
            params = dict(params)
            if "rope_theta" in params:
                config.setdefault("rope_theta", params.pop("rope_theta"))
            if params.get("rope_type", params.get("type", "default")) != "default":
                config["rope_scaling"] = params
        if config.get("dtype") and not config.get("torch_dtype"):
            config["torch_dtype"] = config["dtype"]

        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        check_fields(values, source)  # types first: the dataclass takes anything
        args = cls(**values)
        args.validate(source)
        return args

    # ---- derived values ------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5 times YaRN's mscale correction m*m (deepseek-facts.md)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type != "default":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            factor = self.rope_scaling.get("factor", 1.0)
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def is_moe_layer(self, index: int) -> bool:
        return (
            self.n_routed_experts is not None
            and index >= self.first_k_dense_replace
            and index % self.moe_layer_freq == 0
        )

    # ---- validation ----------------------------------------------------------------------

    def validate(self, source: str = "config.json") -> None:
        """Each field's type and range (config_fields), then how the fields fit together."""

        def bad(field_name: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: {field_name}={show(getattr(self, field_name))} {why}")

        check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, source)
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if not self.rope_interleave:
            raise bad("rope_interleave", "is not supported: DeepSeek's RoPE is interleaved")
        if self.rope_type not in ("default", "yarn"):
            raise ConfigError(
                f"{source}: rope_scaling type {show(self.rope_type)} is not supported "
                "(default or yarn)"
            )
        if self.rope_type == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if self.rope_scaling.get(key) is None:
                    raise ConfigError(f"{source}: rope_scaling is missing {key!r} (needed by yarn)")
        if self.n_routed_experts is None:
            return
        if self.moe_intermediate_size is None:
            raise bad("moe_intermediate_size", "must be a positive integer (the experts' size)")
        k = self.num_experts_per_tok
        if k is None or not (0 < k <= self.n_routed_experts):
            raise bad(
                "num_experts_per_tok", f"must be in 1..n_routed_experts={self.n_routed_experts}"
            )
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"must be one of {', '.join(TOPK_METHODS)}")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"must be one of {', '.join(SCORING_FUNCS)}")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise bad("scoring_func", "must be sigmoid with topk_method=noaux_tc")
        if self.topk_method == "greedy" and self.scoring_func != "softmax":
            raise bad("scoring_func", f"must be softmax with topk_method={self.topk_method}")
        if self.topk_method == "group_limited_greedy" and self.scoring_func != "softmax":
            raise bad("scoring_func", f"must be softmax with topk_method={self.topk_method}")
        if self.topk_method != "greedy":
            n_group = self.n_group or 1
            if self.n_routed_experts % n_group:
                raise ConfigError(
                    f"{source}: n_group={n_group} does not divide "
                    f"n_routed_experts={self.n_routed_experts}"
                )
            topk_group = self.topk_group or 1
            if not (0 < topk_group <= n_group):
                raise bad("topk_group", f"must be in 1..n_group={n_group}")
            per_group = self.n_routed_experts // n_group
            if self.topk_method == "noaux_tc" and n_group > 1 and per_group < 2:
                raise bad(
                    "n_group", "leaves fewer than 2 experts per group (noaux_tc sums the top 2)"
                )
            if k > topk_group * per_group:
                raise bad(
                    "num_experts_per_tok",
                    f"exceeds the {topk_group * per_group} experts left by topk_group={topk_group}",
                )
