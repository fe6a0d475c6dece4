"""The demos' architectures (`train --arch`): the same data, tokenizer recipe and training
loop on DeepSeek-V3's (the `demo` package) or DeepSeek-V4's (`demo-v4`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from .config import CONFIG, SHORT_CONTEXT, count_parameters
from .export import export_hf
from .tokenizer import ADDED, ADDED_V4, CHAT_TEMPLATE, SPECIAL
from .v4 import CONFIG_V4, count_parameters_v4, export_v4


@dataclass(frozen=True)
class Arch:
    name: str  # "v3" | "v4"
    config: dict  # its config.json (the long phase's: YaRN on)
    family: str  # the chat format its conversations are rendered in
    added: list[str]  # the tokenizer's added tokens (reasoning and tool-call markers)
    chat_template: str | None  # the tokenizer's template (V4: none, the formats' encoder)
    package: str  # the name `load()` knows it by
    count_parameters: Callable[[], tuple[int, int, int]]  # (main, MTP, active per token)
    export: Callable[[nn.Module, dict, Any], Any]  # (model, config, folder): DeepSeek's layout

    @property
    def markers(self) -> list[str]:
        return SPECIAL + self.added

    def phase_config(self, long: bool) -> dict:
        """The short phase's config has plain rope over SHORT_CONTEXT; the long one is
        `config` (YaRN: V4 applies it to its compressed layers)."""
        if long:
            return self.config
        cfg = copy.deepcopy(self.config)
        cfg["rope_scaling"] = None
        cfg["max_position_embeddings"] = SHORT_CONTEXT
        return cfg

    def model(self, config: dict) -> nn.Module:
        """The product's model class for `config`, untrained (as checkpoints leave it)."""
        if self.name == "v4":
            from mlx_deepseek.models.deepseek_v4 import Model, ModelArgs
        else:
            from mlx_deepseek.models.config import ModelArgs
            from mlx_deepseek.models.deepseek_v3 import Model
        return Model(ModelArgs.from_dict(config))

    def template_tokenizer(self) -> Any:
        from .tokenizer import TemplateTokenizer

        return TemplateTokenizer(self.chat_template, self.package)


ARCHS = {
    "v3": Arch("v3", CONFIG, "v3.1", ADDED, CHAT_TEMPLATE, "demo", count_parameters, export_hf),
    "v4": Arch("v4", CONFIG_V4, "v4", ADDED_V4, None, "demo-v4", count_parameters_v4, export_v4),
}
