"""A checkpoint as one rank sees it: every tensor's place on disk (from the safetensors
headers, no data read) and positioned reads of just the rows or columns a rank keeps.

A rank of a split model needs a slice of most tensors: its experts (rows of a stacked
[E, out, in] tensor, or whole per-expert tensors), its heads (rows of q_b_proj and kv_b_proj,
columns of o_proj), its vocabulary rows. Rows are contiguous on disk and are read alone;
a column slice reads the rows it crosses and keeps its columns. MLX's own `mx.load` reads
whole tensors, so this small reader stands beside it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..loading import weight_files
from ..safetensors_check import TensorInfo, read_safetensors_header

# safetensors dtype -> (numpy dtype of the raw bytes, MLX dtype to reinterpret them as)
DTYPES: dict[str, tuple[np.dtype, mx.Dtype | None]] = {
    "F32": (np.dtype(np.float32), None),
    "F16": (np.dtype(np.float16), None),
    "BF16": (np.dtype(np.uint16), mx.bfloat16),
    "U32": (np.dtype(np.uint32), None),
    "I32": (np.dtype(np.int32), None),
    "U16": (np.dtype(np.uint16), None),
    "I16": (np.dtype(np.int16), None),
    "U8": (np.dtype(np.uint8), None),
    "I8": (np.dtype(np.int8), None),
    "I64": (np.dtype(np.int64), None),
    "U64": (np.dtype(np.uint64), None),
    "BOOL": (np.dtype(np.bool_), None),
}
# DeepSeek V4's own layout: FP8 e4m3 weights and E8M0 scales, read as the bytes mx.load gives
# (models/v4_weights.py decodes them); other families' FP8 checkpoints are converted first
FP8_DTYPES = {"F8_E4M3": DTYPES["U8"], "F8_E8M0": DTYPES["U8"]}
DTYPES.update(FP8_DTYPES)


def read_header(path: Path, fp8: bool = False) -> dict[str, TensorInfo]:
    """One safetensors file's tensors, its header validated as every reader's is
    (safetensors_check: entries, sizes and offsets against the file; no data read). fp8:
    the family reads FP8 tensors itself (V4)."""
    header = read_safetensors_header(path)
    for name, entry in header.tensors.items():
        if entry.dtype not in DTYPES or (entry.dtype in FP8_DTYPES and not fp8):
            if entry.dtype.startswith("F8"):
                raise CheckpointError(
                    f"{path}: tensor {name} is {entry.dtype}: convert the checkpoint first with "
                    "`mlx-deepseek convert SRC -o DST`, then load DST"
                )
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {entry.dtype}, which MLX cannot hold"
            )
    return header.located()


def scan(path: Path, fp8: bool = False) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder by name (the index's shards, or *.safetensors);
    fp8: as read_header."""
    tensors: dict[str, TensorInfo] = {}
    for file in weight_files(path):
        tensors.update(read_header(file, fp8))
    fp8 = next((n for n in tensors if n.endswith("weight_scale_inv")), None)
    if fp8 is not None:
        raise CheckpointError(
            f"{path}: this checkpoint stores FP8 weights ({fp8}): convert it first with "
            "`mlx-deepseek convert SRC -o DST`, then load DST"
        )
    return tensors


def read(
    info: TensorInfo, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
) -> mx.array:
    """The tensor, or rows [a, b) of its first axis, then columns [c, d) of its last axis."""
    raw, as_dtype = DTYPES[info.dtype]
    shape = info.shape or (1,)
    a, b = rows if rows is not None else (0, shape[0])
    if not 0 <= a <= b <= shape[0]:
        raise CheckpointError(f"tensor {info.name}: rows {a}:{b} outside its shape {list(shape)}")
    buf = np.empty((b - a) * info.row_bytes, dtype=np.uint8)
    try:
        with open(info.file, "rb", buffering=0) as f:
            info.read_into(f, memoryview(buf), a * info.row_bytes)
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot open it ({e.strerror})") from None
    arr = buf.view(raw).reshape((b - a, *shape[1:]) if info.shape else ())
    if cols is not None:
        c, d = cols
        if not 0 <= c <= d <= shape[-1]:
            raise CheckpointError(
                f"tensor {info.name}: columns {c}:{d} outside its shape {list(shape)}"
            )
        arr = np.ascontiguousarray(arr[..., c:d])
    out = mx.array(arr)
    return out.view(as_dtype) if as_dtype is not None else out
