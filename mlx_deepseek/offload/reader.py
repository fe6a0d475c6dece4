"""Positioned reads of checkpoint byte ranges straight into slot memory, several in flight.

Every read is an `os.preadv` at a byte offset into the destination's own bytes (a slot of a
bank: the memory of an evaluated MLX array), from a pool of threads, so no page of the
checkpoint is ever mapped (no page faults) and nothing is staged, except when the file's
dtype differs from the bank's (e.g. bf16 scales for a float32 CPU model): then the piece
is read into a buffer of its own size and converted into the slot exactly as MLX's astype
would (round to nearest even). Big pieces are cut into CHUNK reads so that one expert's
bytes come from several threads at once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

THREADS = 8  # reads in flight (an SSD wants a queue of several; more did not help here)
CHUNK = 4 << 20  # bytes per read: a V3 expert's 7.3 MB projection is two reads

# safetensors dtype -> numpy dtype of its bits (floats to convert); bf16 as its uint16 bits
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1}  # the dtypes a slot can hold
_FLOATS = {"F32", "F16", "BF16"}


def can_convert(src: str, dst: str) -> bool:
    """Whether a piece stored as safetensors dtype `src` can fill a slot of dtype `dst`
    (a safetensors name too: F32, F16, BF16, U32)."""
    return src == dst or (src in _FLOATS and dst in _FLOATS)


def to_float32(raw: np.ndarray, src: str) -> np.ndarray:
    """A float piece's values in float32 (exact: every source dtype is a subset)."""
    if src == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def from_float32(x: np.ndarray, dst: str) -> np.ndarray:
    """float32 values in dtype `dst`, rounded to nearest even as MLX's astype rounds."""
    if dst == "F32":
        return x
    if dst == "F16":
        return x.astype(np.float16)
    bits = x.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


@dataclass(frozen=True)
class Piece:
    """One tensor's bytes of one expert in a checkpoint file."""

    file: int  # index into the reader's files
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: str  # safetensors dtype as stored


class ExpertReader:
    """A pool of reader threads over the checkpoint's files (opened once, read-only)."""

    def __init__(self, files: Sequence[Path], threads: int = THREADS):
        self.files = [Path(f) for f in files]
        self._fds = [os.open(f, os.O_RDONLY) for f in self.files]
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mlx-deepseek-experts")
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.read_seconds = 0.0  # summed over threads
        # False: drop what each read brought into the OS page cache (Linux), so that a later
        # miss reads the disk again, as when the experts are many times the memory (the bench)
        self.page_cache = True

    def read(self, piece: Piece, dest: memoryview, dst_dtype: str) -> list[Future]:
        """Start reading `piece` into `dest` (a writable byte view of exactly the slot's
        bytes for this tensor); returns the futures to wait on."""
        if piece.dtype == dst_dtype:
            if piece.nbytes != dest.nbytes:
                raise ValueError(f"piece of {piece.nbytes} bytes for a {dest.nbytes}-byte slot")
            return [
                self._pool.submit(self._direct, piece.file, piece.offset + a, dest[a:b])
                for a, b in _chunks(piece.nbytes)
            ]
        return [self._pool.submit(self._converted, piece, dest, dst_dtype)]

    def _pread(self, file: int, offset: int, dest: memoryview) -> None:
        t0 = time.perf_counter()
        done, size = 0, dest.nbytes
        while done < size:
            n = os.preadv(self._fds[file], [dest[done:]], offset + done)
            if n <= 0:
                raise OSError(
                    f"{self.files[file]}: ended at byte {offset + done} while reading an expert "
                    "(was the checkpoint changed or truncated?)"
                )
            done += n
        if not self.page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fds[file], offset, size, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.bytes_read += size
            self.read_seconds += time.perf_counter() - t0

    def _direct(self, file: int, offset: int, dest: memoryview) -> None:
        self._pread(file, offset, dest)

    def _converted(self, piece: Piece, dest: memoryview, dst_dtype: str) -> None:
        staging = bytearray(piece.nbytes)
        self._pread(piece.file, piece.offset, memoryview(staging))
        raw = np.frombuffer(staging, dtype=_NUMPY[piece.dtype])
        out = from_float32(to_float32(raw, piece.dtype), dst_dtype)
        target = np.frombuffer(dest, dtype=out.dtype)
        if target.size != out.size:
            raise ValueError(f"piece of {out.size} values for a {target.size}-value slot")
        target[:] = out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _chunks(nbytes: int) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK, nbytes)) for a in range(0, nbytes, CHUNK)] or [(0, 0)]
