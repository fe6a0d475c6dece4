"""What the CPU back-end does differently: all cores for decode, dequantized matmuls for prefill.

MLX runs each stream's operations on a thread of its own, and its CPU quantized matmul is
single-threaded scalar code. So on the CPU (Linux, or `mx.cpu` on a Mac):

1. Decode on every core. A decode step issuing one matmul at a time uses one core, reading
   4-bit weights at ~0.4 GB/s here. The work that reads the weights is split across
   `threads()` CPU streams and joined on the default stream:
   - a linear layer by its output rows (`RowSplitQuantizedLinear` & co., installed on the big
     layers by `install(model)` at load; same parameters, so nothing else changes);
   - a MoE layer's selected experts, the shared experts counting as their width in experts
     (`split_slots`, used by experts.py);
   - MLA attention: absorbed by cached positions (merged flash-decoding style) and W_uk/W_uv
     by heads; expanded (prefill) by heads (attention.py).
   A part runs on one stream only: inside `parallel()` nothing splits again. Each join costs
   ~12 us here, so only weights of at least MIN_PART_BYTES per part are split. While the
   streams split a model, OpenBLAS runs on one thread (its idle threads spin on the cores).

2. Prefill by dequantizing. The CPU quantized matmul costs the same per row of x as a
   whole matvec (it re-decodes the weights for every token): 512 tokens x a 8192x2048 4-bit
   matrix take 10.6 s, while dequantizing it once and one BLAS matmul take 0.37 s. From
   DEQUANT_MIN_TOKENS rows on, `matmul` does that (the same products, summed in another
   order), also per expert in a MoE layer (experts.py) and per head in MLA's expansion.

Nothing of this runs on Metal (the GPU is parallel already and has its own quantized
kernels) nor inside kernels.pretend_metal() (the graph a Mac would run).
MLX_DEEPSEEK_CPU_THREADS=N sets the number of streams (1 = no splitting); the default is the
number of cores this process may use, at most 8.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import _blas

ENV_THREADS = "MLX_DEEPSEEK_CPU_THREADS"
MAX_DEFAULT_THREADS = 8
MIN_PART_BYTES = 256 * 1024  # below this a part's matmul is too short to repay a join
DEQUANT_MIN_TOKENS = 16  # from this many rows of x, dequantize + BLAS beats MLX's CPU qmm


class _State:
    streams: list[mx.Stream] = []
    inside = False  # building a part: do not split again


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
    """Whether the graph being built runs on MLX's CPU back-end (not when building a Mac's
    graph inside kernels.pretend_metal())."""
    from .kernels.runtime import _State as KernelState

    return KernelState.pretend is None and mx.default_device() == mx.cpu


def matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    transpose: bool,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """mx.quantized_matmul, or on the CPU when each weight matrix meets DEQUANT_MIN_TOKENS
    rows of x or more, the dequantized weights in one BLAS matmul (float32)."""
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
    dense = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    dense = dense.astype(mx.float32)
    y = x.astype(mx.float32) @ (dense.swapaxes(-1, -2) if transpose else dense)
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
    while len(_State.streams) < n:
        # thread-local: usable from any thread (the server's engine runs the model on its own)
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
    layer: nn.Module, x: mx.array, part: int | slice = slice(None), transpose: bool = True
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


class RowSplitLinear(nn.Linear):
    """nn.Linear whose matmul splits by output rows across the CPU streams."""

    def __call__(self, x: mx.array) -> mx.array:
        y = row_split(self, x)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


class RowSplitQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose matmul splits by output rows across the CPU streams."""

    def __call__(self, x: mx.array) -> mx.array:
        y = row_split(self, x)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


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


def install(model: nn.Module) -> int:
    """Make every linear layer (and embedding, for a tied head) big enough to split a
    row-splitting one, in place (same parameters), and returns how many. Whether to split is
    decided per call, so this is harmless on Metal. When the CPU will split such a model,
    OpenBLAS is set to one thread: the streams are the parallelism, and its idle helper threads
    would spin on their cores."""
    count = 0
    for _, module in model.named_modules():
        cls = _SPLIT_CLASS.get(type(module))
        if cls is not None and module["weight"].nbytes >= 2 * MIN_PART_BYTES:
            module.__class__ = cls
            count += 1
    if count and workers():
        _blas.set_threads(1)
    return count
