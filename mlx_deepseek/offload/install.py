"""Putting streamed experts into a loaded model: a bank per MoE layer, one reader per model.

`plan_streaming` (before anything is built) finds every routed expert in the checkpoint's
headers and measures an expert; `install` (after quantization) swaps each MoE layer's
SwitchGLU for a StreamedExperts over a bank of `slots` experts and drops the experts'
tensors from the weights to load, so they are never read in full. The model carries the
`ExpertStore` as `model.expert_store` (statistics, closing the files).
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from .budget import ExpertShape
from .experts import _SAFETENSORS_DTYPE, ExpertCacheStats, StreamedExperts
from .locate import KINDS, PROJECTIONS, ExpertLocations, NotStreamable, locate_experts
from .reader import ExpertReader, can_convert

SWITCH = ".switch_mlp."


@dataclass
class StreamingPlan:
    """What loading needs to know before building: where the experts are, their size."""

    locations: ExpertLocations
    shape: ExpertShape
    prefixes: list[str]  # the MoE blocks' names, main layers first, then MTP layers

    @property
    def read_bytes(self) -> int:
        """The bytes one expert's read takes from the files (its dtypes as stored)."""
        layer = self.locations.layers[self.prefixes[0]]
        return sum(pieces[0].nbytes for pieces in layer.pieces.values())


def moe_prefixes(weights: dict[str, Any]) -> list[str]:
    """The model's MoE blocks ("model.layers.3.mlp", "mtp.0.mlp"), from the sanitized names."""
    found = {k.split(SWITCH)[0] for k in weights if SWITCH in k}

    def order(p: str) -> tuple[int, int]:
        parts = p.split(".")
        return (1, int(parts[1])) if parts[0] == "mtp" else (0, int(parts[2]))

    return sorted(found, key=order)


def routed_shape(
    weights: dict[str, mx.array], args: Any, dtype_of: Callable[[str, mx.array], mx.Dtype]
) -> ExpertShape | None:
    """The routed experts' shape and one expert's bytes in memory (None: no MoE layer)."""
    prefixes = moe_prefixes(weights)
    if not prefixes:
        return None
    per_expert = 0
    for key in [k for k in weights if k.startswith(f"{prefixes[0]}{SWITCH}")]:
        per_expert += math.prod(weights[key].shape[1:]) * dtype_of(key, weights[key]).size
    E, k = int(args.n_routed_experts), int(args.num_experts_per_tok)
    return ExpertShape(len(prefixes), E, k, per_expert)


def plan_streaming(
    files: list[Path],
    weights: dict[str, mx.array],
    args: Any,
    dtype_of: Callable[[str, mx.array], mx.Dtype],
) -> StreamingPlan:
    """Where every routed expert is in `files` and what one weighs in memory; NotStreamable
    (with the reason) when they cannot be read by offset into slots."""
    shape = routed_shape(weights, args, dtype_of)
    if shape is None:
        raise NotStreamable("this model has no routed experts")
    prefixes = moe_prefixes(weights)
    sources = {}
    for p in prefixes:
        sources[p] = [p]
        if p.startswith("mtp."):  # a Hugging Face checkpoint keeps it as a layer after the last
            sources[p].append(f"model.layers.{args.num_hidden_layers + int(p.split('.')[1])}.mlp")
    locations = locate_experts(files, sources, shape.experts)
    for p, layer in locations.layers.items():
        held = {f"{p}{SWITCH}{proj}.{kind}" for proj, kind in layer.pieces}
        extra = [k for k in weights if k.startswith(f"{p}{SWITCH}") and k not in held]
        if extra:
            raise NotStreamable(f"{extra[0]} is not where the other expert tensors are")
        for (proj, kind), pieces in layer.pieces.items():
            key = f"{p}{SWITCH}{proj}.{kind}"
            if key not in weights:
                raise NotStreamable(f"{key} is in the headers but not among the tensors")
            slot_dtype = _SAFETENSORS_DTYPE.get(dtype_of(key, weights[key]))
            for piece in pieces:
                if slot_dtype is None or not can_convert(piece.dtype, slot_dtype):
                    raise NotStreamable(
                        f"{key} is stored as {piece.dtype}, which cannot fill a "
                        f"{slot_dtype or dtype_of(key, weights[key])} slot"
                    )
    return StreamingPlan(locations, shape, prefixes)


def _bank_projection(template: nn.Module, slots: int, dtypes: dict[str, mx.Dtype]) -> nn.Module:
    """An empty projection of `slots` experts shaped and quantized like `template`."""
    w = template["weight"]
    if isinstance(template, QuantizedSwitchLinear):
        out = QuantizedSwitchLinear(
            template.input_dims, w.shape[1], slots, bias=False, group_size=template.group_size,
            bits=template.bits, mode=template.mode,
        )  # fmt: skip
    else:
        out = SwitchLinear(w.shape[2], w.shape[1], slots, bias=False)
    for kind in KINDS:
        if template.get(kind) is not None:
            # zeros written out (a fresh contiguous buffer per array), lazy random replaced
            out[kind] = mx.contiguous(mx.zeros((slots, *template[kind].shape[1:]), dtypes[kind]))
    return out


class ExpertStore:
    """A model's streamed experts: the reader over its files, the layers, the statistics."""

    def __init__(self, plan: StreamingPlan, slots: int):
        self.plan = plan
        self.slots = slots
        self.reader = ExpertReader(plan.locations.files)
        self.stats = ExpertCacheStats()
        self.layers: list[StreamedExperts] = []

    @property
    def budget_bytes(self) -> int:
        return self.plan.shape.nbytes(self.slots)

    def snapshot(self) -> ExpertCacheStats:
        """The counters now (subtract an earlier snapshot for an interval)."""
        s = ExpertCacheStats(**vars(self.stats))
        s.bytes_read = self.reader.bytes_read
        return s

    def set_prefetch(self, on: bool) -> None:
        for layer in self.layers:
            layer.prefetch = on

    def describe(self) -> str:
        shape = self.plan.shape
        return (
            f"{self.slots} of {shape.experts} experts per MoE layer in memory "
            f"({size(self.budget_bytes)} of {size(shape.total)})"
        )

    def close(self) -> None:
        self.reader.close()


def install(
    model: nn.Module,
    plan: StreamingPlan,
    slots: int,
    weights: dict[str, mx.array],
    dtype_of: Callable[[str, mx.array], mx.Dtype],
) -> ExpertStore:
    """Swap every MoE layer's experts for a StreamedExperts bank of `slots` experts and drop
    the experts' tensors from `weights`. The model keeps the store as `model.expert_store`."""
    store = ExpertStore(plan, slots)
    modules = dict(model.named_modules())
    E = plan.shape.experts
    gates: list[nn.Module] = []
    for prefix in plan.prefixes:
        moe = modules[prefix]
        template = moe["switch_mlp"]
        source = plan.locations.layers[prefix]
        bank = SwitchGLU(1, 1, 1)  # its projections are replaced below
        bank.activation = template.activation  # SwiGLU, or V4's clamped one
        for proj in PROJECTIONS:
            dtypes = {}
            for kind in source.kinds(proj):
                key = f"{prefix}{SWITCH}{proj}.{kind}"
                dtypes[kind] = dtype_of(key, weights[key])
            setattr(bank, proj, _bank_projection(template[proj], slots, dtypes))
        experts = StreamedExperts(bank, source, store.reader, store.stats, E)
        moe.switch_mlp = experts
        store.layers.append(experts)
        gates.append(moe["gate"])
        for key in [k for k in weights if k.startswith(f"{prefix}{SWITCH}")]:
            del weights[key]
    main = [(p, s, g) for p, s, g in zip(plan.prefixes, store.layers, gates, strict=True)]
    main = [(s, g) for p, s, g in main if not p.startswith("mtp.")]
    if main:
        main[0][0].counts_tokens = True
    for (layer, _), (nxt, gate) in zip(main, main[1:], strict=False):
        if _routes_from_hidden_state(gate):  # not V4's, which also needs the token ids
            layer.link(gate, nxt)
    model.expert_store = store
    weakref.finalize(model, store.close)
    return store


def _routes_from_hidden_state(gate: nn.Module) -> bool:
    """Whether a router takes the hidden state alone (what prefetching feeds it)."""
    params = inspect.signature(gate.__call__).parameters.values()
    required = [p for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    return len(required) == 1


def size(n: float) -> str:
    """Bytes for people: 1.23 GB, 45.6 MB, 789 KB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n / 1e3:.3g} KB"


def expert_store(model: Any) -> ExpertStore | None:
    """The model's ExpertStore, or None when its experts are all in memory."""
    store = getattr(model, "expert_store", None)
    return store if isinstance(store, ExpertStore) else None
