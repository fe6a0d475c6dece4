"""The "cpu" back-end: all cores for decode, dequantized matmuls for prefill.

MLX runs each stream's operations on a thread of its own, and its CPU quantized matmul is
single-threaded scalar code. So on the CPU (Linux, or `mx.cpu` on a Mac):

1. Decode on every core. A decode step issuing one matmul at a time uses one core, reading
   4-bit weights at ~0.4 GB/s here. The work that reads the weights is split across
   `threads()` CPU streams and joined on the default stream:
   - a linear layer by its output rows (`RowSplitQuantizedLinear` & co., installed on the big
     layers by `install(model)` at load; same parameters, so nothing else changes);
   - a MoE layer's selected experts, the shared experts counting as their width in experts
     (`split_slots`);
   - MLA attention: absorbed by cached positions (merged flash-decoding style) and W_uk/W_uv
     by heads; expanded (prefill) by heads.
   A part runs on one stream only: inside `parallel()` nothing splits again. Each join costs
   ~12 us here, so only weights of at least MIN_PART_BYTES per part are split. While the
   streams split a model, OpenBLAS runs on one thread (its idle threads spin on the cores).

2. Prefill by dequantizing. The CPU quantized matmul costs the same per row of x as a
   whole matvec (it re-decodes the weights for every token): 512 tokens x a 8192x2048 4-bit
   matrix take 10.6 s, while dequantizing it once and one BLAS matmul take 0.37 s. From
   DEQUANT_MIN_TOKENS rows on, `matmul` does that (the same products, summed in another
   order), also per expert in a MoE layer and per head in MLA's expansion.

3. Small models from float weights. A model whose float weights take at most
   FLOAT_MAX_BYTES (the bundled demo: 5 MB) is dequantized once at load (`to_float`):
   its steps are bound by the number of operations, not by reading weights, and the CPU
   quantized matmul re-decodes the weights for every row of x, so verifying MTP drafts (2+
   rows) cost 1.3x a step; from float weights it costs what one row does. The values are
   the quantized ones, exactly. MLX_DEEPSEEK_SMALL_FLOAT=0 keeps them quantized. Measured
   on the demo (scripts/bench_mtp.py), tok/s over the quantized weights': plain decoding
   1.04x (compiled 1.12x), MTP with one draft 1.07x (1.08x), with two 1.08x (1.26x).

All of it applies only while this is the back-end in use (ops.backend): on Metal the GPU is
parallel already and has its own quantized kernels. The ops not defined here are MLX's.
MLX_DEEPSEEK_CPU_THREADS=N sets the number of streams (1 = no splitting); the default is the
number of cores this process may use, at most 8.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from functools import partial, reduce

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .. import _blas
from . import backend
from . import mlx as reference
from .mlx import add_rms_norm, embed, latent, mlp, route  # noqa: F401  (MLX's own here)
from .types import MLAHeads

ENV_THREADS = "MLX_DEEPSEEK_CPU_THREADS"
MAX_DEFAULT_THREADS = 8
MIN_PART_BYTES = 256 * 1024  # below this a part's matmul is too short to repay a join
DEQUANT_MIN_TOKENS = 16  # from this many rows of x, dequantize + BLAS beats MLX's CPU qmm
DEQUANT_BLOCK_BYTES = 8 * 1024 * 1024  # the float32 copy of a quantized matrix, per block
ENV_SMALL_FLOAT = "MLX_DEEPSEEK_SMALL_FLOAT"
FLOAT_MAX_BYTES = 64 * 1024 * 1024  # a quantized model this small in float runs from float


class _State:
    streams: list[mx.Stream] = []
    inside = False  # building a part: do not split again
    warned_blas = False


def configure() -> None:
    """At load: MLX's matmuls on OpenBLAS whatever was imported first (re-pointed when MLX
    was loaded before mlx_deepseek), or one warning saying why not and how to fix it."""
    _blas.preload_openblas()
    message = _blas.slow_state()
    if message and not _State.warned_blas:
        _State.warned_blas = True
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def threads() -> int:
    """How many CPU streams share the work (1: no splitting)."""
    value = os.environ.get(ENV_THREADS, "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{ENV_THREADS}={value!r}: give a whole number of threads") from None
        return max(n, 1)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return min(cores, MAX_DEFAULT_THREADS)


def on_cpu() -> bool:
    """Whether the CPU back-end is the one in use (not while another is, e.g. ops.use("mlx")
    in a test, or "metal" while counting a Mac's graph)."""
    return backend.current() == "cpu"


def matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    transpose: bool,
    group_size: int,
    bits: int,
    mode: str = "affine",
    after: mx.array | None = None,
) -> mx.array:
    """mx.quantized_matmul, or on the CPU when each weight matrix meets DEQUANT_MIN_TOKENS
    rows of x or more, the dequantized weights in BLAS matmuls (float32), a block of
    DEQUANT_BLOCK_BYTES at a time; `after`: an array the first block waits for."""
    if rows_per_matrix(x, w) < DEQUANT_MIN_TOKENS or not on_cpu():
        return mx.quantized_matmul(
            x,
            w,
            scales=scales,
            biases=biases,
            transpose=transpose,
            group_size=group_size,
            bits=bits,
            mode=mode,
        )
    xf = x.astype(mx.float32)

    def block(lo: int, hi: int, prev: mx.array | None) -> mx.array:
        wq = w[..., lo:hi, :]
        if prev is not None:  # not before the previous block is done (and its copy freed)
            wq = mx.depends(wq, prev)
        dense = mx.dequantize(
            wq, scales[..., lo:hi, :], None if biases is None else biases[..., lo:hi, :],
            group_size=group_size, bits=bits, mode=mode, dtype=mx.float32,
        )  # fmt: skip
        return xf @ dense.swapaxes(-1, -2) if transpose else xf[..., lo:hi] @ dense

    # the float32 copy in blocks of rows of w, one after the other: MLX would otherwise
    # dequantize every block (every expert, every layer part) before the matmuls use them
    rows = w.shape[-2]
    row_bytes = 4 * (w.size // rows) * 32 // bits
    step = max(1, DEQUANT_BLOCK_BYTES // max(row_bytes, 1))
    parts: list[mx.array] = []
    for lo in range(0, rows, step):
        parts.append(block(lo, min(lo + step, rows), parts[-1] if parts else after))
    if transpose:  # blocks of output features
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    else:  # blocks of the summed axis
        y = reduce(mx.add, parts)
    return y.astype(x.dtype)


def rows_per_matrix(x: mx.array, w: mx.array) -> int:
    """How many rows of x each weight matrix of a batched matmul x @ w meets: x's second-last
    axis times its batch axes that w does not index (w [h, out, in] with x [B, h, L, in]: B*L)."""
    if x.ndim < 2:
        return 1
    rows = x.shape[-2]
    x_batch, w_batch = x.shape[:-2], w.shape[:-2]
    for i, d in enumerate(reversed(x_batch)):
        if i >= len(w_batch) or w_batch[-1 - i] == 1:
            rows *= d
    return rows


def workers() -> list[mx.Stream]:
    """The CPU streams to split the current graph across; [] when it should not split (not on
    the CPU, one thread, inside a part, or building a Mac's graph)."""
    if _State.inside or not on_cpu():
        return []
    n = threads()
    if n < 2:
        return []
    while len(_State.streams) < n:  # one stream per thread that builds graphs (a server's too)
        _State.streams.append(mx.new_thread_local_stream(mx.cpu))
    return _State.streams[:n]


def parallel(
    parts: Sequence[Callable[[], mx.array]], streams: Sequence[mx.Stream]
) -> list[mx.array]:
    """Build each part's graph on its own stream (part i on streams[i % n])."""
    saved, _State.inside = _State.inside, True
    try:
        out = []
        for i, part in enumerate(parts):
            with mx.stream(streams[i % len(streams)]):
                out.append(part())
        return out
    finally:
        _State.inside = saved


def ranges(total: int, n: int) -> list[tuple[int, int]]:
    """[0, total) cut into at most n near-equal non-empty ranges."""
    n = max(1, min(n, total))
    cuts = [total * i // n for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def split_slots(k: int, shared_units: int, n: int) -> list[tuple[int, int]]:
    """The routed slots [0, k) as n contiguous ranges balancing the load when the first part
    also computes the shared experts (worth `shared_units` routed experts). A range may be
    empty: the first part's when the shared experts alone are its share, or any when k < n."""
    total = k + shared_units
    cuts = [min(max(round(total * i / n) - shared_units, 0), k) for i in range(n + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def layer_matmul(
    layer: nn.Module,
    x: mx.array,
    part: int | slice = slice(None),
    transpose: bool = True,
    after: mx.array | None = None,
) -> mx.array:
    """x @ W[part]^T (or x @ W[part]) for a (quantized) layer's weight W, `part` indexing its
    first axis: rows of a linear layer, heads of a MultiLinear, an expert of a SwitchLinear
    (all views). Quantized, it goes through `matmul`."""
    w = layer["weight"][part]
    if "scales" not in layer:
        return x @ (w.swapaxes(-1, -2) if transpose else w)
    biases = layer.get("biases")
    return matmul(
        x,
        w,
        layer["scales"][part],
        None if biases is None else biases[part],
        transpose=transpose,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
        after=after,
    )


def row_split(layer: nn.Module, x: mx.array) -> mx.array | None:
    """layer's matmul x @ W^T computed in row ranges on the worker streams (or, quantized and
    for many tokens, dequantized on one), or None to leave it to the layer."""
    streams = workers()
    rows = layer["weight"].shape[0]
    n = min(len(streams), layer["weight"].nbytes // MIN_PART_BYTES)
    if n < 2:
        return layer_matmul(layer, x) if "scales" in layer and on_cpu() else None
    parts = [partial(layer_matmul, layer, x, slice(lo, hi)) for lo, hi in ranges(rows, n)]
    return mx.concatenate(parallel(parts, streams), axis=-1)


class _RowSplit:
    """A linear layer's __call__ that splits the matmul by output rows across the CPU
    streams (where row_split applies; else the layer's own)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = row_split(self, x)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


class RowSplitLinear(_RowSplit, nn.Linear):
    """nn.Linear whose matmul splits by output rows across the CPU streams."""


class RowSplitQuantizedLinear(_RowSplit, nn.QuantizedLinear):
    """nn.QuantizedLinear whose matmul splits by output rows across the CPU streams."""


class RowSplitEmbedding(nn.Embedding):
    """nn.Embedding whose as_linear (a tied LM head) splits like the linear layers."""

    def as_linear(self, x: mx.array) -> mx.array:
        y = row_split(self, x)
        return super().as_linear(x) if y is None else y


class RowSplitQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose as_linear (a tied LM head) splits like the linear layers."""

    def as_linear(self, x: mx.array) -> mx.array:
        y = row_split(self, x)
        return super().as_linear(x) if y is None else y


_SPLIT_CLASS: dict[type, type] = {
    nn.Linear: RowSplitLinear,
    nn.QuantizedLinear: RowSplitQuantizedLinear,
    nn.Embedding: RowSplitEmbedding,
    nn.QuantizedEmbedding: RowSplitQuantizedEmbedding,
}


def _float_classes() -> dict[type, type]:
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return {
        nn.QuantizedLinear: nn.Linear,
        nn.QuantizedEmbedding: nn.Embedding,
        QuantizedSwitchLinear: SwitchLinear,
        QuantizedMultiLinear: MultiLinear,
    }


def float_dtype(layer: nn.Module, fallback: mx.Dtype) -> mx.Dtype:
    """The dtype a quantized layer's float copy takes: its scales' (affine quantization), or
    `fallback` where the scales are not floating point (mxfp4's power-of-two E8M0 bytes)."""
    dtype = layer["scales"].dtype
    return dtype if mx.issubdtype(dtype, mx.floating) else fallback


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The model's compute dtype: that of its norms' weights (never quantized)."""
    for _, m in model.named_modules():
        if isinstance(m, nn.RMSNorm):
            return m.weight.dtype
    return mx.float32


def float_nbytes(model: nn.Module, quantized: list[nn.Module]) -> int:
    """The bytes of `model`'s weights with its `quantized` layers' matrices in float
    (`float_dtype`)."""
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    fallback = compute_dtype(model)
    for m in quantized:
        total -= sum(m[k].nbytes for k in ("weight", "scales", "biases") if k in m)
        total += m["weight"].size * 32 // m.bits * float_dtype(m, fallback).size
    return total


def to_float(model: nn.Module, max_bytes: int = FLOAT_MAX_BYTES) -> int:
    """Dequantize a small model's quantized layers in place (MLX_DEEPSEEK_SMALL_FLOAT, "3."
    above); returns how many. Nothing changes for a model over `max_bytes` in float or one
    with a quantized layer of a kind it does not know."""
    if os.environ.get(ENV_SMALL_FLOAT, "").strip().lower() in ("0", "false", "no", "off"):
        return 0
    classes = _float_classes()
    found = [(p, m) for p, m in model.named_modules() if "scales" in m]
    if not found or any(type(m) not in classes for _, m in found):
        return 0
    if float_nbytes(model, [m for _, m in found]) > max_bytes:
        return 0
    swaps = []
    fallback = compute_dtype(model)
    for path, m in found:
        cls = classes[type(m)]
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight = mx.dequantize(m["weight"], m["scales"], m.get("biases"),
                                   group_size=m.group_size, bits=m.bits, mode=m.mode,
                                   dtype=float_dtype(m, fallback))  # fmt: skip
        if "bias" in m:
            new.bias = m["bias"]
        swaps.append((path, new))
    model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def prepare(model: nn.Module) -> int:
    """Make every linear layer (and embedding, for a tied head) big enough to split a
    row-splitting one, in place (same parameters), and returns how many. Whether to split is
    decided per call, so the model still runs on another back-end. When the CPU will split
    such a model, OpenBLAS is set to one thread: the streams are the parallelism, and its idle
    helper threads would spin on their cores. A small model is dequantized first
    (`to_float`), and OpenBLAS set to one thread for it too: its matrices are too small to
    share, and a second thread's spinning cost the demo 1.6x the CPU time per token."""
    small = to_float(model)
    count = 0
    for _, module in model.named_modules():
        cls = _SPLIT_CLASS.get(type(module))
        if cls is not None and module["weight"].nbytes >= 2 * MIN_PART_BYTES:
            module.__class__ = cls
            count += 1
    if (count and workers()) or small:
        _blas.set_threads(1)
    return count


# ---- MLA attention ---------------------------------------------------------------------------


def absorbed_attention(q: mx.array, c_kv, k_pe, mla: MLAHeads, mask, offset) -> mx.array:
    """ops.absorbed_attention shared out across the CPU streams: W_uk and W_uv by heads, the
    attention itself by cached positions (each part reads 1/n of the cache for all heads; the
    parts merge by their softmax maxima and sums, as flash-decoding does). MLX's path when
    there is too little to read for the joins to pay."""
    streams = workers()
    k_pe = reference.dense(k_pe, mla.rope_dims)  # small: a quantized k_pe (mlx-lm's) is expanded
    reads = reference.latent_nbytes(c_kv) + k_pe.nbytes + mla.embed_q["weight"].nbytes
    reads += mla.unembed_out["weight"].nbytes
    n = min(len(streams), reads // MIN_PART_BYTES)
    if n < 2:
        return reference.absorbed_attention(q, c_kv, k_pe, mla, mask, offset)
    B, L, _ = q.shape
    H, S = mla.heads, k_pe.shape[2]
    q_nope, q_pe = reference.split_q(q, mla)
    mask = reference.boolean_mask(mask, L, offset)
    heads = ranges(H, n)

    def by_heads(layer: nn.Module, x: mx.array) -> mx.array:
        parts = [partial(layer_matmul, layer, x[:, lo:hi], slice(lo, hi)) for lo, hi in heads]
        return mx.concatenate(parallel(parts, streams), axis=1)

    q_lat = by_heads(mla.embed_q, q_nope) * mla.scale  # [B, H, L, rank]
    q_lat = q_lat.reshape(B, 1, H * L, -1)

    def part(lo: int, hi: int) -> tuple[mx.array, mx.array, mx.array]:
        c = reference.latent_slice(c_kv, lo, hi)  # full precision or quantized
        part_mask = None if mask is None else mask[..., lo:hi]
        s = reference.pe_scores(q_pe, k_pe[:, :, lo:hi], mla, part_mask, offset)  # [B,H,L,hi-lo]
        s = reference.latent_scores(q_lat, c, mla.rank) + s.reshape(B, 1, H * L, -1)
        m = s.max(axis=-1, keepdims=True)  # finite: masked scores are finfo.min, not -inf
        p = exp_nonpositive(s - m)
        return m, p.sum(axis=-1, keepdims=True), reference.latent_mix(p, c, mla.rank)

    parts = parallel([partial(part, lo, hi) for lo, hi in ranges(S, n)], streams)
    m = reduce(mx.maximum, [pm for pm, _, _ in parts])
    weights = [mx.exp(pm - m) for pm, _, _ in parts]  # ~0 for a part wholly masked
    total = reduce(mx.add, [w * pl for w, (_, pl, _) in zip(weights, parts, strict=True)])
    out = reduce(mx.add, [w * po for w, (_, _, po) in zip(weights, parts, strict=True)])
    out = (out / total).astype(q_lat.dtype).reshape(B, H, L, -1)
    out = by_heads(mla.unembed_out, out)  # [B, H, L, v]
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


def expanded_attention(q: mx.array, c_kv, k_pe, mla: MLAHeads, mask, offset) -> mx.array:
    """ops.expanded_attention with a share of the heads on each CPU stream, K/V expanded by
    dequantized matmuls for a long prefill (a quantized cache is dequantized first)."""
    B, L, _ = q.shape
    H = mla.heads
    c_kv, k_pe = reference.dense(c_kv, mla.rank), reference.dense(k_pe, mla.rope_dims)
    q_nope, q_pe = reference.split_q(q, mla)
    scores = reference.pe_scores(q_pe, k_pe, mla, reference.boolean_mask(mask, L, offset), offset)

    def heads(lo: int, hi: int) -> mx.array:
        k_nope = layer_matmul(mla.embed_q, c_kv, slice(lo, hi), transpose=False)  # [B,h,S,nope]
        v = layer_matmul(mla.unembed_out, c_kv, slice(lo, hi))  # [B, h, S, v]
        return mx.fast.scaled_dot_product_attention(
            q_nope[:, lo:hi], k_nope, v, scale=mla.scale, mask=scores[:, lo:hi]
        )

    streams = workers()
    n = min(len(streams), H)
    if n < 2:
        out = heads(0, H)
    else:
        parts = [partial(heads, lo, hi) for lo, hi in ranges(H, n)]
        out = mx.concatenate(parallel(parts, streams), axis=1)
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


@mx.compile
def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 (softmax numerators) in float32, ~4x faster than mx.exp on the CPU
    (MLX's CPU exp is scalar; this compiles to one vectorisable loop). x = k ln2 + y with
    integer k and |y| <= ln2/2 (Cody-Waite: ln2 in two parts, so y is exact to float32),
    e^y by its Taylor series to degree 8, 2^k from the float's exponent bits: a few ulp down
    to exp(-87) = 1.6e-38, where it stops (below, a float32 loses digits; such numerators
    vanish next to the maximum's 1 anyway)."""
    x = mx.maximum(x.astype(mx.float32), -87.0)
    k = mx.round(x * 1.4426950408889634)
    y = (x - k * 0.693145751953125) - k * 1.4286068203094173e-06
    p = 1.0 / 40320
    for c in (1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * y + c
    two_k = ((k.astype(mx.int32) + 127) << 23).view(mx.float32)
    return p * two_k


# ---- MoE experts -----------------------------------------------------------------------------


def moe(
    x: mx.array,
    inds: mx.array,
    weights: mx.array,
    experts: nn.Module,
    shared: nn.Module | None,
    swiglu_limit: float = 0.0,
) -> mx.array:
    """ops.moe on the CPU: many tokens by expert, dequantized, on the streams (prefill); a
    few tokens with a share of the slots on each stream (decode); else MLX's path."""
    args = (x, inds, weights, experts, shared, swiglu_limit)
    if "scales" not in experts.gate_proj or not on_cpu():
        return reference.moe(*args)
    if x.size // x.shape[-1] >= DEQUANT_MIN_TOKENS:
        return _experts_grouped(*args)
    y = _split_experts(*args)
    return reference.moe(*args) if y is None else y


def _split_experts(x, inds, weights, experts, shared, limit) -> mx.array | None:
    """The experts split across the CPU streams, each stream computing a contiguous share of
    every token's selected slots (the first also the shared experts), summed on the default
    stream. None when it should not split."""
    streams = workers()
    if not streams:
        return None
    k = inds.shape[-1]
    w = experts.gate_proj["weight"]
    if 3 * k * (w.nbytes // w.shape[0]) < 2 * MIN_PART_BYTES:
        return None  # too little to read for a join to pay
    per_expert = w.shape[-2]
    shared_units = 0
    if shared is not None:
        shared_units = round(shared.gate_proj["weight"].shape[0] / per_expert)
    slots = split_slots(k, shared_units, len(streams))
    # (lo, hi, with the shared experts) per stream; an empty share is dropped
    jobs = [(lo, hi, i == 0 and shared is not None) for i, (lo, hi) in enumerate(slots)]
    jobs = [job for job in jobs if job[1] > job[0] or job[2]]

    def part(lo: int, hi: int, with_shared: bool) -> mx.array:
        ys = []
        if hi > lo:
            y = reference.switch_glu(experts, x, inds[..., lo:hi], limit)
            ys.append((y * weights[..., lo:hi, None]).sum(axis=-2))
        if with_shared:
            ys.append(reference.shared_mlp(shared, x, limit).astype(mx.float32))
        return reduce(mx.add, ys)

    outs = parallel([partial(part, *job) for job in jobs], streams)
    return reduce(mx.add, outs).astype(x.dtype)


def _expert_matmul(layer: nn.Module, e: int, x: mx.array, after: mx.array) -> mx.array:
    """x @ W_e^T for expert e of a quantized SwitchLinear (dequantized for many rows, not
    before `after` is computed)."""
    y = layer_matmul(layer, x, e, after=after)
    return y + layer["bias"][e] if "bias" in layer else y


def _experts_grouped(x, inds, weights, experts, shared, limit: float = 0.0) -> mx.array:
    """Many tokens (prefill): for each selected expert, its tokens gathered, its SwiGLU
    (`matmul`: dequantized once instead of MLX's per-token decoding), the weighted result
    added back at their rows; the experts dealt out to the streams by token count. Reads the
    routing on the host: one sync per layer."""
    D = x.shape[-1]
    T = x.size // D
    k = inds.shape[-1]
    flat = np.array(inds.reshape(-1))  # the sync
    order = np.argsort(flat, kind="stable")
    chosen, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    jobs = [(int(e), order[a : a + c]) for e, a, c in zip(chosen, starts, counts, strict=True)]
    streams = workers()
    bins: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(max(1, len(streams)))]
    loads = [0] * len(bins)
    for job in sorted(jobs, key=lambda j: -len(j[1])):  # longest first, to the lightest bin
        i = loads.index(min(loads))
        bins[i].append(job)
        loads[i] += len(job[1])
    xf = x.reshape(T, D)
    flat_weights = weights.reshape(-1)

    def run(jobs: list[tuple[int, np.ndarray]]) -> mx.array:
        y = mx.zeros((T, D), mx.float32)
        for e, positions in jobs:
            rows = mx.array(positions // k)
            xe = xf[rows]
            # one expert's weights dequantized at a time: each after the previous result
            gate = _expert_matmul(experts.gate_proj, e, xe, after=y)
            up = _expert_matmul(experts.up_proj, e, xe, after=gate)
            h = reference.swiglu(gate, up, limit)
            ye = _expert_matmul(experts.down_proj, e, h, after=h).astype(mx.float32)
            y = y.at[rows].add(ye * flat_weights[mx.array(positions)][:, None])
        return y

    if streams:
        parts = parallel([partial(run, b) for b in bins if b], streams)
    else:
        parts = [run(bins[0])]
    y = reduce(mx.add, parts).astype(x.dtype).reshape(x.shape)
    if shared is not None:
        y = y + reference.shared_mlp(shared, x, limit)
    return y
