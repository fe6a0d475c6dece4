"""Which files make up a checkpoint folder, checked before any of them is opened.

Shared by the loader, `info` and the converter. A checkpoint's index names its shards; an
index from a stranger could name `../../etc/passwd`, `/dev/zero`, a `.gguf`, or a symlink
to a file elsewhere. Every shard must be a plain `*.safetensors` file name whose real
path (symlinks followed) is a regular file inside the checkpoint's folder; a Hugging Face
cache snapshot counts its repo folder as inside (its files are symlinks to `../../blobs`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import CheckpointError, DeepSeekError
from .safetensors_check import SafetensorsHeader, TensorEntry, json_type

INDEX_NAME = "model.safetensors.index.json"
SUFFIX = ".safetensors"


def read_json_object(path: Path, error: type[DeepSeekError] = CheckpointError) -> dict[str, Any]:
    """A JSON file that must hold an object: UTF-8, valid JSON, an object (one-line errors)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        value = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark is harmless
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); re-download the file") from None
    except (ValueError, RecursionError) as e:
        why = getattr(e, "msg", None) or type(e).__name__
        where = f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
        raise error(f"{path}: not valid JSON ({why}{where}); re-download the file") from None
    if not isinstance(value, dict):
        raise error(f"{path}: holds a JSON {json_type(value)}, not an object; re-download the file")
    return value


def checkpoint_root(folder: Path) -> Path:
    """The real folder a checkpoint's files may live in: the folder itself, or for a
    Hugging Face cache snapshot (models--o--n/snapshots/<rev>) the repo folder holding blobs/."""
    real = Path(os.path.realpath(folder))
    parent = real.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        return parent.parent
    return real


def shard_path(folder: Path, name: Any, where: str, root: Path | None = None) -> Path:
    """`folder / name` for a shard name from `where`, after checking that the name is a plain
    *.safetensors file name and that its real path is a regular file inside the checkpoint."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0")
        or os.path.basename(name) != name
    ):
        raise CheckpointError(
            f"{where}: shard name {name!r} is not a plain file name in the checkpoint's folder "
            "(no '/', '..' or absolute paths): the index is corrupt; re-download the checkpoint"
        )
    if not name.endswith(SUFFIX):
        raise CheckpointError(
            f"{where}: shard {name!r} is not a {SUFFIX} file: weights are read only from "
            "safetensors files; re-download or re-convert the checkpoint"
        )
    path = folder / name
    root = root or checkpoint_root(folder)
    real = Path(os.path.realpath(path))
    if path.is_symlink() and root != real and root not in real.parents:
        raise CheckpointError(
            f"{path}: a symlink to {real}, outside the checkpoint's folder {root}: refused; "
            "copy the file into the folder"
        )
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return path  # the caller reports missing shards (all of them at once)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file; re-download the checkpoint")
    return path


def read_index(folder: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor name -> shard file name, every name checked), or None
    when the folder has no index."""
    index = folder / INDEX_NAME
    if not (index.exists() or index.is_symlink()):
        return None
    data = read_json_object(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: has no weight_map object (tensor name -> shard file); "
            "re-download the checkpoint"
        )
    root = checkpoint_root(folder)
    for tensor, shard in weight_map.items():
        shard_path(folder, shard, f"{index} (tensor {tensor})", root)
    return weight_map


def weight_files(folder: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """The shards of a checkpoint: those its index names (all must exist) plus `extra` names
    that exist, else every *.safetensors file; each checked by `shard_path`."""
    weight_map = read_index(folder)
    root = checkpoint_root(folder)
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard {missing[0]} named in {INDEX_NAME} is missing "
                f"({len(missing)} of {len(names)} missing): re-download or re-convert the "
                "checkpoint"
            )
        for name in extra:
            if name not in names and (folder / name).exists():
                files.append(shard_path(folder, name, str(folder), root))
    else:
        files = sorted(p for p in folder.glob(f"*{SUFFIX}") if not p.name.startswith("."))
        for f in files:
            shard_path(folder, f.name, str(folder), root)
    if not files:
        raise CheckpointError(f"{folder}: no *{SUFFIX} weight files")
    return files


def tensor_map(
    folder: Path, headers: dict[Path, SafetensorsHeader], weight_map: dict[str, str] | None
) -> dict[str, tuple[Path, TensorEntry]]:
    """Tensor name -> (file, header entry). With an index, the index decides (as in
    transformers): each tensor it names must be in the shard it names, and a shard's other
    tensors are ignored; files it does not name (mtp.safetensors) add all their tensors.
    No tensor may come from two files."""
    out: dict[str, tuple[Path, TensorEntry]] = {}
    indexed: set[str] = set()
    if weight_map is not None:
        for name, shard in weight_map.items():
            file = folder / shard
            indexed.add(shard)
            entry = headers[file].tensors.get(name)
            if entry is None:
                raise CheckpointError(
                    f"{file}: {INDEX_NAME} says it holds tensor {name}, but it does not: the "
                    "shard is corrupt or from another checkpoint; re-download it"
                )
            out[name] = (file, entry)
    for file, header in headers.items():
        if file.name in indexed:
            continue
        for name, entry in header.tensors.items():
            if name in out:
                raise CheckpointError(
                    f"{folder}: tensor {name} is in both {out[name][0].name} and {file.name}: "
                    "remove the stray file"
                )
            out[name] = (file, entry)
    return out
