"""Which tensors of a DeepSeek V4 checkpoint a tensor-parallel rank reads, and which rows or
columns of them (names as models/v4_weights.canonical_name gives them).

A rank holds heads [h0, h1) in whole output groups: rows of wq_b and attn_sink, its groups'
rows of wo_a and columns of wo_b; routed experts [e0, e1) (renumbered from 0); the shared
expert on rank 0; vocabulary rows of the embedding and the head; the rest whole. An FP8
tensor (one scale per block x block tile) is cut as read when the cut falls on tile
boundaries (with its scale's rows or columns); otherwise it is read whole and cut once
decoded (`post`: name -> (axis, start, stop)).
"""

from __future__ import annotations

import re
from typing import Any

from ..models.v4_weights import FP8_BLOCK
from .checkpoint import TensorInfo
from .plan import Pick, Plan, Selector, local_expert, tensor_selector

_LAYER = re.compile(r"^(model\.layers\.\d+|mtp\.\d+)\.(.*)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(.*)$")


def fp8_block(args: Any) -> int:
    quant = args.quantization_config or {}
    size = quant.get("weight_block_size")
    return int(size[0]) if isinstance(size, list) else FP8_BLOCK


def v4_tensor_selector(
    args: Any,
    plan: Plan,
    rank: int,
    tensors: dict[str, TensorInfo],
    post: dict[str, tuple[int, int, int]],
) -> Selector:
    h0, h1 = plan.heads[rank]
    e0, e1 = plan.experts[rank]
    v0, v1 = plan.vocab[rank]
    hd, r = args.head_dim, args.o_lora_rank
    per_group = args.num_attention_heads // args.o_groups
    g0, g1 = h0 // per_group, h1 // per_group
    block = fp8_block(args)
    cuts = {  # leaf -> (axis, start, stop)
        "attn.wq_b": (0, h0 * hd, h1 * hd),
        "attn.wo_a": (0, g0 * r, g1 * r),
        "attn.wo_b": (1, g0 * r, g1 * r),
    }

    def pick(name: str, axis: int, lo: int, hi: int) -> Pick:
        return (name, (lo, hi), None) if axis == 0 else (name, None, (lo, hi))

    def cut(name: str, axis: int, lo: int, hi: int) -> Pick:
        base, leaf = name.rsplit(".", 1)
        weight = tensors.get(f"{base}.weight")
        if weight is None or weight.dtype != "F8_E4M3":  # floating point: cut as read
            return pick(name, axis, lo, hi)
        size = weight.shape[axis]
        if lo % block or (hi % block and hi != size):  # inside a tile: cut once decoded
            post[f"{base}.weight"] = (axis, lo, hi)
            return name, None, None
        if leaf == "scale":
            lo, hi = lo // block, -(-hi // block)
        return pick(name, axis, lo, hi)

    def select(name: str, info: TensorInfo, m: re.Match) -> Pick | None:
        prefix, rest = m.groups()
        if rest == "attn.attn_sink":
            return name, (h0, h1), None
        leaf = rest.rsplit(".", 1)[0]
        if leaf in cuts:
            return cut(name, *cuts[leaf])
        e = _EXPERT.match(rest)
        if e:
            local = local_expert(f"{prefix}.ffn", int(e.group(1)), e.group(2), (e0, e1))
            return None if local is None else (local, None, None)
        if rest.startswith("ffn.shared_experts."):
            return (name, None, None) if rank == 0 else None
        return name, None, None

    return tensor_selector((v0, v1), _LAYER, select)
