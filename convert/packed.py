"""compressed-tensors sources (Kimi K2-Thinking / K2.5's INT4): found, checked, and kept.

A weight stored as `X.weight_packed` (int32) + `X.weight_scale` + `X.weight_shape` is
written out as MLX's affine `X.weight` (the same uint32 words), `X.scales` (the same
scales) and `X.biases` (-2^(bits-1) * scale): no requantization, whatever --bits and
--group-size say for other tensors (mlx_deepseek/compressed_tensors.py has the proof).
Where a float weight is needed instead (--no-quantize, or a packed kv_b_proj that V3 splits
into per-head matrices), it is dequantized exactly to float32 first.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_deepseek.errors import CheckpointError, DeepSeekError
from mlx_deepseek.models.compressed_tensors import PACKED, SCALE, SHAPE, PackedFormat, check_packed

from .layout import Entry
from .reader import SourceCheckpoint, TensorInfo

SCALE_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}


def find_packed(
    source: SourceCheckpoint, e: Entry, fmt: PackedFormat | None
) -> tuple[TensorInfo, TensorInfo] | None:
    """(packed, scale) for entry `e` (a `.weight`) stored packed, or None if it is not."""
    base = e.src[: -len("weight")]
    packed = source.tensors.get(base + PACKED)
    if packed is None or not e.src.endswith(".weight"):
        return None
    if fmt is None:
        raise CheckpointError(
            f"{source.folder}: tensor {packed.name} is packed, but config.json has no "
            "compressed-tensors quantization_config describing it"
        )
    scale, shape = source.tensors.get(base + SCALE), source.tensors.get(base + SHAPE)
    if scale is None or shape is None:
        lost = base + (SCALE if scale is None else SHAPE)
        raise CheckpointError(f"{source.folder}: tensor {lost} is missing (for {packed.name})")
    integer = shape.dtype in ("I32", "I64")
    if packed.dtype != "I32" or scale.dtype not in SCALE_DTYPES or not integer:
        raise CheckpointError(
            f"{packed.file.name}: {packed.name} ({packed.dtype}), {scale.name} ({scale.dtype}) "
            f"and {shape.name} ({shape.dtype}) should be I32, a float and an integer"
        )
    dims = tuple(int(v) for v in source.read_raw(shape).reshape(-1).tolist())
    if dims != e.shape:
        raise CheckpointError(
            f"{shape.file.name}: tensor {shape.name} says {list(dims)}, but config.json implies "
            f"{list(e.shape)}: the weights do not match their config"
        )
    check_packed(base.rstrip("."), packed.shape, scale.shape, dims, fmt)
    return packed, scale


def is_packed_part(name: str, known: set[str]) -> bool:
    """Whether `name` is one of the packed tensors standing for a known `.weight`."""
    for suffix in (PACKED, SCALE, SHAPE):
        if name.endswith("." + suffix) and name[: -len(suffix)] + "weight" in known:
            return True
    return False


def check_scale_dtype(scale: TensorInfo, dtype: mx.Dtype) -> None:
    """The output dtype must hold every scale exactly (float16 cannot hold bfloat16's)."""
    src = SCALE_DTYPES[scale.dtype]
    if not (src == dtype or dtype == mx.float32):
        raise DeepSeekError(
            f"--dtype {str(dtype).split('.')[-1]} would round the {scale.dtype} scales of the "
            f"packed INT4 weights (e.g. {scale.name}): use --dtype bfloat16 or float32"
        )
