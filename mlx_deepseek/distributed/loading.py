"""Loading one rank's part of a model: the plan, this rank's modules, its tensors only.

Rank 0 makes the plan (from the safetensors headers and every rank's memory) and shares it.
Each rank then builds the model skeleton, cuts it to its part (pipeline: its layers;
tensor: its shares of each layer, tensor.shard_model), picks the checkpoint tensors and the
rows or columns of them that part needs (`_select`), reads just those bytes
(checkpoint.read), maps the names as a one-process load does (weights.sanitize, run with
this rank's head and expert counts), and loads them strictly: every parameter of its part
is checked for presence and shape.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import ops
from ..loading import (
    _add_mtp_copies,
    _check_tensors,
    _parse_dtype,
    _quantize,
    _tensor_dtype,
    available_memory,
    load_config,
    mtp_layers_present,
    resolve_model_path,
)
from ..models import MODEL_TYPES, build_model, model_args, sanitize_weights
from ..models.config import ModelArgs
from ..models.deepseek_v3 import Model
from ..models.v4_weights import canonical_name
from . import checkpoint
from .checkpoint import TensorInfo
from .pipeline import PipelineModel, V4PipelineModel
from .plan import (
    Pick,
    Plan,
    PlanError,
    Selector,
    local_expert,
    make_plan,
    sizes,
    tensor_selector,
)
from .tensor import shard_model
from .v4_selector import v4_tensor_selector
from .world import World

ENV_MEMORY = "MLX_DEEPSEEK_RANK_MEMORY"  # override a rank's memory for planning, e.g. "64G"
_LAYER = re.compile(r"^(model\.layers\.(\d+)|mtp\.(\d+))\.(.*)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(.*)$")


# which splits each family's models take (models.MODEL_TYPES' values)
SPLITS: dict[str, tuple[str, ...]] = {
    "deepseek_v3": ("pipeline", "tensor"),
    "deepseek_v4": ("pipeline", "tensor"),
}


class Loaded(NamedTuple):
    model: Model
    plan: Plan
    weight_bytes: int  # this rank's parameters, as loaded


def rank_memory() -> int:
    """What this rank may use for weights (MLX_DEEPSEEK_RANK_MEMORY overrides, e.g. 64G)."""
    value = os.environ.get(ENV_MEMORY, "").strip().upper()
    if value:
        scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(value[-1], 1)
        try:
            return int(float(value.rstrip("KMGT")) * scale)
        except ValueError:
            raise PlanError(f"{ENV_MEMORY}={value!r}: give bytes, e.g. 64G") from None
    return available_memory() or 0


def load_part(
    path_or_repo: str | os.PathLike, kind: str, world: World, dtype: str | mx.Dtype | None = None
) -> Loaded:
    """This rank's part of the model for `kind` (pipeline | tensor | auto)."""
    path = resolve_model_path(path_or_repo)
    config = load_config(path)
    args = model_args(config, source=str(path / "config.json"))
    family = MODEL_TYPES.get(args.model_type)
    if family not in SPLITS:
        raise PlanError(
            f"--parallel: model_type {args.model_type} cannot be split yet (pipeline and tensor "
            "parallel cover V2, V2.5, Coder-V2, V3, R1, V3.1, Kimi K2 and V4); run it in one "
            "process"
        )
    if kind not in SPLITS[family] + ("auto",):
        raise PlanError(
            f"--parallel {kind}: model_type {args.model_type} is split by "
            f"{' or '.join(SPLITS[family])} only so far: use --parallel {SPLITS[family][0]}"
        )
    v4 = family == "deepseek_v4"
    if v4 and kind == "auto" and "tensor" not in SPLITS[family]:
        kind = "pipeline"
    compute = _parse_dtype(dtype)
    tensors = checkpoint.scan(path, fp8=v4)
    if v4:  # either published layout's names -> the model's (FP8 `.scale`s beside weights)
        tensors = {canonical_name(k): v for k, v in tensors.items()}
    quantization = config.get("quantization")
    unit = int(quantization.get("group_size", 64)) if quantization else 1
    memory = world.gather(rank_memory())
    plan_json = None
    if world.leader:
        s = sizes(args, tensors, compute.size)
        plan_json = make_plan(kind, args, s, memory, unit, world.backend).to_json()
    plan = Plan.from_json(world.share(plan_json))
    n_mtp = mtp_layers_present(args, tensors)
    # the last pipeline rank needs the embedding rows too when the MTP layer reads them (it
    # has no copy of its own) or the head is the tied embedding
    mtp_embed = args.tie_word_embeddings or (
        n_mtp > 0
        and not any(
            n.endswith("embed_tokens.weight") and n != "model.embed_tokens.weight" for n in tensors
        )
    )

    rank = world.rank
    if plan.kind == "pipeline":
        stage = V4PipelineModel if v4 else PipelineModel
        model: Model = stage(args, plan, rank, n_mtp, mtp_embed)
        model.dtype = compute
        local_args = args
    else:
        model = build_model(args)
        model.mtp = model.mtp[:n_mtp]
        a, b = plan.heads[rank]
        e = plan.experts[rank] if plan.experts else (0, 0)
        local_args = copy.copy(args)  # what sanitize reads: this rank's head / expert counts
        local_args.num_attention_heads = b - a
        local_args.n_routed_experts = e[1] - e[0] or args.n_routed_experts
    post: dict[str, tuple[int, int, int]] = {}  # V4's FP8 tensors cut once decoded
    if plan.kind == "pipeline":
        select = _pipeline_selector(args, plan, rank, n_mtp, mtp_embed)
    elif v4:
        select = v4_tensor_selector(args, plan, rank, tensors, post)
    else:
        select = _tensor_selector(args, plan, rank)
    raw: dict[str, mx.array] = {}
    for name, info in tensors.items():
        pick = select(name, info)
        if pick is not None:
            local_name, rows, cols = pick
            raw[local_name] = checkpoint.read(info, rows, cols)
    weights = sanitize_weights(local_args, raw)
    del raw
    for name, (axis, lo, hi) in post.items():
        weights[name] = weights[name][lo:hi] if axis == 0 else weights[name][:, lo:hi]
    has_mtp = plan.kind == "tensor" or rank == plan.size - 1
    if has_mtp and not v4:  # V4's MTP layer reads the main embedding and head
        _add_mtp_copies(model, weights)
    if plan.kind == "tensor":
        shard_model(model, plan, rank)
    rename = _renamer(plan, rank)
    weights = {rename(k): v for k, v in weights.items()}
    if quantization is None and any(k.endswith(".scales") for k in weights):
        quantization = {}  # V4's MXFP4 experts: bits / group size from each tensor's shape
    if quantization is not None:
        quantization = {rename(k) if "." in k else k: v for k, v in quantization.items()}
        _quantize(model, quantization, weights)
    _check_tensors(model, weights, path)
    weights = {k: v.astype(_tensor_dtype(model, k, v, compute)) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    ops.resolve()
    ops.prepare(model)
    mx.eval(model.parameters())
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return Loaded(model, plan, nbytes)


# ---- which tensors, which slices -------------------------------------------------------------


def _pipeline_selector(
    args: ModelArgs, plan: Plan, rank: int, n_mtp: int, mtp_embed: bool
) -> Selector:
    lo, hi = plan.layers[rank]
    first, last = rank == 0, rank == plan.size - 1

    def select(name: str, info: TensorInfo) -> Pick | None:
        m = _LAYER.match(name)
        if m:
            if m.group(3) is not None or int(m.group(2)) >= args.num_hidden_layers:
                return (name, None, None) if last else None  # the MTP layer(s)
            return (name, None, None) if lo <= int(m.group(2)) < hi else None
        if name.startswith("model.embed_tokens."):
            return (name, None, None) if first or (last and mtp_embed) else None
        if name.startswith(("lm_head.", "model.norm.")):
            return (name, None, None) if last else None
        return name, None, None

    return select


def _tensor_selector(args: ModelArgs, plan: Plan, rank: int) -> Selector:
    h0, h1 = plan.heads[rank]
    e0, e1 = plan.experts[rank] if plan.experts else (0, 0)
    v0, v1 = plan.vocab[rank]
    qk, nope_v = args.qk_head_dim, args.qk_nope_head_dim + args.v_head_dim
    v = args.v_head_dim

    def cols(name: str, info: TensorInfo, lo: int, hi: int, width: int) -> Pick:
        """Input columns [lo, hi) of a linear layer with `width` inputs (packed if quantized)."""
        per = info.shape[-1] / width  # stored columns per input (bits/32 packed, 1/group...)
        a, b = lo * per, hi * per
        if a != int(a) or b != int(b):
            raise PlanError(
                f"tensor {name}: inputs {lo}:{hi} of {width} do not fall on its quantization "
                "groups: use --parallel pipeline for this checkpoint"
            )
        return name, None, (int(a), int(b))

    def select(name: str, info: TensorInfo, m: re.Match) -> Pick | None:
        prefix, rest = m.group(1), m.group(4)
        if rest.startswith(("embed_tokens.", "shared_head.head.")):
            return name, (v0, v1), None
        if rest.startswith(("self_attn.q_proj.", "self_attn.q_b_proj.")):
            return name, (h0 * qk, h1 * qk), None
        if rest.startswith("self_attn.kv_b_proj."):
            return name, (h0 * nope_v, h1 * nope_v), None
        if rest.startswith(("self_attn.embed_q.", "self_attn.unembed_out.")):
            return name, (h0, h1), None
        if rest == "self_attn.o_proj.bias":
            return (name, None, None) if rank == 0 else None
        if rest.startswith("self_attn.o_proj."):
            return cols(name, info, h0 * v, h1 * v, args.num_attention_heads * v)
        e = _EXPERT.match(rest)
        if e:
            local = local_expert(f"{prefix}.mlp", int(e.group(1)), e.group(2), (e0, e1))
            return None if local is None else (local, None, None)
        if rest.startswith("mlp.switch_mlp."):
            return name, (e0, e1), None
        for part, ranges, width in (
            ("mlp.shared_experts.", plan.shared, _shared_width(args)),
            ("mlp.", plan.dense, args.intermediate_size),
        ):
            if not rest.startswith(part) or not ranges:
                continue
            proj = rest[len(part) :]
            lo, hi = ranges[rank]
            if hi == lo and proj.startswith(("gate_proj.", "up_proj.", "down_proj.")):
                return None  # rank 0 holds this MLP whole
            if proj.startswith(("gate_proj.", "up_proj.")):
                return name, (lo, hi), None
            if proj.startswith("down_proj."):
                return cols(name, info, lo, hi, width)
        return name, None, None

    return tensor_selector((v0, v1), _LAYER, select)


def _shared_width(args: ModelArgs) -> int:
    return (args.moe_intermediate_size or 0) * (args.n_shared_experts or 0)


def _renamer(plan: Plan, rank: int) -> Callable[[str], str]:
    """Checkpoint-side names (after sanitize) -> this rank's parameter names."""
    if plan.kind == "pipeline":
        lo = plan.layers[rank][0]

        def pipeline_name(name: str) -> str:
            m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
            return f"model.layers.{int(m.group(1)) - lo}.{m.group(2)}" if m else name

        return pipeline_name

    vocab = re.compile(
        r"^(model\.embed_tokens|lm_head|mtp\.\d+\.embed_tokens|mtp\.\d+\.shared_head\.head)(\.|$)"
    )

    def tensor_name(name: str) -> str:
        m = vocab.match(name)
        return f"{m.group(1)}.shard{name[len(m.group(1)) :]}" if m else name

    return tensor_name
