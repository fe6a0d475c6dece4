"""A source checkpoint on disk: its config, index, safetensors headers, and tensor reads.

Headers are parsed here (not through a loader) so that every problem shows before any
output is written: a shard the index names but the folder lacks, a file shorter than its
header says, a tensor whose byte span does not match its shape and dtype. Tensor data is
read on demand, by row range, with plain positioned reads into fresh buffers: the process
holds only what it is converting right now (no memory map keeps a whole shard resident).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_deepseek.errors import CheckpointError, ConfigError

INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype -> numpy dtype of the raw bytes (bf16 and fp8 keep their bit patterns)
RAW_DTYPES: dict[str, np.dtype] = {
    "F8_E4M3": np.dtype(np.uint8),
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "I8": np.dtype(np.int8),  # DeepSeek V4's FP4 e2m1 weights, two per byte
    "F8_E8M0": np.dtype(np.uint8),  # power-of-two scales (V4's ue8m0)
    "U8": np.dtype(np.uint8),
    "I32": np.dtype(np.int32),  # V4's token -> experts table
    "I64": np.dtype(np.int64),
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
INT_DTYPES = ("I32", "I64")
SUPPORTED = (
    "BF16, F16, F32, F8_E4M3 with its scales, V4's FP4 (I8) with E8M0 scales, integer tables"
)
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `offset` is absolute in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    def check_dtype(self) -> None:
        if self.dtype not in RAW_DTYPES:
            raise CheckpointError(
                f"{self.file.name}: tensor {self.name} has dtype {self.dtype}, which convert "
                f"cannot read ({SUPPORTED}); dequantize it with its own tool first"
            )


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header (not its data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes is too short for a safetensors file: re-download it"
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file, or truncated (header length {n}, file "
                    f"size {size}): re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}): re-download it") from None
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            start, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name}") from None
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: it has {size} bytes, but its header places tensor {name} "
                f"up to byte {data_start + end}; re-download it"
            )
        raw_dtype = RAW_DTYPES.get(dtype)
        if raw_dtype is not None and math.prod(shape) * raw_dtype.itemsize != end - start:
            raise CheckpointError(
                f"{path}: tensor {name} spans {end - start} bytes, but shape {list(shape)} of "
                f"{dtype} needs {math.prod(shape) * raw_dtype.itemsize}: the file is corrupt"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + start, end - start)
    return tensors


class SourceCheckpoint:
    """A Hugging Face checkpoint folder: config.json + safetensors shards (+ index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = _read_config(self.folder)
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        headers = {f: read_header(f) for f in self.files}
        index = self.folder / INDEX_NAME
        if index.exists():
            for name, file in self._weight_map(index).items():
                info = headers[self.folder / file].get(name)
                if info is None:
                    raise CheckpointError(
                        f"{self.folder / file}: {INDEX_NAME} says it holds tensor {name}, but "
                        "it does not: the shard is corrupt or from another checkpoint"
                    )
                self.tensors[name] = info
        else:
            for f in self.files:
                self.tensors.update(headers[f])
        self._handles: dict[Path, Any] = {}
        self.file_order = {f: i for i, f in enumerate(self.files)}

    # ---- discovery -----------------------------------------------------------------------

    def _weight_map(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        return weight_map

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            names = sorted(set(self._weight_map(index).values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{self.folder}: shard {missing[0]} named in {INDEX_NAME} is missing "
                    f"({len(missing)} of {len(names)} missing): re-download the checkpoint"
                )
            return [self.folder / n for n in names]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors weight files")
        return files

    # ---- reading -------------------------------------------------------------------------

    def read_raw(
        self, info: TensorInfo, row_start: int = 0, row_end: int | None = None
    ) -> np.ndarray:
        """Rows [row_start, row_end) of a tensor as its raw numpy dtype, shape [rows, *rest]."""
        info.check_dtype()
        row_end = info.rows if row_end is None else row_end
        nbytes = (row_end - row_start) * info.row_bytes
        buf = np.empty(nbytes, dtype=np.uint8)
        view = memoryview(buf)
        pos, done = info.offset + row_start * info.row_bytes, 0
        f = self._handle(info.file)
        try:
            f.seek(pos)
            while done < nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(
                        f"{info.file} is truncated: tensor {info.name} ends past the end of the "
                        "file; re-download it"
                    )
                done += n
        except OSError as e:
            raise CheckpointError(f"{info.file}: read failed ({e.strerror})") from None
        shape = (row_end - row_start, *info.shape[1:]) if info.shape else ()
        return buf.view(RAW_DTYPES[info.dtype]).reshape(shape)

    def read(self, info: TensorInfo, row_start: int = 0, row_end: int | None = None) -> mx.array:
        """As read_raw, as an MLX array: bf16/f16/f32 as such, F8_E4M3 as uint8 bit patterns."""
        return to_mlx(self.read_raw(info, row_start, row_end), info.dtype)

    def same_bytes(self, a: TensorInfo, b: TensorInfo, chunk: int = 64 << 20) -> bool:
        """Whether two tensors hold identical dtype, shape and bytes (compared in chunks)."""
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return False
        fa, fb = self._handle(a.file), self._handle(b.file)
        for pos in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - pos)
            fa.seek(a.offset + pos)
            fb.seek(b.offset + pos)
            if fa.read(n) != fb.read(n):
                return False
        return True

    def _handle(self, path: Path):
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open(path, "rb", buffering=0)
        return f

    def close(self) -> None:
        for f in self._handles.values():
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
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config
