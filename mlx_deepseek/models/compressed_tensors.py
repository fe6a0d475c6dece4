"""compressed-tensors' pack-quantized integer weights (Kimi K2-Thinking / K2.5's INT4) as
MLX's affine quantization, without requantizing.

The format (compressed-tensors, `pack_to_int32`): a symmetric integer q in
[-2^(b-1), 2^(b-1) - 1] per weight, stored as u = q + 2^(b-1) in b bits, 32/b of them per
int32 along the input dimension, lowest bits first (`weight_packed` [out, in*b/32]); one
scale s per `group_size` inputs (`weight_scale` [out, in/group]); the unpacked shape in
`weight_shape` [2]. The weight is w = s * q.

MLX's affine b-bit format packs u the same way into uint32 words and computes
w = scale * u + bias, so scale = s and bias = -2^(b-1) * s give w = s * (u - 2^(b-1)) = s * q:
the packed words are reused bit for bit, and bias is exact in any float format (a power of
two times s). What is not exact: a computation in bfloat16 rounds s * u before adding the
bias (float32 computes s * q exactly); float16 cannot hold every bfloat16 scale (so
`convert` refuses --dtype float16 for such tensors); asymmetric schemes (zero points),
activation reordering (g_idx) and activation quantization have no MLX counterpart and are
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..errors import CheckpointError, ConfigError

PACKED, SCALE, SHAPE = "weight_packed", "weight_scale", "weight_shape"
BITS = (2, 4, 8)  # packings that MLX's affine format shares bit for bit
GROUP_SIZES = (32, 64, 128)
_UNSUPPORTED = ("weight_zero_point", "weight_g_idx")


@dataclass(frozen=True)
class PackedFormat:
    bits: int
    group_size: int

    @property
    def offset(self) -> int:
        """u - q: the unsigned storage offset, 2^(bits-1)."""
        return 1 << (self.bits - 1)


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's quantization_config (Kimi K2.5 may keep it in text_config)."""
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    return qc if isinstance(qc, dict) else None


def packed_format(config: dict[str, Any], source: str = "config.json") -> PackedFormat | None:
    """The pack-quantized weight format config.json declares, or None when it declares none;
    ConfigError (one line) for a compressed-tensors scheme MLX cannot hold exactly."""
    qc = quantization_config(config)
    if qc is None or qc.get("quant_method") != "compressed-tensors":
        return None
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{source}: quantization_config has no config_groups")
    found = set()
    for name, group in groups.items():
        where = f"{source}: quantization_config.config_groups.{name}"
        fmt = group.get("format") or qc.get("format")
        w = group.get("weights") or {}
        if fmt != "pack-quantized":
            raise ConfigError(f"{where}: format {fmt!r} is not supported (pack-quantized is)")
        if group.get("input_activations") or group.get("output_activations"):
            raise ConfigError(f"{where}: activation quantization is not supported (weights only)")
        checks = (
            (w.get("type") == "int", f"type={w.get('type')!r} (int is supported)"),
            (w.get("symmetric") is True, "symmetric=false (zero points have no exact MLX form)"),
            (w.get("strategy") == "group", f"strategy={w.get('strategy')!r} (group is supported)"),
            (not w.get("actorder"), f"actorder={w.get('actorder')!r} (reordered columns)"),
            (w.get("num_bits") in BITS, f"num_bits={w.get('num_bits')!r} (supported: 2, 4, 8)"),
            (
                w.get("group_size") in GROUP_SIZES,
                f"group_size={w.get('group_size')!r} (supported: 32, 64, 128)",
            ),
        )
        for ok, why in checks:
            if not ok:
                raise ConfigError(f"{where}.weights: {why} cannot be converted exactly")
        found.add((w["num_bits"], w["group_size"]))
    if len(found) > 1:
        raise ConfigError(
            f"{source}: quantization_config mixes schemes {sorted(found)}; one is supported"
        )
    bits, group_size = found.pop()
    return PackedFormat(bits, group_size)


def check_packed(
    name: str,
    packed_shape: tuple[int, ...],
    scale_shape: tuple[int, ...],
    weight_shape: tuple[int, int],
    fmt: PackedFormat | None = None,
) -> PackedFormat:
    """The format of one packed weight from its shapes (the config's, when given, must
    agree); CheckpointError naming the tensor when they do not fit together."""
    if len(weight_shape) != 2:
        raise CheckpointError(f"tensor {name}.{SHAPE} is {list(weight_shape)}, not [out, in]")
    out, cols = weight_shape
    if len(packed_shape) != 2 or packed_shape[0] != out or len(scale_shape) != 2 or cols <= 0:
        raise CheckpointError(
            f"tensor {name}.{PACKED} {list(packed_shape)} / {SCALE} {list(scale_shape)} do not "
            f"fit {SHAPE} {list(weight_shape)}: the checkpoint is corrupt"
        )
    bits = packed_shape[1] * 32 // cols
    group = cols // scale_shape[1] if scale_shape[1] else 0
    exact = packed_shape[1] * 32 == bits * cols and scale_shape[1] * group == cols
    if not exact or bits not in BITS or group not in GROUP_SIZES or scale_shape[0] != out:
        raise CheckpointError(
            f"tensor {name}: {list(packed_shape)} packed words and {list(scale_shape)} scales "
            f"for a {list(weight_shape)} weight are not {'/'.join(map(str, BITS))} bits in "
            "groups of 32/64/128 inputs (padded or unsupported packing)"
        )
    found = PackedFormat(bits, group)
    if fmt is not None and found != fmt:
        raise CheckpointError(
            f"tensor {name} holds {bits}-bit groups of {group}, but config.json's "
            f"quantization_config says {fmt.bits}-bit groups of {fmt.group_size}"
        )
    return found


def to_affine(
    packed: mx.array, scale: mx.array, fmt: PackedFormat
) -> tuple[mx.array, mx.array, mx.array]:
    """(weight uint32, scales, biases) in MLX's affine format for the same values."""
    return packed.view(mx.uint32), scale, scale * -fmt.offset


def dequantize(packed: mx.array, scale: mx.array, fmt: PackedFormat) -> mx.array:
    """The weight s * q in float32 (exact: q has at most 8 bits, s at most 24)."""
    w, s, b = to_affine(packed, scale.astype(mx.float32), fmt)
    return mx.dequantize(w, s, b, group_size=fmt.group_size, bits=fmt.bits)


def map_packed(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename each packed weight's tensors X.weight_packed / weight_scale / weight_shape to
    MLX's X.weight / scales / biases (loading a compressed-tensors checkpoint as it is)."""
    bases = [k[: -len(PACKED)] for k in weights if k.endswith("." + PACKED)]
    if not bases:
        return weights
    for k in weights:
        if k.endswith(_UNSUPPORTED):
            raise CheckpointError(
                f"tensor {k}: zero points / reordered groups have no exact MLX form; this "
                "compressed-tensors checkpoint cannot be loaded"
            )
    out = dict(weights)
    first: tuple[str, PackedFormat] | None = None
    for base in sorted(bases):
        name = base.rstrip(".")
        try:
            packed, scale = out.pop(base + PACKED), out.pop(base + SCALE)
            shape = tuple(int(v) for v in out.pop(base + SHAPE).tolist())
        except KeyError as e:
            raise CheckpointError(
                f"tensor {e.args[0]} is missing: {name} is packed but incomplete"
            ) from None
        fmt = check_packed(name, tuple(packed.shape), tuple(scale.shape), shape)
        if first is None:
            first = name, fmt
        elif fmt != first[1]:
            raise CheckpointError(
                f"tensor {name} holds {fmt.bits}-bit groups of {fmt.group_size}, but {first[0]} "
                f"{first[1].bits}-bit groups of {first[1].group_size}: one scheme is supported"
            )
        out[base + "weight"], out[base + "scales"], out[base + "biases"] = to_affine(
            packed, scale, fmt
        )
    return out
