"""Loading: a local folder, a hub repo id, or `demo` -> (model, tokenizer).

Reads raw Hugging Face DeepSeek checkpoints (fp32/bf16/fp16 safetensors, sharded with an
index) and quantized MLX checkpoints in mlx-lm's layout. Every file is untrusted: before
anything is built, config.json is checked field by field, the shard names the index gives
(checkpoint_files), every safetensors header (safetensors_check), the layer and expert
counts against the tensor names, and whether the weights and a default context's latent
cache fit in memory (from the headers alone). Only then does MLX read a file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import checkpoint_files, offload, ops
from .errors import CheckpointError, ConfigError, OutOfMemoryError
from .models import build_model, model_args
from .models.cache import check_kv_bits, latent_bytes_per_token, latent_group_size
from .models.compressed_tensors import packed_format
from .models.config import ModelArgs
from .models.deepseek_v3 import Model
from .safetensors_check import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    SafetensorsHeader,
    TensorEntry,
    read_safetensors_header,
)

log = logging.getLogger("mlx_deepseek")

DEMO_NAME = "demo"
# the bundled demos: name -> package folder (`demo-v4`: the same data on DeepSeek V4's design)
DEMOS = {DEMO_NAME: "demo", "demo-v4": "demo_v4"}
DEFAULT_CONTEXT = 4096
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
# what Hugging Face accepts as owner/name (huggingface_hub's validate_repo_id, simplified)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# safetensors dtypes MLX's loader cannot read (the model checks the others' meaning)
_MLX_UNREADABLE = ("F64", "F8_E5M2")
# tensor names of a decoder layer, an MTP layer, a routed expert (V4's DeepSeek layout has
# no "model." and calls the MLP "ffn")
# (Kimi K2.5 keeps the language model under `language_model.`)
_LAYER = re.compile(r"^(?:language_model\.)?(?:model\.)?layers\.(\d+)\.")
_MTP = re.compile(r"^(?:language_model\.)?(?:model\.)?mtp\.(\d+)\.")
_EXPERT = re.compile(r"\.(?:mlp|ffn)\.experts\.(\d+)\.")


def demo_path(name: str = DEMO_NAME) -> Path:
    return Path(__file__).parent / DEMOS[name]


# ---- where the checkpoint is -------------------------------------------------------------


def resolve_model_path(path_or_repo: str | os.PathLike) -> Path:
    """A local folder, a bundled demo (`demo`, `demo-v4`), or a Hugging Face repo id (cache
    first, offline-safe)."""
    name = str(path_or_repo)
    if name in DEMOS:
        path = demo_path(name)
        if not (path / "config.json").exists():
            raise CheckpointError(
                "the bundled demo model is missing from this installation: reinstall mlx-deepseek"
            )
        return path
    path = Path(name).expanduser()
    if _exists(path):
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the checkpoint's folder")
        if not (path / "config.json").exists():
            raise CheckpointError(
                f"{path} is not a checkpoint: it has no config.json (give a folder holding "
                "config.json and *.safetensors, or a Hugging Face repo id)"
            )
        return path
    if not looks_like_repo_id(name):
        raise CheckpointError(
            f"{name}: no such folder, and not a Hugging Face repo id (owner/name)"
        )
    owner, rest = name.split("/")
    if Path(owner).is_dir():  # a mistyped local path, not a hub id
        raise CheckpointError(f"{name}: no such folder ({owner}/ exists but holds no {rest})")
    return _download(name)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the OS, or holding a NUL byte
        return False


def looks_like_repo_id(name: str) -> bool:
    """owner/name as the hub spells it: not `./x`, `~/x`, `/abs`, `a/b/c`, spaces, `..`."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


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
    """config.json as a dict: UTF-8 JSON holding an object, or ConfigError (one line)."""
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"{path}: no config.json (give the checkpoint's folder)")
    return checkpoint_files.read_json_object(file, ConfigError)


def weight_files(path: Path) -> list[Path]:
    """The shards of a checkpoint: those its index names (all must exist; plain
    *.safetensors names inside the folder), else *.safetensors; plus mtp.safetensors."""
    return checkpoint_files.weight_files(path, extra=("mtp.safetensors",))


def read_headers(path: Path) -> dict[Path, SafetensorsHeader]:
    """Every shard's validated safetensors header (nothing but headers is read)."""
    return {f: read_safetensors_header(f) for f in weight_files(path)}


def tensor_entries(
    path: Path, headers: dict[Path, SafetensorsHeader] | None = None
) -> dict[str, tuple[Path, TensorEntry]]:
    """Tensor name -> (shard, header entry), the index's claims checked against the shards."""
    headers = read_headers(path) if headers is None else headers
    located = checkpoint_files.tensor_map(path, headers, checkpoint_files.read_index(path))
    for name, (file, entry) in located.items():
        if entry.dtype in _MLX_UNREADABLE:
            raise CheckpointError(
                f"{file}: tensor {name} has dtype {entry.dtype}, which MLX cannot read: "
                "convert it to bfloat16 or float32 first"
            )
    return located


def read_tensors(
    path: Path, headers: dict[Path, SafetensorsHeader] | None = None
) -> dict[str, mx.array]:
    """Every tensor, lazily (memory-mapped by MLX), after every header has been validated."""
    headers = read_headers(path) if headers is None else headers
    located = tensor_entries(path, headers)
    loaded: dict[Path, dict[str, mx.array]] = {}
    for file in headers:
        if file.suffix != checkpoint_files.SUFFIX:  # MLX picks its parser by extension
            raise CheckpointError(f"{file}: not a .safetensors file")
        try:
            loaded[file] = mx.load(str(file))
        except Exception as e:
            raise CheckpointError(
                f"{file}: unreadable safetensors file ({e}); it may be truncated: re-download it"
            ) from None
    return {name: loaded[file][name] for name, (file, _) in located.items()}


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
        floating = mx.issubdtype(param.dtype, mx.floating)
        if floating != mx.issubdtype(weights[k].dtype, mx.floating) or (
            not floating and weights[k].dtype != param.dtype
        ):
            raise CheckpointError(
                f"{path}: tensor {k} is {str(weights[k].dtype).split('.')[-1]}, but the model "
                f"needs {'a float' if floating else str(param.dtype).split('.')[-1]} tensor "
                "there: the checkpoint is corrupt or its quantization section is wrong"
            )


def estimate_memory(
    args: ModelArgs,
    tensors: Mapping[str, TensorEntry | mx.array],
    dtype: mx.Dtype,
    context: int = DEFAULT_CONTEXT,
    kv_bits: int | None = None,
) -> tuple[int, int]:
    """(weight bytes in the compute dtype, cache bytes for `context` tokens). `tensors`:
    safetensors header entries (the preflight: nothing built or read) or arrays."""
    total = 0
    for name, t in tensors.items():
        if isinstance(t, TensorEntry):  # ue8m0 scales stay bytes; FP8 weights become floats
            floating = t.dtype in FLOAT_DTYPES and t.dtype != "F8_E8M0"
            size, nbytes = math.prod(t.shape), math.prod(t.shape) * DTYPE_SIZES[t.dtype]
        else:
            floating, size, nbytes = mx.issubdtype(t.dtype, mx.floating), t.size, t.nbytes
        if floating and "e_score_correction_bias" not in name:
            total += size * dtype.size
        else:
            total += nbytes
    if hasattr(args, "cache_bytes"):  # a family whose cache is not one row per token (V4)
        return total, args.cache_bytes(context, dtype.size, kv_bits)
    if kv_bits is not None:  # MLA's latent, c_kv quantized (V2/V3 only: load_model checks)
        per_layer = latent_bytes_per_token(args.kv_lora_rank, args.qk_rope_head_dim, dtype, kv_bits)
        return total, cache_layers(args) * per_layer * context
    return total, cache_values_per_token(args) * context * dtype.size


def cache_layers(args: ModelArgs) -> int:
    """Layers that cache: the main ones plus the MTP layers that run (V3's family only)."""
    mtp = args.num_nextn_predict_layers if args.model_type == "deepseek_v3" else 0
    return args.num_hidden_layers + mtp


def cache_values_per_token(args: ModelArgs) -> int:
    """KV-cache values one token adds over all layers (MTP layers that run included): MLA's
    latent, V3.2's latent + indexer key, DeepSeekMoE 16B's per-head K and V."""
    return cache_layers(args) * args.kv_values_per_layer


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
    args: ModelArgs,
    tensors: Mapping[str, TensorEntry | mx.array],
    dtype: mx.Dtype,
    path: Path,
    kv_bits: int | None = None,
    experts: offload.ExpertShape | None = None,
    budget: offload.Budget | None = None,
) -> int | None:
    """Refuse a model that cannot fit (offering the expert budget that would), and with
    `budget` return the slots per MoE layer it gives (experts: the routed experts' shape)."""
    skip = os.environ.get("MLX_DEEPSEEK_SKIP_MEMORY_CHECK") == "1"
    need_w, need_c = estimate_memory(args, tensors, dtype, kv_bits=kv_bits)
    have = available_memory()
    others = need_w - (experts.total if experts else 0) + need_c  # all but the routed experts
    room = None if have is None else have - others
    dtype_name = str(dtype).split(".")[-1]
    what = f"{format_bytes(need_c)} of cache for {DEFAULT_CONTEXT} tokens in {dtype_name}"
    if budget is not None:
        slots = offload.slots_for(budget, experts, room)
        need = others + experts.nbytes(slots)
        if not skip and have is not None and need > have:
            fit = _fitting_budget(experts, room)
            raise OutOfMemoryError(
                f"{path.name} with --expert-cache {budget.text} needs about {format_bytes(need)} "
                f"({format_bytes(experts.nbytes(slots))} of experts, the rest resident, {what}), "
                f"but only {format_bytes(have)} is available: "
                + (f"give --expert-cache {fit} or less" if fit else "use a lower-bit conversion")
            )
        return slots
    if skip or have is None or need_w + need_c <= have:
        return None
    fit = _fitting_budget(experts, room) if experts is not None else None
    offer = (
        f"stream the routed experts from the SSD with --expert-cache {fit} (or auto; "
        f"load(..., expert_cache=...)), use a lower-bit conversion"
        if fit
        else "use a lower-bit conversion"
    )
    raise OutOfMemoryError(
        f"{path.name} needs about {format_bytes(need_w)} of weights + {what}, but only "
        f"{format_bytes(have)} is available: {offer} (mlx-deepseek convert --bits 3), or set "
        "MLX_DEEPSEEK_SKIP_MEMORY_CHECK=1 to try anyway"
    )


def _fitting_budget(experts: offload.ExpertShape, room: int | None) -> str | None:
    """The largest --expert-cache that fits in `room` bytes (as "auto" takes it), or None.
    Whole slots, printed rounded up: read back, it gives the same slots."""
    if room is None:
        return None
    slots = min(int(room * offload.HEADROOM) // (experts.layers * experts.expert_bytes),
                experts.experts)  # fmt: skip
    return offload.gb(experts.nbytes(slots)) if slots >= experts.top_k else None


def format_bytes(n: int) -> str:
    """1.23 GB, or 45.6 MB below 0.1 GB (a tiny model is not "0.00 GB")."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def mtp_layers_used(args: ModelArgs) -> int:
    """The MTP layers the family runs: V2, V3.2 and DeepSeekMoE 16B run none (a V3.2
    checkpoint's MTP layer is dropped, as mlx-lm does)."""
    if args.model_type in ("deepseek_v2", "deepseek_v32", "deepseek"):
        return 0
    return args.num_nextn_predict_layers


def mtp_layers_present(args: ModelArgs, names: Iterable[str]) -> int:
    """How many of the MTP layers the config announces the checkpoint holds (raw layout:
    model.layers.{num_hidden_layers + j}; converted: mtp.{j})."""
    n_main = args.num_hidden_layers
    n_mtp = mtp_layers_used(args)
    found = set()
    for name in names:
        m = _LAYER.match(name) or _MTP.match(name)
        if m is None:
            continue
        j = int(m.group(1)) - (n_main if m.re is _LAYER else 0)
        if 0 <= j < n_mtp:
            found.add(j)
    return len(found)


def check_layers(args: ModelArgs, names: Iterable[str], path: Path) -> None:
    """The config's layer and expert counts against what the tensor names hold, before
    anything that size is built or listed (a config saying 10,000,000 layers fails here)."""
    main: set[int] = set()
    experts: set[int] = set()
    for name in names:
        m = _LAYER.match(name)
        if m and int(m.group(1)) < args.num_hidden_layers:
            main.add(int(m.group(1)))
        e = _EXPERT.search(name)
        if e:
            experts.add(int(e.group(1)))
    if len(main) < args.num_hidden_layers:
        held = f"layers {min(main)}..{max(main)}" if main else "no decoder layers"
        raise CheckpointError(
            f"{path / 'config.json'}: num_hidden_layers={args.num_hidden_layers}, but the "
            f"weights hold {held} ({len(main)} in all): the config does not match the weights"
        )
    if experts and (args.n_routed_experts or 0) > len(experts):
        raise CheckpointError(
            f"{path / 'config.json'}: n_routed_experts={args.n_routed_experts}, but the "
            f"weights hold {len(experts)} experts per layer: the config does not match the weights"
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


def read_checkpoint(path: Path) -> tuple[ModelArgs, dict[str, Any], dict[Path, SafetensorsHeader]]:
    """config.json (every field checked), the shard names and every safetensors header
    (validated): (args, config, headers). Reads nothing else."""
    config = load_config(path)
    args = model_args(config, source=str(path / "config.json"))
    return args, config, read_headers(path)


def check_checkpoint(path: Path) -> tuple[ModelArgs, dict[str, Any], dict[Path, SafetensorsHeader]]:
    """What loading checks before it builds anything: read_checkpoint, the index's claims,
    the layer and expert counts. The converter runs it on its output before publishing it."""
    args, config, headers = read_checkpoint(path)
    check_layers(args, tensor_entries(path, headers), path)
    return args, config, headers


def load_model(
    path_or_repo: str | os.PathLike,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    expert_cache: str | int | None = None,
    kv_bits: int | None = None,
) -> Model:
    """Build the model from a checkpoint, its tensors read (as mlx-lm does). lazy=True leaves
    them to be read at first use, which must then happen in the thread that loaded them (MLX
    evaluates a graph only on the streams of the thread that built it).

    expert_cache: stream the routed experts from the checkpoint files, keeping at most this
    much of them in memory (bytes, "40GB", "25%" of the routed experts, or "auto"); kv_bits:
    quantize the KV cache to 8 or 4 bits (V2/V3: the latent c_kv; V4: its compressed
    rows)."""
    path = resolve_model_path(path_or_repo)
    compute = _parse_dtype(dtype)
    kv_bits = check_kv_bits(kv_bits)
    budget = None if expert_cache is None else offload.parse_budget(expert_cache)
    args, config, headers = check_checkpoint(path)
    packed_format(config, str(path / "config.json"))  # an unsupported INT scheme: one line
    tensors = {name: entry for name, (_, entry) in tensor_entries(path, headers).items()}
    if kv_bits is not None:
        if hasattr(args, "kv_group_size"):  # V4: its compressed rows
            args.kv_group_size()  # a width MLX cannot group is refused now
        elif args.model_type not in ("deepseek_v2", "deepseek_v3"):  # V3.2, DeepSeekMoE 16B
            raise ConfigError(
                f"kv_bits={kv_bits}: only MLA's latent cache (V2, V2.5, V3, R1, V3.1, Kimi) and "
                f"V4's compressed rows are quantized; model_type {args.model_type}'s cache is "
                "not yet: drop --kv-bits"
            )
        else:
            latent_group_size(args.kv_lora_rank)  # a rank MLX cannot group is refused now
    refused = None  # refused before anything is built; the refusal raised below names the
    if budget is None:  # --expert-cache that fits, once the experts' shapes are known
        try:
            _check_memory(args, tensors, compute, path, kv_bits)
        except OutOfMemoryError as e:
            need = estimate_memory(args, tensors, compute, kv_bits=kv_bits)
            if need[1] >= (available_memory() or 0):  # no expert budget can help: now
                raise
            refused, early_need = e, need
    # checkpoints often drop the MTP layer(s) their config announces: build only those present
    announced = args  # the memory checks count the cache of the layers the config announces
    present = mtp_layers_present(args, tensors)
    if present < mtp_layers_used(args):
        args = dataclasses.replace(args, num_nextn_predict_layers=present)
    model = build_model(args)  # lazily: nothing is read or evaluated yet
    weights = model.sanitize(read_tensors(path, headers))

    def dtype_of(name: str, value: mx.array) -> mx.Dtype:
        return _tensor_dtype(model, name, value, compute)

    plan = None
    if budget is not None:
        try:
            plan = offload.plan_streaming(weight_files(path), weights, args, dtype_of)
        except offload.NotStreamable as e:
            print(
                f"mlx-deepseek: --expert-cache: {e}, so the routed experts cannot be read by "
                "offset; loading them all into memory instead",
                file=sys.stderr,
            )
            budget = None
            refused = True  # the memory check (skipped above) runs now
    slots = None
    if budget is not None or refused:
        experts = plan.shape if plan else offload.routed_shape(weights, args, dtype_of)
        slots = _check_memory(announced, weights, compute, path, kv_bits, experts, budget)
        if isinstance(refused, OutOfMemoryError):  # the arrays' estimate fits after all (e.g.
            # fewer MTP layers than announced): the first refusal stands, with the offer
            room = (available_memory() or 0) - sum(early_need)
            fit = None if experts is None else _fitting_budget(experts, room + experts.total)
            if fit is None:
                raise refused
            raise OutOfMemoryError(
                f"{refused}; or stream the routed experts from the SSD with --expert-cache {fit}"
            ) from None
    _add_mtp_copies(model, weights)
    quantization = config.get("quantization")
    if quantization is None and any(k.endswith(".scales") for k in weights):
        # quantized tensors without MLX's section (V4's MXFP4 experts, compressed-tensors'
        # INT4 mapped by weights.sanitize): bits / group size from each tensor's shape
        quantization = {}
    if quantization is not None:
        _quantize(model, quantization, weights)
    if plan is not None:
        store = offload.install(model, plan, slots, weights, dtype_of)
        print(f"mlx-deepseek: routed experts stream from {path.name}: {store.describe()}",
              file=sys.stderr)  # fmt: skip
    _check_tensors(model, weights, path)
    weights = {k: v.astype(_tensor_dtype(model, k, v, compute)) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if kv_bits is not None:
        set_kv_bits(model, kv_bits)
    ops.resolve()  # the back-end for this device: MLX, the CPU strategies or Metal kernels
    ops.prepare(model)  # its one-time changes (the CPU's row-split layers)
    _raise_wired_limit()
    if not lazy:
        mx.eval(model.parameters())
    return model


def set_kv_bits(model: nn.Module, kv_bits: int | None) -> None:
    """Quantize the latent (V4: compressed) rows of the caches `model.make_cache()` makes from
    now on to `kv_bits` (None: full precision), in the model's own group size."""
    args = model.args
    group = args.kv_group_size() if hasattr(args, "kv_group_size") else None
    model.kv_bits = kv_bits
    model.kv_group_size = group or latent_group_size(args.kv_lora_rank)


def eos_token_ids(path: Path) -> list[int]:
    """The EOS ids config.json and generation_config.json name (DeepSeek lists them there)."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        if not (path / name).is_file():
            continue
        value = checkpoint_files.read_json_object(path / name, ConfigError).get("eos_token_id")
        values = [value] if not isinstance(value, list) else value
        for i in values:
            if i is None and value is None:
                continue
            if type(i) is not int or i < 0:
                raise ConfigError(
                    f"{path / name}: eos_token_id={value!r:.60} is not a token id (an integer "
                    ">= 0) or a list of them"
                )
            if i not in ids:
                ids.append(i)
    return ids


def load_tokenizer(path: Path):
    """mlx-lm's TokenizerWrapper (streaming detokenizer) for the checkpoint's tokenizer (a
    Hugging Face one or Kimi's tiktoken files, read as data: formats.tokenizer), stopping on
    the tokenizer's EOS and every EOS id the checkpoint's configs name."""
    from .formats.tokenizer import load_tokenizer as _load

    return _load(Path(path), eos_token_ids(Path(path)))


def load(
    path_or_repo: str | os.PathLike,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    expert_cache: str | int | None = None,
    kv_bits: int | None = None,
):
    """Load a DeepSeek checkpoint: returns (model, tokenizer).

    `path_or_repo`: a local folder, a Hugging Face repo id (resolved offline from the local
    cache when there is no network), or "demo" / "demo-v4" for a bundled demo. `dtype` overrides
    the compute dtype ("float32", "bfloat16", "float16"); the default fits the device.
    `expert_cache`: keep at most this much of the routed experts in memory and read the rest
    from the checkpoint when used (bytes, "40GB", "25%", "auto"); `kv_bits`: 8 or 4 to
    quantize the latent KV cache (see load_model).
    """
    path = resolve_model_path(path_or_repo)
    model = load_model(path, dtype=dtype, lazy=lazy, expert_cache=expert_cache, kv_bits=kv_bits)
    return model, load_tokenizer(path)
