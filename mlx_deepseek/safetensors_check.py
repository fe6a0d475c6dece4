"""Validate a safetensors file's header before anything else reads the file.

A checkpoint is untrusted input: a parser handed a crafted file may crash the process
(MLX picks its parser by file extension, so a `.gguf` named in an index reached a GGUF
parser). Everything that reads weights (the loader, `info`, the converter, chat sessions)
first calls `validate_safetensors`, which reads only the 8-byte length and the JSON header
and checks every claim in them against the file's size:

- the header length is sane and the header lies inside the file;
- the header is a UTF-8 JSON object without duplicate names;
- every tensor entry is {"dtype", "shape", "data_offsets"} with a known byte-sized dtype,
  non-negative integer dimensions, and 0 <= begin <= end inside the data section;
- prod(shape) * dtype size == end - begin, and no two tensors' bytes overlap;
- `__metadata__`, when present and not null, maps strings to strings.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError

# The safetensors format's byte-sized dtypes -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "C64": 8,
}
FLOAT_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F8_E8M0", "F16", "BF16", "F32", "F64"})
MAX_HEADER = 100 << 20  # the reference implementation's limit
MAX_DIM = 2**31 - 1  # MLX array dimensions are 32-bit
_FIX = "re-download it, or re-convert the checkpoint"


class SafetensorsError(CheckpointError):
    """A file that is not valid safetensors: `reason` says what is wrong with it (without
    the advice, which depends on what the file was meant to be)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}: {_FIX}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a validated header; `begin`/`end` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are, for positioned reads: `offset` is absolute in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def rows(self) -> int:
        """The length of the first axis (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    def read_into(self, f: BinaryIO, view: memoryview, start: int = 0) -> None:
        """Fill `view` with this tensor's bytes from byte `start` on, read from `f` (its
        file, opened unbuffered): one seek, then reads until full (the caller holds any lock
        the file needs)."""
        done = 0
        try:
            f.seek(self.offset + start)
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(
                        f"{self.file} is truncated: tensor {self.name} ends past the end of "
                        "the file; re-download it"
                    )
                done += n
        except OSError as e:
            raise CheckpointError(f"{self.file}: read failed ({e.strerror})") from None


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order, the data section's start, the file size."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    raw: dict[str, Any]

    def located(self) -> dict[str, TensorInfo]:
        """Every tensor by name, with its absolute place in the file."""
        return {
            name: TensorInfo(name, self.path, t.dtype, t.shape, self.data_start + t.begin, t.nbytes)
            for name, t in self.tensors.items()
        }


def validate_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a safetensors file (the parsed JSON), or CheckpointError (one line)
    naming the file and what is wrong with it: SafetensorsError (`.reason`) when the file
    is not valid safetensors, plain CheckpointError when it cannot be read at all."""
    return read_safetensors_header(path).raw


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Validate `path` as safetensors (see the module docstring) and return its header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(path, f"{size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    path,
                    f"not a safetensors file, or truncated (header length {n}, file size "
                    f"{size} bytes)",
                )
            raw_header = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw_header) != n:
        raise SafetensorsError(path, "changed while being read")
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise SafetensorsError(path, "safetensors header is not UTF-8 text") from None
    except _Duplicate as e:
        raise SafetensorsError(path, f"safetensors header names {e} twice") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers, nesting
        why = getattr(e, "msg", None) or type(e).__name__
        raise SafetensorsError(path, f"safetensors header is not valid JSON ({why})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(
            path, f"safetensors header is a JSON {json_type(header)}, not an object"
        )
    data_start = 8 + n
    data_size = size - data_start
    metadata = _metadata(path, header.get("__metadata__", {}))
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            tensors[name] = _entry(path, name, entry, data_size)
    _check_overlaps(path, tensors)
    return SafetensorsHeader(path, tensors, metadata, data_start, size, header)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(repr(k))
        out[k] = v
    return out


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:  # MLX writes null when there is none
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SafetensorsError(
            path, f"safetensors __metadata__ must map strings to strings, got {_short(value)}"
        )
    return value


def _entry(path: Path, name: str, entry: Any, data_size: int) -> TensorEntry:
    def bad(what: str) -> SafetensorsError:
        return SafetensorsError(path, f"tensor {name!r} {what}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"has header entry {_short(entry)}, not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"has unknown dtype {_short(dtype)} (known: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise bad(f"has shape {_short(shape)}, not a list of integers in 0..{MAX_DIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise bad(f"has data_offsets {_short(offsets)}, not [begin, end]")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise bad(f"has data_offsets [{begin}, {end}]: negative, or end before begin")
    if end > data_size:
        raise bad(
            f"ends at byte {end} of a {data_size}-byte data section (the file is truncated "
            "or the header is wrong)"
        )
    need = math.prod(shape) * DTYPE_SIZES[dtype]
    if need != end - begin:
        raise bad(f"spans {end - begin} bytes, but shape {shape} of {dtype} needs {need}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_overlaps(path: Path, tensors: dict[str, TensorEntry]) -> None:
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    # sorted by start, any overlap shows between neighbours
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise SafetensorsError(path, f"tensors {a!r} and {b!r} share bytes")


def json_type(value: Any) -> str:
    """What JSON calls a parsed value's type (for messages)."""
    if value is None:
        return "null"
    for py, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string")):
        if isinstance(value, py):
            return name
    return "number"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True) if _jsonable(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
