"""Loading: a local folder, a hub repo id, or `demo` -> (model, tokenizer).

Reads raw Hugging Face DeepSeek checkpoints (fp32/bf16/fp16 safetensors, sharded with an
index) and quantized MLX checkpoints in mlx-lm's layout, lazily: tensors stay memory-mapped
until first used. Before building anything it checks that the weights and a default
context's latent cache fit in memory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import ops
from .errors import CheckpointError, ConfigError, OutOfMemoryError
from .models import build_model, model_args
from .models.config import ModelArgs
from .models.deepseek_v3 import Model

log = logging.getLogger("mlx_deepseek")

DEMO_NAME = "demo"
DEFAULT_CONTEXT = 4096
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def demo_path() -> Path:
    return Path(__file__).parent / "demo"


# ---- where the checkpoint is -------------------------------------------------------------


def resolve_model_path(path_or_repo: str | os.PathLike) -> Path:
    """A local folder, the bundled `demo`, or a Hugging Face repo id (cache first, offline-safe)."""
    name = str(path_or_repo)
    if name == DEMO_NAME:
        path = demo_path()
        if not (path / "config.json").exists():
            raise CheckpointError(
                "the bundled demo model is missing from this installation: reinstall mlx-deepseek"
            )
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the checkpoint's folder")
        if not (path / "config.json").exists():
            raise CheckpointError(
                f"{path} is not a checkpoint: it has no config.json (give a folder holding "
                "config.json and *.safetensors, or a Hugging Face repo id)"
            )
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{name}: no such folder, and not a Hugging Face repo id (owner/name)"
        )
    return _download(name)


def _download(repo: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    # huggingface_hub's own reading of HF_HUB_OFFLINE (its spellings of "true")
    is_offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)
    offline = bool(is_offline())
    try:
        return Path(snapshot_download(repo, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except HFValidationError as e:
        raise CheckpointError(f"{repo}: not a valid Hugging Face repo id ({e})") from None
    except LocalEntryNotFoundError as e:
        if offline:
            raise CheckpointError(
                f"{repo}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set so the "
                "hub is not asked: unset HF_HUB_OFFLINE to download it, or pass a local folder"
            ) from None
        cause = type(e.__cause__).__name__ if e.__cause__ is not None else "no answer"
        raise CheckpointError(
            f"{repo}: not in the local Hugging Face cache and the hub cannot be reached "
            f"({cause}): check your network connection, or pass a local folder"
        ) from None
    except GatedRepoError:
        raise CheckpointError(
            f"{repo}: a gated repo: accept its terms on huggingface.co, then log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo}: no such repo on the Hugging Face hub (or a private one: log in with "
            "hf auth login); check the name, or pass a local folder"
        ) from None
    except Exception as e:  # the hub answered with an error: what the cache holds may do
        try:
            return Path(
                snapshot_download(repo, allow_patterns=_HUB_PATTERNS, local_files_only=True)
            )
        except Exception:
            raise CheckpointError(
                f"{repo}: could not download it ({type(e).__name__}) and it is not in the local "
                "Hugging Face cache; check the name and your network, or pass a local folder"
            ) from None


# ---- config and tensors --------------------------------------------------------------------


def load_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None


def weight_files(path: Path) -> list[Path]:
    """The shards of a checkpoint: those its index names (all must exist), else *.safetensors."""
    index = path / "model.safetensors.index.json"
    files: list[Path]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{path}: shard {missing[0]} named in model.safetensors.index.json is missing "
                f"({len(missing)} missing in all): re-download or re-convert the checkpoint"
            )
        extra = path / "mtp.safetensors"
        if extra.exists() and extra not in files:
            files.append(extra)
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    return files


def read_tensors(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:
            raise CheckpointError(
                f"{file}: unreadable safetensors file ({e}); it may be truncated: re-download it"
            ) from None
    return weights


def _parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def default_dtype() -> mx.Dtype:
    """bfloat16 on a GPU; float32 on MLX's CPU backend, where bfloat16 is emulated (~8x slower)."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


# ---- building the model --------------------------------------------------------------------


def _quantize(model: Model, quantization: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Quantize modules the way mlx-lm reads its checkpoints (per-module overrides win)."""

    from mlx_lm.utils import infer_quant_config

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        # bits / group size from the tensors' shapes (a module may differ from the default)
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _add_mtp_copies(model: Model, weights: dict[str, mx.array]) -> None:
    """An MTP layer whose embedding / head differ from the main model's gets its own."""
    args = model.args
    for j, layer in enumerate(model.mtp):
        if f"mtp.{j}.embed_tokens.weight" in weights:
            layer.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        if f"mtp.{j}.shared_head.head.weight" in weights:
            layer.shared_head.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


def _check_tensors(model: Model, weights: dict[str, mx.array], path: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = [k for k in expected if k not in weights]
    if missing:
        raise CheckpointError(
            f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all); the "
            "checkpoint is incomplete or its config.json does not match it"
        )
    unexpected = [k for k in weights if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all); config.json "
            "does not match the weights (e.g. num_hidden_layers, q_lora_rank, n_shared_experts)"
        )
    for k, param in expected.items():
        if tuple(weights[k].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(weights[k].shape)}, but config.json implies "
                f"{tuple(param.shape)}: the config does not match the weights"
            )


def estimate_memory(
    args: ModelArgs, weights: dict[str, mx.array], dtype: mx.Dtype, context: int = DEFAULT_CONTEXT
) -> tuple[int, int]:
    """(weight bytes in the compute dtype, cache bytes for `context` tokens)."""
    total = 0
    for k, v in weights.items():
        if mx.issubdtype(v.dtype, mx.floating) and "e_score_correction_bias" not in k:
            total += v.size * dtype.size
        else:
            total += v.nbytes
    if hasattr(args, "cache_bytes"):  # a family whose cache is not one row per token (V4)
        return total, args.cache_bytes(context, dtype.size)
    per_token = (args.num_hidden_layers + args.num_nextn_predict_layers) * (
        args.kv_lora_rank + args.qk_rope_head_dim
    )
    return total, per_token * context * dtype.size


def available_memory() -> int | None:
    """Bytes MLX may use: the GPU's recommended working set on a Mac, MemAvailable on Linux."""
    if mx.metal.is_available():
        info = mx.device_info()
        return int(info.get("max_recommended_working_set_size") or info.get("memory_size"))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(
    args: ModelArgs, weights: dict[str, mx.array], dtype: mx.Dtype, path: Path
) -> None:
    if os.environ.get("MLX_DEEPSEEK_SKIP_MEMORY_CHECK") == "1":
        return
    need_w, need_c = estimate_memory(args, weights, dtype)
    have = available_memory()
    if have is not None and need_w + need_c > have:
        gb = 1 / 1e9
        raise OutOfMemoryError(
            f"{path.name} needs about {need_w * gb:.1f} GB of weights + {need_c * gb:.1f} GB of "
            f"cache for {DEFAULT_CONTEXT} tokens in {str(dtype).split('.')[-1]}, but only "
            f"{have * gb:.1f} GB is available: use a lower-bit conversion "
            "(mlx-deepseek convert --bits 3), or set MLX_DEEPSEEK_SKIP_MEMORY_CHECK=1 to try anyway"
        )


def _raise_wired_limit() -> None:
    """On a Mac, let MLX wire the GPU's recommended working set (as mlx-lm does); say so."""
    if sys.platform != "darwin" or not mx.metal.is_available():
        return
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if recommended:
        mx.set_wired_limit(recommended)
        print(
            f"mlx-deepseek: MLX's wired-memory limit raised to {recommended / 1e9:.1f} GB "
            "so the weights stay resident",
            file=sys.stderr,
        )


def _tensor_dtype(model: Model, name: str, value: mx.array, compute: mx.Dtype) -> mx.Dtype:
    """Floats in the compute dtype, except the router (weight and bias) in float32."""
    if not mx.issubdtype(value.dtype, mx.floating):
        return value.dtype
    if name.endswith("mlp.gate.weight") or not model.cast_predicate(name):
        return mx.float32
    return compute


def load_model(
    path_or_repo: str | os.PathLike, dtype: str | mx.Dtype | None = None, lazy: bool = False
) -> Model:
    """Build the model from a checkpoint, its tensors read (as mlx-lm does). lazy=True leaves
    them to be read at first use, which must then happen in the thread that loaded them (MLX
    evaluates a graph only on the streams of the thread that built it)."""
    path = resolve_model_path(path_or_repo)
    config = load_config(path)
    args = model_args(config, source=str(path / "config.json"))
    compute = _parse_dtype(dtype)
    model = build_model(args)
    weights = model.sanitize(read_tensors(path))
    _check_memory(args, weights, compute, path)
    # checkpoints often drop the MTP layer(s) their config announces: build only those present
    present = {k.split(".")[1] for k in weights if k.startswith("mtp.")}
    model.mtp = model.mtp[: len(present)]
    _add_mtp_copies(model, weights)
    quantization = config.get("quantization")
    if quantization is None and any(k.endswith(".scales") for k in weights):
        quantization = {}  # quantized tensors without MLX's section (V4's MXFP4 experts)
    if quantization is not None:
        _quantize(model, quantization, weights)
    _check_tensors(model, weights, path)
    weights = {k: v.astype(_tensor_dtype(model, k, v, compute)) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    ops.resolve()  # the back-end for this device: MLX, the CPU strategies or Metal kernels
    ops.prepare(model)  # its one-time changes (the CPU's row-split layers)
    _raise_wired_limit()
    if not lazy:
        mx.eval(model.parameters())
    return model


def eos_token_ids(path: Path) -> list[int]:
    """The EOS ids config.json and generation_config.json name (DeepSeek lists them there)."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        try:
            value = json.loads((path / name).read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            continue
        for i in [value] if isinstance(value, int) else value or []:
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def load_tokenizer(path: Path):
    """mlx-lm's TokenizerWrapper (streaming detokenizer) for the checkpoint's tokenizer (a
    Hugging Face one or Kimi's tiktoken files, read as data: formats.tokenizer), stopping on
    the tokenizer's EOS and every EOS id the checkpoint's configs name."""
    from .formats.tokenizer import load_tokenizer as _load

    return _load(Path(path), eos_token_ids(Path(path)))


def load(path_or_repo: str | os.PathLike, dtype: str | mx.Dtype | None = None, lazy: bool = False):
    """Load a DeepSeek checkpoint: returns (model, tokenizer).

    `path_or_repo`: a local folder, a Hugging Face repo id (resolved offline from the local
    cache when there is no network), or "demo" for the bundled demo model. `dtype` overrides
    the compute dtype ("float32", "bfloat16", "float16"); the default fits the device.
    """
    path = resolve_model_path(path_or_repo)
    model = load_model(path, dtype=dtype, lazy=lazy)
    return model, load_tokenizer(path)
