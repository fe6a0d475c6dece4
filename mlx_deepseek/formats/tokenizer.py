"""Loading a checkpoint's tokenizer, with every failure as one line (CheckpointError).

- Hugging Face tokenizers (tokenizer.json, DeepSeek's byte-level BPE) go through mlx-lm's
  loader (its streaming detokenizers), never with remote code;
- Kimi's tiktoken tokenizer (tiktoken.model + tokenization_kimi.py) is read as data
  (tiktoken_tokenizer.py);
- refused before anything is loaded: no tokenizer files, a tokenizer_config.json that is
  not a JSON object, a tokenizer that exists only as remote code (`auto_map` naming a
  Python class and no tokenizer.json), and `chat_template_type` / `tool_parser_type` names
  mlx-lm does not have (it would import `mlx_lm.chat_templates.<name>` blindly).
"""

from __future__ import annotations

import json
import pkgutil
import re
from pathlib import Path
from typing import Any

from mlx_deepseek.checkpoint_files import read_json_object
from mlx_deepseek.errors import CheckpointError

from .tiktoken_tokenizer import RANKS_FILE, TiktokenTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", RANKS_FILE)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _modules(package: str) -> set[str]:
    try:
        module = __import__(package, fromlist=["__path__"])
    except ImportError:
        return set()
    return {m.name for m in pkgutil.iter_modules(module.__path__)}


def _check_names(config: dict[str, Any], file: Path) -> None:
    for key, package in (
        ("chat_template_type", "mlx_lm.chat_templates"),
        ("tool_parser_type", "mlx_lm.tool_parsers"),
    ):
        value = config.get(key)
        if value is None:
            continue
        known = _modules(package)
        if not isinstance(value, str) or not _NAME.match(value) or value not in known:
            raise CheckpointError(
                f"{file}: {key}={value!r} is not one mlx-lm knows ({', '.join(sorted(known))}); "
                f"remove the field or fix its value"
            )


def _remote_class(config: dict[str, Any]) -> str | None:
    """The Python class tokenizer_config.json's auto_map names for AutoTokenizer, if any."""
    auto = config.get("auto_map")
    if not isinstance(auto, dict):
        return None
    target = auto.get("AutoTokenizer")
    if isinstance(target, (list, tuple)):
        target = next((t for t in target if isinstance(t, str)), None)
    return target if isinstance(target, str) else None


def load_tokenizer(path: Path, eos_token_ids: list[int] | None = None) -> Any:
    """mlx-lm's TokenizerWrapper around the checkpoint's tokenizer (see the module doc)."""
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, TokenizerWrapper

    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); copy them from "
            "the original Hugging Face repo"
        )
    file = path / "tokenizer_config.json"
    config = read_json_object(file) if file.exists() else {}
    _check_names(config, path / "tokenizer_config.json")
    if (path / RANKS_FILE).exists():
        tok = TiktokenTokenizer(path)
        return TokenizerWrapper(tok, NaiveStreamingDetokenizer, eos_token_ids=eos_token_ids)
    remote = _remote_class(config)
    if remote and not (path / "tokenizer.json").exists():
        raise CheckpointError(
            f"{path}: its tokenizer is remote code ({remote}) and mlx-deepseek never runs "
            "code from a checkpoint; add the tokenizer.json of the original repo"
        )
    from mlx_lm.tokenizer_utils import load as mlx_lm_load

    try:
        return mlx_lm_load(path, {"trust_remote_code": False}, eos_token_ids=eos_token_ids or None)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: a tokenizer file is not valid JSON ({e.msg} at line {e.lineno}); "
            "re-download it"
        ) from None
    except Exception as e:  # noqa: BLE001 (transformers / tokenizers raise many kinds)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: cannot load its tokenizer ({type(e).__name__}: {first[:200]}); the "
            "tokenizer files are incomplete or damaged: copy them again from the original repo"
        ) from None
