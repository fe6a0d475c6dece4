"""The output checkpoint: safetensors shards planned up front and filled in place.

Every output tensor's dtype and shape is known before conversion starts (see plan.py), so
each shard's header is written first and tensor data goes straight to its final offset as
it is produced: a routed expert's slice lands inside its layer's stacked [E, out, in]
tensor without the layer being buffered, and a big tensor can be written in row chunks.
A shard is flushed and closed as soon as its last byte is written.

All of it happens in a staging folder beside DST, renamed to DST only when complete and
removed on any error or signal (`destination.Staging`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_deepseek.errors import DeepSeekError

INDEX_NAME = "model.safetensors.index.json"
MTP_FILE = "mtp.safetensors"
_ST_DTYPES = {
    mx.uint32: "U32",
    mx.bfloat16: "BF16",
    mx.float16: "F16",
    mx.float32: "F32",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.int32: "I32",
}


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: mx.Dtype
    shape: tuple[int, ...]
    header_dtype: str = ""  # safetensors dtype when not the natural one (fp8 bytes: "F8_E4M3")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size

    @property
    def row_bytes(self) -> int:
        """Bytes per row: writes address rows of the tensor viewed as [-1, shape[-1]]."""
        return self.shape[-1] * self.dtype.size


@dataclass
class Shard:
    name: str
    tensors: list[OutTensor]
    offsets: dict[str, int] = field(default_factory=dict)  # absolute, in the file
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)

    def layout(self) -> None:
        entries: dict[str, object] = {"__metadata__": {"format": "mlx"}}
        pos = 0
        for t in self.tensors:
            entries[t.name] = {
                "dtype": t.header_dtype or _ST_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [pos, pos + t.nbytes],
            }
            pos += t.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as other writers do
        self.header = len(text).to_bytes(8, "little") + text
        pos = len(self.header)
        for t in self.tensors:
            self.offsets[t.name] = pos
            pos += t.nbytes


def numbered_shards(groups: list[list[OutTensor]]) -> list[Shard]:
    """One laid-out Shard per group, named as Hugging Face names them: model.safetensors
    alone, else model-00001-of-0000N.safetensors and on."""
    n = len(groups)
    shards = [
        Shard("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors", g)
        for i, g in enumerate(groups)
    ]
    for s in shards:
        s.layout()
    return shards


def plan_shards(tensors: list[OutTensor], shard_size: int) -> list[Shard]:
    """Main tensors into model*.safetensors of <= shard_size bytes (in order), MTP into its own.

    mlx-lm loads only `model*.safetensors`, so `mtp.*` tensors in `mtp.safetensors` are
    invisible to it while mlx-deepseek reads them through the index.
    """
    groups: list[list[OutTensor]] = []
    size = 0
    for t in (t for t in tensors if not t.name.startswith("mtp.")):
        if not groups or (size + t.nbytes > shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    shards = numbered_shards(groups)
    mtp = [t for t in tensors if t.name.startswith("mtp.")]
    if mtp:
        shards.append(Shard(MTP_FILE, mtp))
        shards[-1].layout()
    return shards


def tensor_bytes(a: mx.array) -> memoryview:
    """An evaluated MLX array's bytes in row-major order."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)  # numpy has no bfloat16; the bits are what we write
    return memoryview(np.ascontiguousarray(np.asarray(a))).cast("B")


class ShardWriter:
    """Writes planned tensors (whole, or by rows) into their shards in `folder`."""

    def __init__(self, folder: Path, shards: list[Shard]):
        self.folder = folder
        self.shards = shards
        self._where = {t.name: (t, s) for s in shards for t in s.tensors}
        self._left = {t.name: t.nbytes for s in shards for t in s.tensors}
        self._file_left = {s.name: sum(t.nbytes for t in s.tensors) for s in shards}
        self._fds: dict[str, int] = {}
        self.written = 0

    def write(self, name: str, array: mx.array, row: int = 0) -> None:
        """Write `array` as rows starting at `row` of tensor `name` viewed as [-1, shape[-1]]."""
        t, shard = self._where[name]
        if array.dtype != t.dtype:
            raise RuntimeError(f"{name}: got {array.dtype}, planned {t.dtype}")
        data = tensor_bytes(array)
        start = row * t.row_bytes
        if data.nbytes % t.row_bytes or start + data.nbytes > t.nbytes:
            raise RuntimeError(f"{name}: a write of {data.nbytes} bytes at row {row} does not fit")
        if self._left[name] < data.nbytes:
            raise RuntimeError(f"{name}: written more than once")
        self._left[name] -= data.nbytes
        self._pwrite(shard, data, shard.offsets[name] + start)
        self.written += data.nbytes
        self._file_left[shard.name] -= data.nbytes
        if self._file_left[shard.name] == 0:
            self._close(shard.name, sync=True)

    def finish(self) -> dict[str, object]:
        """Check every planned byte arrived, write the index; returns it."""
        incomplete = [n for n, left in self._left.items() if left]
        if incomplete:
            raise RuntimeError(
                f"output tensor {incomplete[0]} was never completely written "
                f"({len(incomplete)} incomplete): a source tensor was not converted"
            )
        for s in self.shards:
            if s.name in self._fds:
                self._close(s.name, sync=True)
        index = {
            "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s.tensors)},
            "weight_map": dict(sorted((t.name, s.name) for s in self.shards for t in s.tensors)),
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=4) + "\n")
        return index

    def close(self) -> None:
        for name in list(self._fds):
            self._close(name, sync=False)

    def _pwrite(self, shard: Shard, data: memoryview, offset: int) -> None:
        path = self.folder / shard.name
        try:
            fd = self._fds.get(shard.name)
            if fd is None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[shard.name] = fd
                _pwrite_all(fd, memoryview(shard.header), 0)
            _pwrite_all(fd, data, offset)
        except OSError as e:
            raise _write_error(path, e) from None

    def _close(self, name: str, sync: bool) -> None:
        fd = self._fds.pop(name)
        try:
            if sync:
                os.fsync(fd)
        except OSError as e:
            raise _write_error(self.folder / name, e) from None
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


def _write_error(path: Path, e: OSError) -> DeepSeekError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free / 1e9
        return DeepSeekError(
            f"disk full while writing {path.name} ({free:.1f} GB free on {path.parent.parent}): "
            "free some space or choose another -o location; nothing was kept"
        )
    return DeepSeekError(f"cannot write {path} ({e.strerror}); nothing was kept")
