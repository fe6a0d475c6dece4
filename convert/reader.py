"""A source checkpoint on disk: its config, index, safetensors headers, and tensor reads.

Files and headers are checked by the loader's own code (mlx_deepseek.checkpoint_files,
mlx_deepseek.safetensors_check) so that every problem shows before any output is written:
a shard name that leaves the folder or is not safetensors, a shard the index names but the
folder lacks, a header that lies about the file. Tensor data is read on demand, by row
range, into fresh buffers: the process holds only what it is converting right now (no
memory map keeps a whole shard resident). Each read seeks and reads under its file's lock,
so two threads, or two tensors of one file, never read at each other's position.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_deepseek import checkpoint_files
from mlx_deepseek.errors import CheckpointError, ConfigError
from mlx_deepseek.safetensors_check import TensorInfo, read_safetensors_header

INDEX_NAME = checkpoint_files.INDEX_NAME
# safetensors dtype -> numpy dtype of the raw bytes (bf16 and fp8 keep their bit patterns)
RAW_DTYPES: dict[str, np.dtype] = {
    "F8_E4M3": np.dtype(np.uint8),
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "I8": np.dtype(np.int8),  # DeepSeek V4's FP4 e2m1 weights, two per byte
    "F8_E8M0": np.dtype(np.uint8),  # power-of-two scales (V4's ue8m0)
    "U8": np.dtype(np.uint8),
    # V4's token -> experts table; compressed-tensors' packed integer weights and their shapes
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
INT_DTYPES = ("I32", "I64")
SUPPORTED = (
    "BF16, F16, F32, F8_E4M3 with its scales, V4's FP4 (I8) with E8M0 scales, integer tables, "
    "compressed-tensors' packed integers"
)


def check_dtype(info: TensorInfo) -> None:
    """CheckpointError unless convert can read the tensor's dtype."""
    if info.dtype not in RAW_DTYPES:
        raise CheckpointError(
            f"{info.file.name}: tensor {info.name} has dtype {info.dtype}, which convert "
            f"cannot read ({SUPPORTED}); dequantize it with its own tool first"
        )


class SourceCheckpoint:
    """A Hugging Face checkpoint folder: config.json + safetensors shards (+ index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = _read_config(self.folder)
        weight_map = checkpoint_files.read_index(self.folder)
        self.files = checkpoint_files.weight_files(self.folder)
        headers = {f: read_safetensors_header(f) for f in self.files}
        located = {f: header.located() for f, header in headers.items()}
        self.tensors: dict[str, TensorInfo] = {
            name: located[f][name]
            for name, (f, _) in checkpoint_files.tensor_map(
                self.folder, headers, weight_map
            ).items()
        }
        self._handles: dict[Path, tuple[Any, threading.Lock]] = {}
        self.file_order = {f: i for i, f in enumerate(self.files)}

    # ---- reading -------------------------------------------------------------------------

    def read_raw(
        self, info: TensorInfo, row_start: int = 0, row_end: int | None = None
    ) -> np.ndarray:
        """Rows [row_start, row_end) of a tensor as its raw numpy dtype, shape [rows, *rest]."""
        check_dtype(info)
        row_end = info.rows if row_end is None else row_end
        nbytes = (row_end - row_start) * info.row_bytes
        buf = np.empty(nbytes, dtype=np.uint8)
        self._pread_into(info, memoryview(buf), row_start * info.row_bytes)
        shape = (row_end - row_start, *info.shape[1:]) if info.shape else ()
        return buf.view(RAW_DTYPES[info.dtype]).reshape(shape)

    def read(self, info: TensorInfo, row_start: int = 0, row_end: int | None = None) -> mx.array:
        """As read_raw, as an MLX array: bf16/f16/f32 as such, F8_E4M3 as uint8 bit patterns."""
        return to_mlx(self.read_raw(info, row_start, row_end), info.dtype)

    def same_bytes(self, a: TensorInfo, b: TensorInfo, chunk: int = 64 << 20) -> bool:
        """Whether two tensors hold identical dtype, shape and bytes (compared in chunks;
        positioned reads, so two tensors of one file compare correctly)."""
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return False
        for pos in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - pos)
            buf_a, buf_b = bytearray(n), bytearray(n)
            self._pread_into(a, memoryview(buf_a), pos)
            self._pread_into(b, memoryview(buf_b), pos)
            if buf_a != buf_b:
                return False
        return True

    def _pread_into(self, info: TensorInfo, view: memoryview, start: int) -> None:
        """Fill `view` from byte `start` of the tensor (under its file's lock)."""
        f, lock = self._handle(info.file)
        with lock:
            info.read_into(f, view, start)

    def _handle(self, path: Path) -> tuple[Any, threading.Lock]:
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = self._handles[path] = (open(path, "rb", buffering=0), threading.Lock())
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open it ({e.strerror})") from None
        return handle

    def close(self) -> None:
        for f, _ in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_mlx(raw: np.ndarray, dtype: str) -> mx.array:
    """Raw bytes from read_raw as an MLX array (bf16 reinterpreted; fp8 stays uint8)."""
    arr = mx.array(raw)
    return arr.view(mx.bfloat16) if dtype == "BF16" else arr


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json; give the Hugging Face checkpoint's folder")
    return checkpoint_files.read_json_object(path, ConfigError)
