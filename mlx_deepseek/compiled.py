"""Compiled decoding forwards over the latent caches, for models whose operations are cheap.

On MLX's CPU back-end every primitive costs a fixed few microseconds to dispatch, whatever
its size, and MLX's CPU fallbacks of the fast ops (RoPE, RMSNorm, attention) are several
primitives each: a step of the bundled demo (hidden 128) is ~600 primitives and ~2.4 ms, of
which the arithmetic is a small part. `mx.compile` fuses the elementwise chains and replays
the graph without Python, ~1.5x faster per step there. Big models are bound by reading
their weights (and split their matmuls across CPU streams), so they keep the plain path.

A compiled function cannot see the caches' host-side offsets change, so inside one the
caches are `TracedCache`s: each layer's buffers and its fill offset go in as arrays, new
entries are written with `mx.slice_update` at the traced offset, attention reads the whole
buffer and masks the unfilled positions, and the updated buffers come out. `run` moves the
buffers in and out of the real caches and advances their offsets on the host, so trimming
(cutting rejected drafts) stays a host-side change of `offset`. A trace is kept per model,
function and shape (buffer capacity grows by `KVCache.step`, so a few per generation).

Opt-in: `MLX_DEEPSEEK_COMPILE=1` compiles whatever model can be compiled, `=auto` the small
ones on the CPU (`pays`), unset or `0` none. Not on by default because MLX builds the
compiled CPU code with the system compiler the first time a machine runs it: the bundled
demo's first 60-token answer took 24.8 s instead of 3.8 s (2.8 s once the build is cached),
a bad trade for a first run and for every fresh CI machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .models.cache import KVCache, QuantizedKVCache
from .models.deepseek_v3 import Model as DeepseekV3Model

ENV = "MLX_DEEPSEEK_COMPILE"
MAX_BYTES = 64 * 1024 * 1024  # "auto" compiles up to this many bytes of weights
_ATTR = "_mlx_deepseek_compiled"  # the per-model store of compiled functions
_UNCOMPILABLE = ("mlx_deepseek.distributed", "mlx_deepseek.offload")  # host work per layer


def _setting() -> bool | None:
    """True (1), False (unset or 0) or None ("auto": when `pays`)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value == "auto":
        return None
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(
        f"{ENV}={value!r}: give 1 (compile), auto (small models on the CPU) or 0 (never)"
    )


def can_compile(model: nn.Module, caches: Sequence[Any]) -> bool:
    """Whether `model`'s decoding forwards can be compiled over `caches`: a DeepSeek V2/V3
    model of the plain class (not V3.2's indexed attention, a pipeline stage, tensor-parallel
    shards or streamed experts) with this project's latent caches, each holding entries."""
    return _caches_ok(caches) and _model_ok(model)


def _model_ok(model: nn.Module) -> bool:
    if type(model) is not DeepseekV3Model:
        return False
    return not any(type(m).__module__.startswith(_UNCOMPILABLE) for _, m in model.named_modules())


def _caches_ok(caches: Sequence[Any]) -> bool:
    if not caches or any(type(c) not in (KVCache, QuantizedKVCache) for c in caches):
        return False
    return all(c.keys is not None for c in caches)  # else the (uncompiled) prefill makes them


def pays(model: nn.Module) -> bool:
    """Whether compiling pays ("auto"): on the CPU, for a model small enough that op
    dispatch, not reading weights, bounds a step (MAX_BYTES)."""
    if mx.default_device() != mx.cpu:
        return False  # a GPU's evaluation overlaps the host's graph building already
    nbytes = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
    return nbytes <= MAX_BYTES


def enabled(model: nn.Module, caches: Sequence[Any]) -> bool:
    """Whether to decode `model` over `caches` with compiled forwards (ENV; "auto": `pays`)."""
    setting = _setting()
    if setting is False or not _caches_ok(caches):
        return False
    store = _store(model)
    if "ok" not in store:  # the model's part, once: it walks the modules
        store["ok"] = _model_ok(model)
        store["pays"] = store["ok"] and pays(model)
    return store["ok"] and (setting or store["pays"])


def _store(model: nn.Module) -> dict:
    return model.__dict__.setdefault(_ATTR, {})


# ---- caches inside a compiled function ---------------------------------------------------


class TracedCache:
    """One layer's latent cache inside a compiled function: `arrays` are the buffers
    (KVCache: c_kv, k_pe [B, 1, C, *]; QuantizedKVCache: c_kv's packed, scales, biases, then
    k_pe), `offset` an int32 array (the fill). Same interface as the caches for the model."""

    def __init__(self, arrays: Sequence[mx.array], offset: mx.array, quant: tuple | None):
        self.arrays = list(arrays)
        self.offset = offset
        self.quant = quant  # (group size, bits) for a quantized c_kv

    @property
    def capacity(self) -> int:
        return self.arrays[-1].shape[2]

    def update_and_fetch(self, c_kv: mx.array, k_pe: mx.array) -> tuple:
        """Write L new entries at the offset (advancing it); the whole buffers back."""
        parts = [c_kv]
        if self.quant is not None:
            group_size, bits = self.quant
            parts = list(mx.quantize(c_kv, group_size=group_size, bits=bits))
        start = self.offset.reshape(1)
        self.arrays = [
            mx.slice_update(buf, part, start, axes=(2,))
            for buf, part in zip(self.arrays, [*parts, k_pe], strict=True)
        ]
        self.offset = self.offset + c_kv.shape[2]
        keys = self.arrays[0] if self.quant is None else tuple(self.arrays[:3])
        return keys, self.arrays[-1]

    def make_mask(self, L: int, **_) -> mx.array:
        """[L, C] boolean: query l (at offset + l) sees the filled positions up to itself."""
        rows = self.offset + mx.arange(L, dtype=mx.int32)[:, None]
        return mx.arange(self.capacity, dtype=mx.int32)[None] <= rows


def _arrays(c: KVCache | QuantizedKVCache) -> list[mx.array]:
    keys = list(c.keys) if isinstance(c, QuantizedKVCache) else [c.keys]
    return [*keys, c.values]


def _quant(c: KVCache | QuantizedKVCache) -> tuple | None:
    return (c.group_size, c.bits) if isinstance(c, QuantizedKVCache) else None


def _reserve(c: KVCache | QuantizedKVCache, n: int) -> None:
    """Grow c's buffers (on the host, uncompiled) so that n more entries fit."""
    arrays = _arrays(c)
    capacity = arrays[-1].shape[2]
    if c.offset + n <= capacity:
        return
    step = getattr(c, "step", 256)
    grown = (c.offset + n + step - 1) // step * step
    new = []
    for a in arrays:
        kept = a[..., : c.offset, :]
        pad = mx.zeros((*a.shape[:2], grown - c.offset, a.shape[-1]), a.dtype)
        new.append(mx.concatenate([kept, pad], axis=2))
    _set(c, new)


def _set(c: KVCache | QuantizedKVCache, arrays: list[mx.array]) -> None:
    if isinstance(c, QuantizedKVCache):
        c.keys, c.values = tuple(arrays[:3]), arrays[3]
    else:
        c.keys, c.values = arrays


class Group(tuple):
    """Caches sharing one offset in a compiled call (a model's layers, or one MTP layer),
    with how many entries the call may write (`reserve`) and how many it keeps (`advance`)."""

    def __new__(cls, caches: Sequence[Any], reserve: int, advance: int):
        return super().__new__(cls, (list(caches), reserve, advance))


def run(
    model: nn.Module,
    name: Any,
    build: Callable[..., Callable],
    args: Sequence[Any],
    groups: Sequence[Group],
    random: bool = False,
):
    """Call `model`'s compiled function `name` (a string, or a tuple starting with one;
    made once by `build(*traced groups) -> fn(*args) -> outputs`) with `args` and the
    groups' caches: writes the buffers back and moves each group's offset on by its
    `advance`; returns the outputs. random: the function draws random numbers (MLX's random
    state goes in and out)."""
    store = _store(model)
    key = (name, random, tuple(tuple(_quant(c) for c in g[0]) for g in groups))
    fn = store.get(key)
    if fn is None:
        fn = store[key] = _compile(build, [g[0] for g in groups], random)
    offsets, states = [], []
    for caches, reserve, _ in groups:
        if len({c.offset for c in caches}) != 1:
            raise ValueError(f"{name}: the caches of a group must hold as many entries each")
        for c in caches:
            _reserve(c, reserve)
        offsets.append(mx.array(caches[0].offset, mx.int32))
        states.append([_arrays(c) for c in caches])
    for caches, _, _ in groups:  # the graph holds the only reference: buffers can be donated
        for c in caches:
            c.keys = c.values = None
    try:
        outputs, new_states = fn(list(args), offsets, states)
    except BaseException:
        new_states, outputs = states, None
        raise
    finally:
        for (caches, _, advance), new in zip(groups, new_states, strict=True):
            for c, arrays in zip(caches, new, strict=True):
                _set(c, arrays)
                c.offset += advance if outputs is not None else 0
    return outputs


def _compile(build: Callable[..., Callable], groups: list[list], random: bool) -> Callable:
    quants = [[_quant(c) for c in caches] for caches in groups]

    def traced(args: list, offsets: list, states: list):
        traced_groups = [
            [TracedCache(a, off, q) for a, q in zip(arrays, qs, strict=True)]
            for arrays, off, qs in zip(states, offsets, quants, strict=True)
        ]
        outputs = build(*traced_groups)(*args)
        return outputs, [[c.arrays for c in g] for g in traced_groups]

    if random:
        state = mx.random.state
        return mx.compile(traced, inputs=state, outputs=state)
    return mx.compile(traced)


def functions(model: nn.Module) -> list[str]:
    """The names of the functions compiled for `model` so far (tests, diagnostics)."""
    names = [key[0] for key in _store(model) if isinstance(key, tuple)]
    return [name[0] if isinstance(name, tuple) else name for name in names]


def forget(model: nn.Module) -> None:
    """Drop `model`'s compiled functions (after changing its methods, e.g. in a test)."""
    model.__dict__.pop(_ATTR, None)
