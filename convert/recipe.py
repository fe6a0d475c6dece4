"""Quantization recipes: which output module gets which bits and group size.

- `uniform`: every quantizable module at `--bits` / `--group-size`.
- `mixed`: routed experts (~95% of a DeepSeek MoE's weights) at `--bits`; everything every
  token reads (attention incl. embed_q / unembed_out, shared experts, dense layers,
  embeddings, lm_head, MTP's eh_proj) at `high_bits(bits)`.
Both keep norms, the router weight and `e_score_correction_bias` (float32) unquantized,
as does any module whose input dimension the group size does not divide.

The result is written the way mlx-lm writes it (`mlx_lm.utils.quantize_model`): a default
{"group_size", "bits", "mode"} plus one entry per module that differs, holding its own
dict, or `false` for an unquantized module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_deepseek.errors import DeepSeekError

from .layout import QUANTIZABLE_ROLES

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
RECIPES = ("uniform", "mixed")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def high_bits(bits: int) -> int:
    """Bits for the always-read modules in the mixed recipe: 6 up to 4-bit experts, then 8."""
    return 6 if bits <= 4 else 8


@dataclass(frozen=True)
class Recipe:
    name: str
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise DeepSeekError(f"--recipe {self.name}: unknown recipe; use {' or '.join(RECIPES)}")
        if self.bits not in BITS:
            raise DeepSeekError(
                f"--bits {self.bits} is not supported by MLX's affine quantization; use one of "
                f"{', '.join(map(str, BITS))}"
            )
        if self.group_size not in GROUP_SIZES:
            raise DeepSeekError(
                f"--group-size {self.group_size} is not supported; use one of "
                f"{', '.join(map(str, GROUP_SIZES))}"
            )

    @property
    def default(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size)

    def spec(self, role: str, in_dim: int) -> QuantSpec | None:
        """The quantization of a module with this role and input size, or None to keep it."""
        if role not in QUANTIZABLE_ROLES or in_dim % self.group_size:
            return None
        if self.name == "mixed" and role != "routed_expert":
            return QuantSpec(high_bits(self.bits), self.group_size)
        return self.default


def quantization_section(recipe: Recipe, decisions: dict[str, QuantSpec | None]) -> dict[str, Any]:
    """config.json's "quantization" for per-module `decisions` (quantizable modules only)."""
    section: dict[str, Any] = recipe.default.as_config()
    for module, spec in decisions.items():
        if spec is None:
            section[module] = False
        elif spec != recipe.default:
            section[module] = spec.as_config()
    return section
