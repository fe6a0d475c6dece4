"""The model architectures, one module per family, and what they share.

- deepseek_v3.py: DeepSeek V2 / V2.5 / Coder-V2 / V3 / R1 / V3.1 (MLA + DeepSeekMoE, MTP)
- deepseek_v4.py: DeepSeek V4 Flash / Pro (shared-KV MQA with window, compressed and sparse
  layers, hash routing, hyper-connections, MTP); v4_attention.py, v4_cache.py, v4_config.py,
  v4_weights.py hold its attention, cache, config and checkpoint mapping
- mla.py: Multi-head Latent Attention with the latent KV cache
- moe.py: DeepSeekMoE (routing, the MoE block, the SwiGLU MLP)
- config.py, rope.py, cache.py: the config fields, RoPE / YaRN, the model's cache

The model code is pure MLX maths: every operation with a faster back-end goes through
mlx_deepseek.ops, which picks the implementation.

`MODEL_TYPES` maps a config's `model_type` to the module of its family; each family module
defines `ModelArgs` (with `from_dict(config, source)`) and `Model(args)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..errors import ConfigError

MODEL_TYPES: dict[str, str] = {
    "deepseek_v2": "deepseek_v3",
    "deepseek_v3": "deepseek_v3",
    "deepseek_v4": "deepseek_v4",
}
FAMILY_NAMES = "DeepSeek V2, V2.5, Coder-V2, V3, R1, V3.1, V4"


def family(model_type: Any, source: str = "config.json") -> ModuleType:
    """The module that implements `model_type`, or ConfigError naming what is supported."""
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not supported; mlx-deepseek runs "
            f"{', '.join(MODEL_TYPES)} ({FAMILY_NAMES})"
        )
    return importlib.import_module(f".{MODEL_TYPES[model_type]}", __name__)


def model_args(config: dict[str, Any], source: str = "config.json") -> Any:
    """The family's validated ModelArgs for a config.json dict."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: not a JSON object")
    return family(config.get("model_type"), source).ModelArgs.from_dict(config, source=source)


def sanitize_weights(args: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """The family's checkpoint mapping (a family module's `sanitize(args, weights)`, else the
    V2/V3 one), without building a model."""
    fn = getattr(family(args.model_type), "sanitize", None)
    if fn is None:
        from .weights import sanitize as fn
    return fn(args, weights)


def build_model(args: Any) -> Any:
    """An (unloaded) model for validated args."""
    return family(args.model_type).Model(args)
