"""Where each routed expert's bytes are in the checkpoint files.

From the safetensors headers only (no tensor is read): for every MoE layer (the MTP
layers' too) and every tensor of its experts (gate/up/down x weight/scales/biases), one
`Piece` per expert. Two layouts have experts at fixed offsets:

- stacked [E, ...] tensors (`mlp.switch_mlp.*`: converted and mlx-lm checkpoints): a
  stacked tensor is contiguous, so expert e starts at begin + e * (bytes / E);
- per-expert tensors (`mlp.experts.{e}.*`: Hugging Face checkpoints), each its own range.

Anything else (a tensor the headers do not hold, a dtype the slots cannot take, bytes that
do not split evenly by expert) raises NotStreamable with the reason, and the loader keeps
the experts in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .reader import ITEMSIZE, Piece

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
KINDS = ("weight", "scales", "biases")


class NotStreamable(Exception):
    """The checkpoint's experts cannot be read by offset; str() says why (one line)."""


@dataclass(frozen=True)
class Header:
    """The tensors of one safetensors file: name -> (dtype, shape, absolute begin, end)."""

    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]


def read_header(path: Path) -> Header:
    """The header of a safetensors file (read as data: 8-byte length + JSON)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise NotStreamable(f"{path.name}: header length {n} is past the end of the file")
        raw = json.loads(f.read(n))
    start = 8 + n
    tensors = {}
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= size - start:
            raise NotStreamable(f"{path.name}: tensor {name} lies outside the file")
        tensors[name] = (entry["dtype"], tuple(entry["shape"]), start + begin, start + end)
    return Header(path, tensors)


@dataclass(frozen=True)
class LayerExperts:
    """One MoE layer's experts in the files: pieces[(proj, kind)][e]."""

    prefix: str  # the model's name for the layer's MoE block, e.g. "model.layers.3.mlp"
    pieces: dict[tuple[str, str], list[Piece]]

    def kinds(self, proj: str) -> list[str]:
        return [k for k in KINDS if (proj, k) in self.pieces]


@dataclass(frozen=True)
class ExpertLocations:
    """Every streamed layer's pieces, and the files they index."""

    files: list[Path]
    layers: dict[str, LayerExperts]  # by prefix


def locate_experts(
    files: list[Path], prefixes: dict[str, list[str]], num_experts: int
) -> ExpertLocations:
    """The pieces of every layer in `prefixes` (the model's MoE prefix -> the prefixes its
    tensors may have in the checkpoint: itself, and for an MTP layer its Hugging Face
    `model.layers.{n}.mlp`)."""
    headers = [read_header(f) for f in files]
    where: dict[str, tuple[int, tuple]] = {}
    for i, h in enumerate(headers):
        for name, entry in h.tensors.items():
            where[name] = (i, entry)
    layers = {}
    for prefix, sources in prefixes.items():
        pieces: dict[tuple[str, str], list[Piece]] = {}
        for proj in PROJECTIONS:
            for kind in KINDS:
                found = _find(where, sources, proj, kind, num_experts)
                if found is not None:
                    pieces[(proj, kind)] = found
            if (proj, "weight") not in pieces:
                raise NotStreamable(
                    f"{sources[0]}.switch_mlp.{proj}.weight is in no safetensors header"
                )
        layers[prefix] = LayerExperts(prefix, pieces)
    return ExpertLocations(list(files), layers)


def _find(
    where: dict[str, tuple[int, tuple]], sources: list[str], proj: str, kind: str, E: int
) -> list[Piece] | None:
    for src in sources:
        stacked = where.get(f"{src}.switch_mlp.{proj}.{kind}")
        if stacked is not None:
            file, (dtype, shape, begin, end) = stacked
            _check_dtype(f"{src}.switch_mlp.{proj}.{kind}", dtype, shape, end - begin)
            if not shape or shape[0] != E or (end - begin) % E:
                raise NotStreamable(
                    f"{src}.switch_mlp.{proj}.{kind} has shape {list(shape)}: not {E} experts "
                    "stacked at fixed offsets"
                )
            step = (end - begin) // E
            return [Piece(file, begin + e * step, step, dtype) for e in range(E)]
        first = where.get(f"{src}.experts.0.{proj}.{kind}")
        if first is None:
            continue
        out = []
        for e in range(E):
            name = f"{src}.experts.{e}.{proj}.{kind}"
            if name not in where:
                raise NotStreamable(f"{name} is in no safetensors header")
            file, (dtype, shape, begin, end) = where[name]
            _check_dtype(name, dtype, shape, end - begin)
            out.append(Piece(file, begin, end - begin, dtype))
        return out
    return None


def _check_dtype(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
    if dtype not in ITEMSIZE:
        raise NotStreamable(f"{name} is stored as {dtype}, which the expert slots cannot take")
    if math.prod(shape) * ITEMSIZE[dtype] != nbytes:
        raise NotStreamable(
            f"{name}: {nbytes} bytes for shape {list(shape)} in {dtype} (compressed or packed "
            "differently)"
        )
