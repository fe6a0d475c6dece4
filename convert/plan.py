"""The conversion plan: every source tensor checked, every output tensor decided, up front.

Built from config.json and the safetensors headers only (plus a byte comparison of MTP's
embedding / head copies), so a bad checkpoint fails here, before anything is written, and
the writer knows every output tensor's dtype, shape and offset in advance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlx_deepseek.errors import CheckpointError, ConfigError, DeepSeekError
from mlx_deepseek.loading import check_layers, mtp_layers_present
from mlx_deepseek.models import model_args
from mlx_deepseek.models.compressed_tensors import PackedFormat, packed_format
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.weights import K25_PREFIX, VISION_PREFIXES

from . import layout_v4
from .fp8 import DEFAULT_BLOCK, scale_shape
from .layout import Entry, expected_entries, is_ignorable, kv_b_outputs, mtp_layers
from .packed import check_scale_dtype, find_packed, is_packed_part
from .reader import FLOAT_DTYPES, INT_DTYPES, SourceCheckpoint, TensorInfo, check_dtype
from .recipe import QuantSpec, Recipe, quantization_section
from .writer import OutTensor

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
FP4_GROUP = 32  # values per E8M0 scale of an FP4 weight (MXFP4)
E8M0 = ("F8_E8M0", "U8")  # power-of-two scale bytes, 2^(b - 127)
_ALLOWED = {
    "linear": (*FLOAT_DTYPES, "F8_E4M3", "I8"),  # I8: FP4 e2m1, two values a byte
    "vector": FLOAT_DTYPES,
    "table": INT_DTYPES,
}


def source_format(info: TensorInfo) -> str:
    """How a tensor is stored: "fp8" (e4m3 + block scales), "fp4" (e2m1 packed two per int8
    byte + E8M0 scales per 32) or "float"."""
    return {"F8_E4M3": "fp8", "I8": "fp4"}.get(info.dtype, "float")


@dataclass(frozen=True)
class Options:
    bits: int = 4
    group_size: int = 64
    recipe: str = "uniform"
    dtype: str | None = None  # None: the source's torch_dtype if float16/bfloat16/float32
    quantize: bool = True
    mtp: bool = True
    shard_size: int = 5 * 10**9


@dataclass
class Job:
    """One source tensor -> its output tensor(s); `specs` maps output module -> quantization."""

    entry: Entry
    src: TensorInfo
    scale: TensorInfo | None
    specs: dict[str, QuantSpec | None]
    dtype: mx.Dtype
    packed: PackedFormat | None = None  # src / scale are compressed-tensors' packed weight

    @property
    def read_bytes(self) -> int:
        return self.src.nbytes + (self.scale.nbytes if self.scale else 0)

    @property
    def fmt(self) -> str:
        return source_format(self.src)


@dataclass
class Plan:
    args: ModelArgs
    options: Options
    dtype: mx.Dtype
    block: tuple[int, int]
    jobs: list[Job]
    tensors: list[OutTensor]
    config: dict[str, Any]
    params: int  # weights the output represents (a quantized weight counts its unpacked size)
    notes: list[str] = field(default_factory=list)

    @property
    def read_bytes(self) -> int:
        return sum(j.read_bytes for j in self.jobs)

    @property
    def write_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def out_dtype_name(source_config: dict[str, Any], requested: str | None) -> str:
    if requested is not None:
        if requested not in DTYPES:
            raise DeepSeekError(f"--dtype {requested}: use one of {', '.join(DTYPES)}")
        return requested
    src = source_config.get("torch_dtype") or source_config.get("dtype")
    return src if src in DTYPES else "bfloat16"


def make_plan(source: SourceCheckpoint, options: Options) -> Plan:
    config = source.config
    cfg_path = str(source.folder / "config.json")
    if "quantization" in config:
        raise ConfigError(
            f"{cfg_path}: this checkpoint is already converted (it has a quantization section); "
            "convert reads the original Hugging Face checkpoint"
        )
    packed = packed_format(config, cfg_path)  # compressed-tensors INT4 (Kimi K2-Thinking)
    block = DEFAULT_BLOCK if packed else _fp8_block(config, cfg_path)
    v4 = config.get("model_type") == "deepseek_v4"
    args = model_args(config, source=cfg_path)
    check_layers(args, source.tensors, source.folder)  # before listing every expected tensor
    dtype_name = out_dtype_name(config, options.dtype)
    dtype = DTYPES[dtype_name]
    recipe = Recipe(options.recipe, options.bits, options.group_size)
    if recipe.name == "native" and not v4:
        raise DeepSeekError(
            f"--recipe native keeps DeepSeek V4's released FP8 / FP4 weights; {cfg_path} is "
            f"model_type {config.get('model_type')!r}: use --recipe uniform or mixed"
        )
    notes: list[str] = []
    if args.label == "kimi_k25":
        notes.append(_k25_text_tensors(source))
    if args.model_type not in ("deepseek_v3", "deepseek_v4") and args.num_nextn_predict_layers:
        notes.append(f"{args.label} runs without its MTP layer: not converted")

    def entries_for(keep_mtp: bool) -> list[Entry]:
        if not v4:
            return expected_entries(args, keep_mtp)
        layout = layout_v4.source_layout(source.tensors)
        return layout_v4.expected_entries(args, keep_mtp, layout)

    keep_mtp = options.mtp and mtp_layers(args) > 0
    present = mtp_layers_present(args, source.tensors)
    if keep_mtp and present == 0:
        notes.append("the checkpoint has no MTP layer; converted without it")
        keep_mtp = False
    elif keep_mtp and present < mtp_layers(args):
        raise CheckpointError(
            f"{cfg_path}: num_nextn_predict_layers={args.num_nextn_predict_layers}, but the "
            f"weights hold {present} MTP layer(s): fix the config, or convert with --no-mtp"
        )
    entries = entries_for(keep_mtp)

    found, packed_entries = _check_tensors(source, entries, block, args, packed)
    if keep_mtp and not v4:
        notes.extend(_drop_mtp_copies(source, args, found))
    _check_extras(source, entries, args, keep_mtp)

    jobs: list[Job] = []
    tensors: list[OutTensor] = []
    stacked: set[str] = set()
    params = 0
    decisions: dict[str, QuantSpec | None] = {}
    for e, (info, scale) in sorted(
        found.items(), key=lambda kv: (source.file_order[kv[1][0].file], kv[1][0].offset)
    ):
        params += math.prod(e.shape)
        if e.kind in ("vector", "table"):
            out_dt = mx.float32 if e.role == "router_bias" or e.keep_float32 else dtype
            out_dt = mx.int32 if e.kind == "table" else out_dt
            jobs.append(Job(e, info, scale, {}, out_dt))
            tensors.append(OutTensor(e.out, out_dt, e.shape))
            continue
        fmt = source_format(info)
        parts = kv_b_outputs(args, e.out) if e.kind == "kv_b" else ((e.out, e.shape),)
        specs: dict[str, QuantSpec | None] = {}
        # a packed weight stays as it is (a kv_b_proj, split per head, cannot)
        keep = e in packed_entries and e.kind == "linear" and options.quantize
        if keep:
            check_scale_dtype(scale, dtype)
        for out, shape in parts:
            module = out.rsplit(".", 1)[0]
            spec = recipe.spec(e.role, shape[-1], fmt) if options.quantize else None
            if keep:
                spec = QuantSpec(packed.bits, packed.group_size)
            specs[module] = spec
            if options.quantize:
                decisions[module] = spec
            if e.expert is not None:
                if out in stacked:
                    continue
                stacked.add(out)
                shape = (e.n_experts, *shape)
            tensors += _outputs(module, shape, spec, dtype)
        jobs.append(Job(e, info, scale, specs, dtype, packed if e in packed_entries else None))
    if packed_entries:
        notes.append(_packed_note(packed, options, recipe, len(packed_entries)))

    fp4 = {j.entry.module for j in jobs if j.fmt == "fp4"}
    if fp4 and options.quantize and recipe.name != "native" and options.bits != 4:
        notes.append(
            f"{len(fp4)} FP4 weight stacks (routed experts) kept as released: MLX mxfp4, bit "
            f"for bit (4.25 bits per weight); --bits {options.bits} applies to the others"
        )
    out_config = _text_config(config) if args.label == "kimi_k25" else dict(config)
    out_config.pop("quantization_config", None)  # the source's FP8 / FP4 / INT4 description
    if options.quantize:
        out_config["quantization"] = quantization_section(recipe, decisions)
    if args.num_nextn_predict_layers and not keep_mtp:
        out_config["num_nextn_predict_layers"] = 0
    for key in ("torch_dtype", "dtype"):
        if key in out_config:
            out_config[key] = dtype_name
    # what will be written must load back: the loader's own field checks on it
    model_args(out_config, source=f"{cfg_path} (as converted)")
    return Plan(args, options, dtype, block, jobs, tensors, out_config, params, notes)


def _outputs(
    module: str, shape: tuple[int, ...], spec: QuantSpec | None, dtype: mx.Dtype
) -> list[OutTensor]:
    if spec is None:
        return [OutTensor(f"{module}.weight", dtype, shape)]
    *lead, cols = shape
    groups = (*lead, cols // spec.group_size)
    out = [
        OutTensor(f"{module}.weight", mx.uint32, (*lead, cols * spec.bits // 32)),
        OutTensor(f"{module}.scales", dtype if spec.biases else mx.uint8, groups),
    ]
    return out + [OutTensor(f"{module}.biases", dtype, groups)] if spec.biases else out


def _fp8_block(config: dict[str, Any], cfg_path: str) -> tuple[int, int]:
    qc = config.get("quantization_config")
    if not qc:
        return DEFAULT_BLOCK
    if not isinstance(qc, dict):
        raise ConfigError(f"{cfg_path}: quantization_config={qc!r:.60} is not an object")
    method = qc.get("quant_method")
    if method != "fp8":
        raise ConfigError(
            f"{cfg_path}: quantization_config.quant_method={method!r} is not supported; convert "
            "reads bf16/fp16/fp32 checkpoints and DeepSeek's FP8 (quant_method fp8)"
        )
    block = qc.get("weight_block_size", list(DEFAULT_BLOCK))
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"{cfg_path}: quantization_config.weight_block_size={block!r} is not [rows, cols]"
        )
    return block[0], block[1]


def _check_tensors(
    source: SourceCheckpoint,
    entries: list[Entry],
    block: tuple[int, int],
    args: ModelArgs,
    packed: PackedFormat | None,
) -> tuple[dict[Entry, tuple[TensorInfo, TensorInfo | None]], set[Entry]]:
    found: dict[Entry, tuple[TensorInfo, TensorInfo | None]] = {}
    packed_entries: set[Entry] = set()
    missing: list[str] = []
    for e in entries:
        info = source.tensors.get(e.src)
        if info is None:
            pair = find_packed(source, e, packed)
            if pair is not None:
                found[e] = pair
                packed_entries.add(e)
            elif not e.optional:
                missing.append(e.src)
            continue
        fmt = source_format(info)
        want = e.shape if fmt != "fp4" else (*e.shape[:-1], e.shape[-1] // 2)
        if info.shape != want or (fmt == "fp4" and e.shape[-1] % FP4_GROUP):
            note = " (FP4: two values a byte)" if fmt == "fp4" else ""
            raise CheckpointError(
                f"{info.file.name}: tensor {e.src} has shape {list(info.shape)}{note}, but "
                f"config.json implies {list(want)}: the weights do not match their config "
                f"(model_type {args.model_type}, {args.num_hidden_layers} layers)"
            )
        check_dtype(info)
        allowed = _ALLOWED[
            "table" if e.kind == "table" else "linear" if e.kind != "vector" else "vector"
        ]
        if info.dtype not in allowed:
            raise CheckpointError(
                f"{info.file.name}: tensor {e.src} has dtype {info.dtype}, but this {e.kind} "
                f"must be one of {', '.join(allowed)}: the checkpoint is corrupt or its "
                "config.json does not match it"
            )
        scale = None
        if fmt == "fp8":
            scale = _fp8_scale(source, info, block, args.model_type == "deepseek_v4")
        elif fmt == "fp4":
            scale = _fp4_scale(source, info)
        found[e] = (info, scale)
    if missing:
        raise CheckpointError(
            f"{source.folder}: tensor {missing[0]} is missing ({len(missing)} missing in all): "
            "the checkpoint is incomplete (a shard or index entry lost?) or its config.json "
            "does not match it"
        )
    return found, packed_entries


def _k25_text_tensors(source: SourceCheckpoint) -> str:
    """Kimi K2.5: read the language model's tensors under their own names; drop the vision
    tower and projector (the converted checkpoint is text only)."""
    tensors, dropped = {}, 0
    for name, info in source.tensors.items():
        if name.startswith(VISION_PREFIXES):
            dropped += 1
            continue
        tensors[name[len(K25_PREFIX) :] if name.startswith(K25_PREFIX) else name] = info
    source.tensors = tensors
    return (
        f"kimi_k25: the language model only ({dropped} vision tensors dropped), written as "
        "model_type kimi_k2 (DeepSeek-V3's architecture)"
    )


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """K2.5's text_config as the converted checkpoint's config.json (model_type kimi_k2),
    with the wrapper's token ids where the text config has none."""
    text = dict(config["text_config"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if text.get(key) is None and config.get(key) is not None:
            text[key] = config[key]
    return {**text, "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]}


def _packed_note(fmt: PackedFormat, options: Options, recipe: Recipe, n: int) -> str:
    if not options.quantize:
        return f"{n} packed INT{fmt.bits} weights dequantized for --no-quantize (exact in float32)"
    how = f"{fmt.bits}-bit, group {fmt.group_size}"
    differs = (fmt.bits, fmt.group_size) != (recipe.bits, recipe.group_size)
    return (
        f"{n} compressed-tensors weights kept as they are ({how}, MLX affine, not requantized)"
        + ("; --bits / --group-size apply to the other weights" if differs else "")
    )


def scale_name(name: str, v4: bool) -> str:
    """The scale tensor of a quantized weight: V4's `X.scale` for `X.weight`, V3's
    `W_scale_inv`."""
    if v4 and name.endswith(".weight"):
        return f"{name[: -len('.weight')]}.scale"
    return f"{name}_scale_inv"


def _fp8_scale(
    source: SourceCheckpoint, info: TensorInfo, block: tuple[int, int], v4: bool
) -> TensorInfo:
    name = scale_name(info.name, v4)
    scale = source.tensors.get(name)
    if len(info.shape) != 2:
        raise CheckpointError(f"{info.file.name}: tensor {info.name} is FP8 but not a matrix")
    if scale is None:
        raise CheckpointError(
            f"{source.folder}: tensor {name} is missing: the FP8 weight {info.name} cannot be "
            "dequantized without it (a shard or index entry lost?)"
        )
    want = scale_shape(info.shape, block)
    if scale.shape != want or scale.dtype not in (*FLOAT_DTYPES, *E8M0):
        raise CheckpointError(
            f"{scale.file.name}: tensor {name} is {scale.dtype} {list(scale.shape)}, but a "
            f"{list(info.shape)} weight with {block[0]}x{block[1]} blocks needs a float or "
            f"ue8m0 {list(want)}: the checkpoint is corrupt or weight_block_size is wrong"
        )
    return scale


def _fp4_scale(source: SourceCheckpoint, info: TensorInfo) -> TensorInfo:
    """The E8M0 scales [out, in / 32] of an FP4 weight [out, in / 2]."""
    name = scale_name(info.name, v4=True)
    scale = source.tensors.get(name)
    if scale is None:
        raise CheckpointError(
            f"{source.folder}: tensor {name} is missing: the FP4 weight {info.name} means "
            "nothing without its E8M0 scales (a shard or index entry lost?)"
        )
    rows, half = info.shape
    want = (rows, 2 * half // FP4_GROUP)
    if scale.shape != want or scale.dtype not in E8M0:
        raise CheckpointError(
            f"{scale.file.name}: tensor {name} is {scale.dtype} {list(scale.shape)}, but the "
            f"FP4 weight {info.name} ({rows} x {2 * half} values) needs E8M0 (F8_E8M0) scales "
            f"{list(want)}, one per {FP4_GROUP}: the checkpoint is corrupt"
        )
    return scale


Found = dict[Entry, tuple[TensorInfo, TensorInfo | None]]


def _drop_mtp_copies(source: SourceCheckpoint, args: ModelArgs, found: Found) -> list[str]:
    """Drop MTP's embed_tokens / shared_head.head when byte-identical to the main model's."""
    main_head = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    mains = {
        ".embed_tokens.weight": "model.embed_tokens.weight",
        ".shared_head.head.weight": main_head,
    }
    notes = []
    for e in [e for e in found if e.optional]:
        main_name = next(m for suffix, m in mains.items() if e.out.endswith(suffix))
        main = source.tensors[main_name]
        info, scale = found[e]
        main_scale = source.tensors.get(f"{main_name}_scale_inv")
        same = source.same_bytes(info, main) and (
            scale is None
            and main_scale is None
            or scale is not None
            and main_scale is not None
            and source.same_bytes(scale, main_scale)
        )
        if same:
            del found[e]
        else:
            notes.append(f"{e.src} differs from {main_name}: kept as {e.out}")
    return notes


def _check_extras(
    source: SourceCheckpoint, entries: list[Entry], args, keep_mtp: bool = True
) -> None:
    known = {e.src for e in entries}
    n_main = args.num_hidden_layers
    extra = []
    for name in source.tensors:
        if name in known or is_ignorable(name):
            continue
        if name == "lm_head.weight" and args.tie_word_embeddings:
            embed = source.tensors.get("model.embed_tokens.weight")
            if embed is not None and source.same_bytes(source.tensors[name], embed):
                continue  # a tied head some exporters still write: equal to the embedding
            raise CheckpointError(
                f"{source.folder / 'config.json'}: tie_word_embeddings=true, but lm_head.weight "
                "differs from model.embed_tokens.weight and would be lost: set "
                "tie_word_embeddings to false"
            )
        if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in source.tensors:
            continue
        if is_packed_part(name, known):
            continue
        if name.endswith(".scale") and f"{name[: -len('.scale')]}.weight" in known:
            continue  # V4's FP8 / FP4 scales
        if name.startswith("mtp.") and not keep_mtp and args.model_type == "deepseek_v4":
            continue  # V4's MTP modules left out on request (--no-mtp)
        parts = name.split(".")
        if (
            len(parts) > 2
            and parts[:2] == ["model", "layers"]
            and parts[2].isdigit()
            and n_main <= int(parts[2]) < n_main + args.num_nextn_predict_layers
        ):
            continue  # an MTP layer left out (--no-mtp, or a family that does not use it)
        extra.append(name)
    if extra:
        raise CheckpointError(
            f"{source.folder}: unexpected tensor {extra[0]} ({len(extra)} in all): config.json "
            "does not match the weights (num_hidden_layers, q_lora_rank, n_routed_experts, "
            "first_k_dense_replace, ...)"
        )
