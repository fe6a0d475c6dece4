"""The one dispatch point for a MoE layer's expert computation.

Everything that computes experts goes through `moe_experts`: the MLX reference
(`mx.gather_qmm` / `mx.gather_mm` through mlx-lm's SwitchGLU, which sorts the tokens by
expert for large batches); on Metal, the fused kernels of `kernels.py`; on the CPU (see
cpu.py), the selected experts shared out across its streams, and for many tokens each
expert's weights dequantized once instead of decoded per token.
"""

from __future__ import annotations

from functools import partial, reduce

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from . import cpu
from .kernels.runtime import fused_moe


def _needs_float32_gather(switch_mlp: SwitchGLU, x: mx.array) -> bool:
    return (
        x.dtype != mx.float32
        and "scales" not in switch_mlp.gate_proj
        and mx.default_device() == mx.cpu
    )


def _switch_glu_float32(switch_mlp: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
    """SwitchGLU computed in float32 with mx.gather_mm: [..., D] -> [..., k, D]."""

    def project(layer: nn.Module, h: mx.array) -> mx.array:
        w = layer.weight.astype(mx.float32).swapaxes(-1, -2)
        return mx.gather_mm(h, w, rhs_indices=inds)

    h = mx.expand_dims(x.astype(mx.float32), (-2, -3))  # [..., 1, 1, D]
    h = nn.silu(project(switch_mlp.gate_proj, h)) * project(switch_mlp.up_proj, h)
    return project(switch_mlp.down_proj, h).squeeze(-2)


def moe_experts(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: SwitchGLU,
    shared_experts: nn.Module | None,
) -> mx.array:
    """sum_j scores[..., j] * expert_{inds[..., j]}(x) + shared_experts(x), in x.dtype.

    x: [..., D]; inds: [..., k] int; scores: [..., k] float32 routing weights (the routed
    scaling factor already applied).
    """
    y = fused_moe(x, inds, scores, switch_mlp, shared_experts)
    if y is not None:  # fused Metal kernels: Metal, quantized experts, 1-8 tokens
        return y
    y = _experts_grouped(x, inds, scores, switch_mlp, shared_experts)
    if y is not None:  # the CPU, many tokens: by expert, dequantized, on its streams
        return y
    y = _split_experts(x, inds, scores, switch_mlp, shared_experts)
    if y is not None:  # the CPU, a few tokens: a share of the slots on each stream
        return y
    return _experts(x, inds, scores, switch_mlp, shared_experts)


def _experts(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: SwitchGLU,
    shared_experts: nn.Module | None,
) -> mx.array:
    """MLX's path (on one stream)."""
    if _needs_float32_gather(switch_mlp, x):
        # MLX's CPU gather_mm only takes float32: compute unquantized experts in float32 there
        y = _switch_glu_float32(switch_mlp, x, inds)
    else:
        y = switch_mlp(x, inds)  # [..., k, D]
    y = (y * scores[..., None]).sum(axis=-2).astype(x.dtype)  # combined in float32
    if shared_experts is not None:
        y = y + shared_experts(x)
    return y


def _split_experts(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: SwitchGLU,
    shared_experts: nn.Module | None,
) -> mx.array | None:
    """The experts split across the CPU streams, each stream computing a contiguous share of
    every token's selected slots (the first also the shared experts; for many tokens each
    share goes through SwitchGLU's sorted gather), summed on the default stream. None when it
    should not split."""
    streams = cpu.workers()
    if not streams or "scales" not in switch_mlp.gate_proj:
        return None
    k = inds.shape[-1]
    w = switch_mlp.gate_proj["weight"]
    if 3 * k * (w.nbytes // w.shape[0]) < 2 * cpu.MIN_PART_BYTES:
        return None  # too little to read for a join to pay
    per_expert = w.shape[-2]
    shared_units = 0
    if shared_experts is not None:
        shared_units = round(shared_experts.gate_proj["weight"].shape[0] / per_expert)
    slots = cpu.split_slots(k, shared_units, len(streams))
    # (lo, hi, with the shared experts) per stream; an empty share is dropped
    jobs = [(lo, hi, i == 0 and shared_experts is not None) for i, (lo, hi) in enumerate(slots)]
    jobs = [job for job in jobs if job[1] > job[0] or job[2]]

    def part(lo: int, hi: int, shared: bool) -> mx.array:
        ys = []
        if hi > lo:
            ys.append((switch_mlp(x, inds[..., lo:hi]) * scores[..., lo:hi, None]).sum(axis=-2))
        if shared:
            ys.append(shared_experts(x).astype(mx.float32))
        return reduce(mx.add, ys)

    outs = cpu.parallel([partial(part, *job) for job in jobs], streams)
    return reduce(mx.add, outs).astype(x.dtype)


def _expert_matmul(layer: nn.Module, e: int, x: mx.array) -> mx.array:
    """x @ W_e^T for expert e of a quantized SwitchLinear (dequantized for many rows)."""
    y = cpu.layer_matmul(layer, x, e)
    return y + layer["bias"][e] if "bias" in layer else y


def _experts_grouped(
    x: mx.array,
    inds: mx.array,
    scores: mx.array,
    switch_mlp: SwitchGLU,
    shared_experts: nn.Module | None,
) -> mx.array | None:
    """Many tokens on the CPU (prefill): for each selected expert, its tokens gathered, its
    SwiGLU (cpu.matmul: dequantized once for DEQUANT_MIN_TOKENS tokens or more, instead of
    MLX's per-token decoding), the weighted result added back at their rows; the experts dealt
    out to the CPU streams by token count. Reads the routing on the host: one sync per layer.
    None when it does not apply."""
    D = x.shape[-1]
    T = x.size // D
    if T < cpu.DEQUANT_MIN_TOKENS or not cpu.on_cpu() or "scales" not in switch_mlp.gate_proj:
        return None
    k = inds.shape[-1]
    flat = np.array(inds.reshape(-1))  # the sync
    order = np.argsort(flat, kind="stable")
    experts, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    jobs = [(int(e), order[a : a + c]) for e, a, c in zip(experts, starts, counts, strict=True)]
    streams = cpu.workers()
    bins: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(max(1, len(streams)))]
    loads = [0] * len(bins)
    for job in sorted(jobs, key=lambda j: -len(j[1])):  # longest first, to the lightest bin
        i = loads.index(min(loads))
        bins[i].append(job)
        loads[i] += len(job[1])
    xf = x.reshape(T, D)
    weights = scores.reshape(-1)

    def run(jobs: list[tuple[int, np.ndarray]]) -> mx.array:
        y = mx.zeros((T, D), mx.float32)
        for e, positions in jobs:
            rows = mx.array(positions // k)
            xe = xf[rows]
            gate = _expert_matmul(switch_mlp.gate_proj, e, xe)
            h = nn.silu(gate) * _expert_matmul(switch_mlp.up_proj, e, xe)
            ye = _expert_matmul(switch_mlp.down_proj, e, h).astype(mx.float32)
            y = y.at[rows].add(ye * weights[mx.array(positions)][:, None])
        return y

    if streams:
        parts = cpu.parallel([partial(run, b) for b in bins if b], streams)
    else:
        parts = [run(bins[0])]
    y = reduce(mx.add, parts).astype(x.dtype).reshape(x.shape)
    if shared_experts is not None:
        y = y + shared_experts(x)
    return y
