"""Type and range rules for every config.json field the model reads.

config.json is untrusted: a string where a number belongs, a zero size, `"false"` for a
boolean or a list for `rope_scaling` must stop loading with one line naming the field, the
value and what is expected, before any model object is built. Each rule checks one value;
`check_fields` applies them all (ModelArgs.validate then checks how fields relate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

MAX_SIZE = 2**31 - 1  # MLX array dimensions are 32-bit


def show(value: Any, limit: int = 60) -> str:
    """repr(value), shortened: a crafted config may hold a megabyte-long string."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hint(value: Any, want: str) -> str:
    if isinstance(value, str) and want in ("integer", "number", "boolean"):
        return " (a string: write it without quotes)"
    return ""


@dataclass(frozen=True)
class Int:
    low: int = 1
    nullable: bool = False

    def expected(self) -> str:
        text = f"an integer >= {self.low}"
        return text + " or null" if self.nullable else text

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        return type(value) is int and self.low <= value <= MAX_SIZE

    kind = "integer"


@dataclass(frozen=True)
class Number:
    """A finite number (JSON int or float) above `low` (exclusive)."""

    low: float = 0.0

    def expected(self) -> str:
        return f"a number > {self.low:g}"

    def ok(self, value: Any) -> bool:
        return type(value) in (int, float) and math.isfinite(value) and value > self.low

    kind = "number"


@dataclass(frozen=True)
class Bool:
    def expected(self) -> str:
        return "true or false"

    def ok(self, value: Any) -> bool:
        return type(value) is bool

    kind = "boolean"


@dataclass(frozen=True)
class Str:
    choices: tuple[str, ...] = ()
    nullable: bool = False

    def expected(self) -> str:
        text = f"one of {', '.join(map(repr, self.choices))}" if self.choices else "a string"
        return text + " or null" if self.nullable else text

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        return isinstance(value, str) and (not self.choices or value in self.choices)

    kind = "string"


@dataclass(frozen=True)
class Obj:
    def expected(self) -> str:
        return "an object or null"

    def ok(self, value: Any) -> bool:
        return value is None or isinstance(value, dict)

    kind = "object"


Rule = Int | Number | Bool | Str | Obj

FIELDS: dict[str, Rule] = {
    "vocab_size": Int(),
    "hidden_size": Int(),
    "intermediate_size": Int(),
    "moe_intermediate_size": Int(nullable=True),
    "num_hidden_layers": Int(),
    "num_attention_heads": Int(),
    "num_key_value_heads": Int(nullable=True),
    "n_shared_experts": Int(0, nullable=True),
    "n_routed_experts": Int(nullable=True),
    "routed_scaling_factor": Number(),
    "kv_lora_rank": Int(),
    "q_lora_rank": Int(nullable=True),
    "qk_rope_head_dim": Int(),
    "v_head_dim": Int(),
    "qk_nope_head_dim": Int(),
    "topk_method": Str(),
    "scoring_func": Str(),
    "norm_topk_prob": Bool(),
    "n_group": Int(nullable=True),
    "topk_group": Int(nullable=True),
    "num_experts_per_tok": Int(nullable=True),
    "moe_layer_freq": Int(),
    "first_k_dense_replace": Int(0),
    "max_position_embeddings": Int(),
    "rms_norm_eps": Number(),
    "rope_theta": Number(1.0),  # YaRN divides by log(rope_theta)
    "rope_scaling": Obj(),
    "rope_interleave": Bool(),
    "attention_bias": Bool(),
    "tie_word_embeddings": Bool(),
    "num_nextn_predict_layers": Int(0),
    "hidden_act": Str(("silu",)),
    "torch_dtype": Str(nullable=True),
    "quantization": Obj(),
}

# rope_scaling's keys (all optional here; yarn's required ones are checked by validate)
ROPE_FIELDS: dict[str, Rule] = {
    "type": Str(),
    "rope_type": Str(),
    "factor": Number(),
    "original_max_position_embeddings": Int(),
    "beta_fast": Number(),
    "beta_slow": Number(),
    "mscale": Number(-math.inf),
    "mscale_all_dim": Number(-math.inf),
}
QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")  # what mx.quantize takes
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)


def _fail(source: str, name: str, value: Any, rule: Rule) -> ConfigError:
    if type(value) is int and isinstance(rule, Int) and value > MAX_SIZE:
        return ConfigError(
            f"{source}: {name}={value} is too large (MLX sizes are below 2**31): fix config.json"
        )
    return ConfigError(
        f"{source}: {name}={show(value)} is not {rule.expected()}{_hint(value, rule.kind)}"
    )


def check_fields(values: dict[str, Any], source: str) -> None:
    """Each field of `values` (ModelArgs' fields) against its rule, then the insides of
    rope_scaling and quantization. Raises ConfigError on the first bad value."""
    for name, rule in FIELDS.items():
        if name in values and not rule.ok(values[name]):
            raise _fail(source, name, values[name], rule)
    rope = values.get("rope_scaling")
    for key, value in (rope or {}).items():
        rule = ROPE_FIELDS.get(key)
        if rule is not None and value is not None and not rule.ok(value):
            raise _fail(source, f"rope_scaling.{key}", value, rule)
    quant = values.get("quantization")
    if quant is not None:
        check_quantization(quant, source)


def check_quantization(quant: dict[str, Any], source: str) -> None:
    """mlx-lm's `quantization` section: default bits / group size, and per-module
    overrides that are `false` (kept unquantized) or their own {bits, group_size}."""
    rules: dict[str, Rule] = {
        "bits": Int(1),
        "group_size": Int(1),
        "mode": Str(QUANT_MODES),
    }
    for key in ("bits", "group_size"):
        if key not in quant:
            raise ConfigError(f"{source}: quantization has no {key!r}; re-convert the checkpoint")
    for key, value in quant.items():
        if key in rules:
            if not rules[key].ok(value):
                raise _fail(source, f"quantization.{key}", value, rules[key])
            continue
        if isinstance(value, bool):
            continue  # a module quantized with the defaults (true) or kept as is (false)
        if not isinstance(value, dict):
            raise ConfigError(
                f"{source}: quantization.{key}={show(value)} is not false, true or an object "
                "{bits, group_size} (a module's own quantization)"
            )
        for sub in ("bits", "group_size"):
            if not Int(1).ok(value.get(sub)):
                raise _fail(source, f"quantization.{key}.{sub}", value.get(sub), Int(1))
        if "mode" in value and not rules["mode"].ok(value["mode"]):
            raise _fail(source, f"quantization.{key}.mode", value["mode"], rules["mode"])
    for key, value in [("", quant), *((k, v) for k, v in quant.items() if isinstance(v, dict))]:
        if value.get("mode", quant.get("mode", "affine")) != "affine":
            continue  # MLX checks the fp4/fp8 modes' own sizes
        where = f"quantization.{key}." if key else "quantization."
        for sub, allowed in (("bits", AFFINE_BITS), ("group_size", AFFINE_GROUPS)):
            if value[sub] not in allowed:
                raise ConfigError(
                    f"{source}: {where}{sub}={show(value[sub])} is not one of "
                    f"{', '.join(map(str, allowed))} (MLX's affine quantization)"
                )
