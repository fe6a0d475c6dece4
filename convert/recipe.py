"""Quantization recipes: which output module gets which bits and group size.

- `uniform`: every quantizable module at `--bits` / `--group-size`.
- `mixed`: routed experts (~95% of a DeepSeek MoE's weights) at `--bits`; everything every
  token reads (attention incl. embed_q / unembed_out, shared experts, dense layers,
  embeddings, lm_head, MTP's eh_proj) at `high_bits(bits)`.
- `native` (FP8 / FP4 checkpoints, DeepSeek V4's release): every weight as it was released,
  without rounding: FP8 e4m3 weights with power-of-two block scales become MLX's `mxfp8`
  (the same e4m3 values, an E8M0 scale per 32), FP4 ones `mxfp4`, floating-point ones stay.
All keep norms, the router weight and `e_score_correction_bias` (float32) unquantized,
as does any module whose input dimension the group size does not divide. Whatever the
recipe, FP4 weights (V4's routed experts: E2M1 values, an E8M0 scale per 32) ARE MLX's
`mxfp4`: they are copied bit for bit, never requantized.

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
RECIPES = ("uniform", "mixed", "native")
SOURCE_FORMATS = ("float", "fp8", "fp4")  # how a weight is stored in the checkpoint


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    @property
    def biases(self) -> bool:
        """Whether the format has biases (affine); MLX's mxfp4 / mxfp8 have none."""
        return self.mode == "affine"


MXFP4 = QuantSpec(4, 32, "mxfp4")
MXFP8 = QuantSpec(8, 32, "mxfp8")


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

    def spec(self, role: str, in_dim: int, source: str = "float") -> QuantSpec | None:
        """The quantization of a module with this role and input size, stored in the
        checkpoint as `source` (one of SOURCE_FORMATS), or None to keep it unquantized."""
        if role not in QUANTIZABLE_ROLES:
            return None
        if source == "fp4":
            return MXFP4
        if self.name == "native":
            return MXFP8 if source == "fp8" and in_dim % MXFP8.group_size == 0 else None
        if in_dim % self.group_size:
            return None
        if self.name == "mixed" and role != "routed_expert":
            return QuantSpec(high_bits(self.bits), self.group_size)
        return self.default


def quantization_section(recipe: Recipe, decisions: dict[str, QuantSpec | None]) -> dict[str, Any]:
    """config.json's "quantization" for per-module `decisions` (quantizable modules only), in
    module order: the same checkpoint converts to the same bytes."""
    section: dict[str, Any] = recipe.default.as_config()
    for module, spec in sorted(decisions.items()):
        if spec is None:
            section[module] = False
        elif spec != recipe.default:
            section[module] = spec.as_config()
    return section
