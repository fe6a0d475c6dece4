"""Chat session files: what /save writes and /load reads back.

A session is one safetensors file in mlx-lm's prompt-cache layout (what
`mlx_lm.models.cache.save_prompt_cache` writes): per layer i, tensors `i.0` (keys = c_kv
[1, 1, S, kv_lora_rank]), `i.1` (values = k_pe [1, 1, S, qk_rope_head_dim]) and, with
mlx-lm 0.32, `i.2` (the offset, a scalar); metadata `0.format`, `0.session` (the
conversation as JSON) and `1.i` (each layer's cache class).

Reading trusts nothing in the file: the safetensors header is checked before MLX reads
the file, the file is read as safetensors whatever its name (MLX would pick a parser by the
extension), and every field is checked against the model before the caller replaces its
conversation with it. Any problem is one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import save_prompt_cache

from mlx_deepseek.decoding import check_token_ids
from mlx_deepseek.errors import CheckpointError, DeepSeekError
from mlx_deepseek.generation import check_text
from mlx_deepseek.safetensors_check import SafetensorsError, validate_safetensors
from mlx_deepseek.sampling import SamplingSettings

SESSION_FORMAT = "mlx-deepseek-chat/1"
SUFFIX = ".safetensors"
DEFAULT_NAME = "chat" + SUFFIX
_ROLES = ("system", "user", "assistant")


class SessionFileError(DeepSeekError):
    """A session file that cannot be written, or read back into this chat."""


# ---- names ---------------------------------------------------------------------------------


def save_target(name: str | os.PathLike) -> tuple[Path, bool]:
    """(the file /save NAME writes, whether `.safetensors` was added to NAME).

    A name that does not end in .safetensors gets it, so that /load NAME finds the file
    again; a folder is refused (never a file written beside it)."""
    text = os.fspath(name)
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise SessionFileError(f"{path} is a folder: give a file name, e.g. {path / DEFAULT_NAME}")
    added = not path.name.endswith(SUFFIX)
    if added:
        path = path.with_name(path.name + SUFFIX)
        if path.is_dir():
            raise SessionFileError(f"{path} is a folder: give another file name")
    parent = path.parent
    if not parent.exists():
        raise SessionFileError(f"{parent}: no such folder")
    if not parent.is_dir():
        raise SessionFileError(f"{parent} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise SessionFileError(f"{path} is read-only: save under another name")
    return path, added


def load_source(name: str | os.PathLike) -> Path:
    """The file /load NAME reads: what /save NAME wrote (NAME + .safetensors unless NAME
    already ends so), else NAME itself."""
    text = os.fspath(name)
    path = Path(text).expanduser()
    candidates = [path] if path.name.endswith(SUFFIX) else [path.with_name(path.name + SUFFIX)]
    candidates.append(path)
    for p in candidates:
        if p.is_file():
            return p
    if path.is_dir():
        raise SessionFileError(f"{path} is a folder: give a session file saved by /save")
    raise SessionFileError(f"{path}: no such session file")


# ---- writing -------------------------------------------------------------------------------


def write_session(path: Path, cache: list, state: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then one rename over `path`,
    so an existing file stays untouched unless the whole new one was written."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=SUFFIX)
        os.close(fd)
    except OSError as e:
        raise SessionFileError(f"{path}: could not save the session ({e.strerror})") from None
    try:
        meta = {"format": SESSION_FORMAT, "session": json.dumps(state)}
        save_prompt_cache(tmp, cache, meta)
        os.replace(tmp, path)
    except Exception as e:
        reason = getattr(e, "strerror", None) or e
        raise SessionFileError(f"{path}: could not save the session ({reason})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- reading -------------------------------------------------------------------------------


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, validated by the one validator the checkpoint
    loader uses too (mlx_deepseek.safetensors_check), before MLX reads the file.
    Raises SessionFileError."""
    try:
        return validate_safetensors(path)
    except SafetensorsError as e:
        raise SessionFileError(
            f"{path}: not a chat session saved by mlx-deepseek ({e.reason})"
        ) from None
    except CheckpointError as e:  # unreadable: say why, as the OS does
        raise SessionFileError(str(e)) from None


@dataclass
class SavedSession:
    """A session file's content, checked against the model it is loaded into."""

    layers: list[tuple[Any, Any, int]]  # per layer: keys, values, offset (None, None, 0: empty)
    tokens: list[int]
    messages: list[dict[str, str]]
    reasoning: dict[int, str]
    system: str | None
    settings: SamplingSettings
    max_tokens: int | None
    thinking: bool
    totals: dict[str, int]
    model: str
    arch: dict[str, Any]


def read_session(
    path: Path, arch: dict[str, Any], vocab: int | None, layer_dims: tuple[int | None, int | None]
) -> SavedSession:
    """Read and check a session file against the model's `arch`, vocabulary size and
    latent widths (kv_lora_rank, qk_rope_head_dim; None: unknown)."""
    check_safetensors_header(path)
    not_ours = SessionFileError(
        f"{path}: not a chat session saved by mlx-deepseek (/save writes them)"
    )
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception:
        raise not_ours from None
    if meta.get("0.format") != SESSION_FORMAT:
        raise not_ours
    try:
        state = json.loads(meta.get("0.session", ""))
    except json.JSONDecodeError:
        raise not_ours from None
    if not isinstance(state, dict):
        raise not_ours

    def bad(why: str) -> SessionFileError:
        return SessionFileError(f"{path}: {why}; the file is damaged or was edited by hand")

    if state.get("arch") != arch:
        raise SessionFileError(
            f"{path} was saved with another model ({state.get('model') or 'unknown'}, "
            f"{state.get('arch')}); load it in a chat with that model"
        )
    layers = _read_layers(arrays, meta, layer_dims, bad)
    try:
        tokens = check_token_ids(state.get("tokens"), vocab, "its token ids")
    except DeepSeekError as e:
        raise bad(str(e)) from None
    held = min((offset for _, _, offset in layers), default=0)
    if len(tokens) > held:
        raise bad(f"it holds {len(tokens)} tokens but its cache only {held}")
    return SavedSession(
        layers=layers,
        tokens=tokens,
        messages=_messages(state.get("messages"), bad),
        reasoning=_reasoning(state.get("reasoning", {}), bad),
        system=_optional_text(state.get("system"), "system", bad),
        settings=_settings(state.get("settings"), bad),
        max_tokens=_max_tokens(state.get("max_tokens"), bad),
        thinking=_flag(state.get("thinking", False), bad),
        totals=_totals(state.get("totals", {}), bad),
        model=str(state.get("model") or ""),
        arch=arch,
    )


def _scalar_kinds(meta: dict[str, str], bad) -> dict[str, str]:
    """mlx-lm's list of entries saved as scalars: flattened key -> "scalar" / "none" / ..."""
    kinds = {}
    j = 1
    while f"2.{j}.0" in meta:
        kinds[meta[f"2.{j}.0"]] = meta.get(f"2.{j}.1", "")
        j += 1
    if any(k not in ("scalar", "none") for k in kinds.values()):
        raise bad("its cache holds values of unknown kinds")
    return kinds


def _read_layers(arrays, meta, layer_dims, bad) -> list[tuple[Any, Any, int]]:
    """Per layer (keys, values, offset); an empty layer (nothing cached) is (None, None, 0)."""
    classes = {k: v for k, v in meta.items() if k.startswith("1.")}
    n = len(classes)
    if sorted(classes) != sorted(f"1.{i}" for i in range(n)):
        raise bad("its cache layers are not numbered 0..n-1")
    kinds = _scalar_kinds(meta, bad)
    layers = []
    for i in range(n):
        if classes[f"1.{i}"] != "KVCache":
            raise bad(f"layer {i} holds a {classes[f'1.{i}']!r} cache, not a KVCache")
        keys, values = arrays.get(f"{i}.0"), arrays.get(f"{i}.1")
        if keys is None or values is None:
            raise bad(f"layer {i} has no keys or values")
        offset = arrays.get(f"{i}.2")
        if offset is not None and (offset.ndim != 0 or not mx.issubdtype(offset.dtype, mx.integer)):
            raise bad(f"layer {i}'s offset is not an integer")
        empty = [kinds.get(f"{i}.{j}") == "none" for j in (0, 1)]
        if any(empty):
            if not all(empty) or (offset is not None and offset.item() != 0):
                raise bad(f"layer {i} is half empty")
            layers.append((None, None, 0))
            continue
        for name, a, width in (("keys", keys, layer_dims[0]), ("values", values, layer_dims[1])):
            if (
                a.ndim != 4
                or tuple(a.shape[:2]) != (1, 1)
                or not mx.issubdtype(a.dtype, mx.floating)
            ):
                raise bad(f"layer {i}'s {name} have shape {a.shape} ({a.dtype})")
            if width is not None and a.shape[3] != width:
                raise bad(f"layer {i}'s {name} are {a.shape[3]} wide; this model's are {width}")
        if keys.shape[2] != values.shape[2]:
            raise bad(f"layer {i}'s keys and values differ in length")
        length = keys.shape[2] if offset is None else offset.item()
        if not 0 <= length <= keys.shape[2]:
            raise bad(f"layer {i}'s offset {length} is outside its {keys.shape[2]} positions")
        layers.append((keys, values, length))
    return layers


def _messages(value, bad) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise bad("its messages are not a list")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in _ROLES):
            raise bad(f"message {i} has no role among {', '.join(_ROLES)}")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"message {i}", bad)})
    return out


def _text(value, what: str, bad) -> str:
    try:
        return check_text(value, what)
    except DeepSeekError as e:
        raise bad(str(e)) from None


def _optional_text(value, what: str, bad) -> str | None:
    return None if value is None else _text(value, what, bad)


def _reasoning(value, bad) -> dict[int, str]:
    if not isinstance(value, dict) or not all(str(k).isdigit() for k in value):
        raise bad("its reasoning is not a map from message numbers to text")
    return {int(k): _text(v, f"reasoning {k}", bad) for k, v in value.items()}


def _settings(value, bad) -> SamplingSettings:
    names = {f.name for f in fields(SamplingSettings)}
    if not isinstance(value, dict) or not set(value) <= names:
        raise bad("its sampling settings are not mlx-deepseek's")
    try:
        return SamplingSettings(**value).validated()
    except DeepSeekError as e:
        raise bad(str(e)) from None


def _max_tokens(value, bad) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f"its max_tokens {value!r} is not an integer >= 1")
    return value


def _flag(value, bad) -> bool:
    if not isinstance(value, bool):
        raise bad(f"its thinking flag {value!r} is not true or false")
    return value


def _totals(value, bad) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in value.items()
    ):
        raise bad("its totals are not counts")
    return value
