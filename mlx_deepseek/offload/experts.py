"""A MoE layer's routed experts in a bank of slots, filled from the checkpoint on demand.

`StreamedExperts` takes the place of mlx-lm's SwitchGLU in a MoE layer (loading.py swaps it
in). Its bank is a SwitchGLU of the same projections and quantization with `slots` experts
instead of all of them; `ops.moe` hands it the routing and it

1. reads the chosen experts' ids on the host (one sync per layer);
2. makes each one resident: a hit is a slot that holds it; a miss takes the least recently
   used slot no chosen expert holds and reads the expert's bytes into it (reader.py);
3. runs the back-end's own moe on the bank with slot ids for expert ids, so every back-end
   (MLX, the CPU strategies, the Metal kernels) computes exactly what it does resident;
4. prefetches: runs the next MoE layer's router on this layer's input (the residual stream
   changes little from one layer to the next) and starts reading its likely experts into the
   next bank, then evaluates this layer's output while those reads run (and the next
   attention after it). Evaluating here means no computation is ever left queued on a bank
   whose slots a later read changes (two sequences of a batch, MTP, a prefill's rounds).

More distinct experts than slots in one call (a prefill chunk, a big batch) go in rounds of
at most `slots` experts, each evaluated before the next refills the bank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .locate import PROJECTIONS, LayerExperts
from .reader import ExpertReader

PREFETCH_MAX_TOKENS = 8  # prefetch for decode-sized calls; a prefill chunk needs most experts


@dataclass
class ExpertCacheStats:
    """Counters of a model's streamed experts (subtract two snapshots for an interval)."""

    tokens: int = 0  # token rows through the first streamed layer
    lookups: int = 0  # (layer, expert) uses: distinct experts per layer call
    hits: int = 0  # of those, already in a slot (or being prefetched into one)
    reads: int = 0  # experts read from the checkpoint (misses and prefetches)
    bytes_read: int = 0
    stall_seconds: float = 0.0  # the model's thread waiting for reads
    prefetched: int = 0  # experts read ahead of their layer
    prefetch_used: int = 0  # of those, used by the layer they were read for

    def __sub__(self, other: ExpertCacheStats) -> ExpertCacheStats:
        return ExpertCacheStats(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0

    @property
    def stall_per_token(self) -> float:
        return self.stall_seconds / self.tokens if self.tokens else 0.0

    def describe(self) -> str:
        """One line for people: 'experts 82% hit, 1.21 GB/tok read, 0.31 s/tok stalled'."""
        per = self.bytes_per_token
        read = f"{per / 1e9:.2f} GB" if per >= 1e8 else f"{per / 1e6:.1f} MB"
        return (
            f"experts {self.hit_rate:.0%} hit, {read}/tok read, "
            f"{self.stall_per_token:.2f} s/tok stalled"
        )

    def as_dict(self) -> dict[str, float]:
        """The counters and rates (the server's metrics)."""
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(
            hit_rate=self.hit_rate,
            bytes_per_token=self.bytes_per_token,
            stall_seconds_per_token=self.stall_per_token,
        )
        return out


@dataclass
class _Slots:
    """A projection tensor of the bank, as writable bytes per slot."""

    views: list[memoryview]
    dtype: str  # safetensors name of the bank's dtype


_SAFETENSORS_DTYPE = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.uint8: "U8",  # microscaling modes' scales (mxfp4)
}


def slot_views(array: mx.array, slots: int) -> _Slots:
    """Writable byte views of each slot of an evaluated, contiguous [slots, ...] array."""
    mx.eval(array)
    whole = memoryview(array)
    if not whole.c_contiguous:
        raise RuntimeError("an expert bank array is not contiguous")
    raw = whole.cast("B")
    step = raw.nbytes // slots
    return _Slots(
        [raw[s * step : (s + 1) * step] for s in range(slots)], _SAFETENSORS_DTYPE[array.dtype]
    )


class StreamedExperts(nn.Module):
    """A SwitchGLU stand-in whose weights live in `slots` slots (see the module docstring).

    It holds no parameters: the bank is kept out of the module tree (the model's parameters
    are what the checkpoint holds resident)."""

    def __init__(
        self,
        bank: nn.Module,
        source: LayerExperts,
        reader: ExpertReader,
        stats: ExpertCacheStats,
        num_experts: int,
    ):
        super().__init__()
        slots = bank.gate_proj["weight"].shape[0]
        hidden = object.__setattr__  # plain attributes, not children or parameters
        hidden(self, "bank", bank)
        hidden(self, "source", source)
        hidden(self, "reader", reader)
        hidden(self, "stats", stats)
        hidden(self, "next_layer", None)  # (the next MoE layer's gate, its StreamedExperts)
        self.slots = slots
        self.num_experts = num_experts
        self.counts_tokens = False  # the first streamed layer counts the tokens
        self.prefetch = True
        self.trace: list[np.ndarray] | None = None  # a list: each call's chosen experts (bench)
        self._views = {
            (proj, kind): slot_views(bank[proj][kind], slots)
            for proj in PROJECTIONS
            for kind in source.kinds(proj)
        }
        self.slot_of = np.full(num_experts, -1, dtype=np.int64)  # expert -> slot
        self.expert_in = np.full(slots, -1, dtype=np.int64)  # slot -> expert
        self.last_use = np.zeros(slots, dtype=np.int64)
        self.clock = 0
        self._loading: list[Future] = []  # prefetch reads into this bank
        self._prefetched: set[int] = set()  # experts prefetched and not used yet

    @property
    def expert_bytes(self) -> int:
        return sum(v.views[0].nbytes for v in self._views.values())

    def link(self, gate: nn.Module | None, nxt: StreamedExperts | None) -> None:
        """The next MoE layer (its router and experts), for prefetching."""
        object.__setattr__(self, "next_layer", None if gate is None else (gate, nxt))

    # ---- the op ----------------------------------------------------------------------------

    def moe(
        self,
        x: mx.array,
        inds: mx.array,
        weights: mx.array,
        shared: nn.Module | None,
        swiglu_limit: float,
        backend_moe: Callable,
    ) -> mx.array:
        """ops.moe on the bank: x [..., D], inds [..., k] expert ids, weights [..., k];
        backend_moe: the back-end's moe, which takes the same arguments as ops.moe."""

        def whole(ids: mx.array) -> mx.array:
            return backend_moe(x, ids, weights, self.bank, shared, swiglu_limit)

        def rounds(groups: Iterator[tuple[np.ndarray, mx.array]]) -> Iterator[mx.array]:
            D, k = x.shape[-1], inds.shape[-1]
            x2, w_flat = x.reshape(-1, D), weights.reshape(-1)
            y = mx.zeros((x2.shape[0], D), mx.float32)
            for pairs, ids in groups:
                rows = mx.array(pairs // k)
                w_part = w_flat[mx.array(pairs)][:, None]
                part = backend_moe(x2[rows], ids, w_part, self.bank, None, swiglu_limit)
                y = y.at[rows].add(part.astype(mx.float32))
                yield y  # evaluated before the next round refills the slots
            y = y.astype(x.dtype).reshape(x.shape)
            yield y if shared is None else y + shared(x)

        return self._run(x, inds, whole, rounds)

    @property
    def gate_proj(self) -> nn.Module:
        return self.bank.gate_proj

    @property
    def up_proj(self) -> nn.Module:
        return self.bank.up_proj

    @property
    def down_proj(self) -> nn.Module:
        return self.bank.down_proj

    def _run(self, x: mx.array, inds: mx.array, whole: Callable, rounds: Callable) -> mx.array:
        """The bookkeeping both calls share: ids to the host, the chosen experts resident (in
        one go: `whole(slot ids)`; or `rounds` over (pairs of flat positions, their slot ids),
        yielding partial outputs, each evaluated before the next round refills the slots,
        then the result), the next layer's prefetch started, the output evaluated."""
        flat = np.array(inds).reshape(-1)  # the sync
        k = inds.shape[-1]
        if self.counts_tokens:
            self.stats.tokens += flat.size // k
        chosen = np.unique(flat)
        if self.trace is not None:
            self.trace.append(chosen)
        self.stats.lookups += chosen.size
        resident = self.slot_of[chosen] >= 0
        self.stats.hits += int(resident.sum())
        if chosen.size <= self.slots:
            lut = self._resident(chosen)
            y = whole(mx.array(lut[flat].reshape(inds.shape), dtype=inds.dtype))
        else:  # the resident experts first, then the others, at most `slots` a round

            def groups():
                ordered = np.concatenate([chosen[resident], chosen[~resident]])
                for start in range(0, ordered.size, self.slots):
                    group = ordered[start : start + self.slots]
                    lut = self._resident(group)
                    pairs = np.nonzero(np.isin(flat, group))[0]
                    yield pairs, mx.array(lut[flat[pairs]][:, None], dtype=mx.uint32)

            partial = rounds(groups())
            y = None
            for y in partial:
                mx.eval(y)
        if self.prefetch and flat.size // k <= PREFETCH_MAX_TOKENS:
            self._prefetch_next(x)
        mx.eval(y)  # while the prefetch reads run; and nothing stays queued on the bank
        return y

    # ---- slots -----------------------------------------------------------------------------

    def _resident(self, experts: np.ndarray) -> np.ndarray:
        """Make `experts` (distinct, at most `slots`) resident; returns expert -> slot. The
        bank has nothing queued on it (see the module docstring)."""
        self._finish_prefetch()
        held = self.slot_of[experts]
        hit = held >= 0
        for e in experts[hit]:
            if int(e) in self._prefetched:
                self._prefetched.discard(int(e))
                self.stats.prefetch_used += 1
        missing = experts[~hit]
        if missing.size:
            victims = self._victims(missing.size, keep=held[hit])
            t0 = time.perf_counter()
            self._wait(self._load(missing, victims))
            self.stats.stall_seconds += time.perf_counter() - t0
        self.clock += 1
        self.last_use[self.slot_of[experts]] = self.clock
        return self.slot_of

    def _victims(self, n: int, keep: np.ndarray) -> np.ndarray:
        """n slots to refill: empty ones first, then the least recently used, never `keep`."""
        order = np.lexsort((self.last_use, self.expert_in >= 0))
        return order[~np.isin(order, keep)][:n]

    def _load(self, experts: np.ndarray, slots: np.ndarray) -> list[Future]:
        futures: list[Future] = []
        for e, s in zip(experts.tolist(), slots.tolist(), strict=True):
            old = self.expert_in[s]
            if old >= 0:
                self.slot_of[old] = -1
                self._prefetched.discard(int(old))
            self.expert_in[s] = e
            self.slot_of[e] = s
            for (proj, kind), target in self._views.items():
                piece = self.source.pieces[(proj, kind)][e]
                futures += self.reader.read(piece, target.views[s], target.dtype)
        self.stats.reads += len(experts)
        return futures

    @staticmethod
    def _wait(futures: list[Future]) -> None:
        for f in wait_all(futures).done:
            f.result()  # a failed read raises here, on the model's thread

    def _finish_prefetch(self) -> None:
        if self._loading:
            t0 = time.perf_counter()
            loading, self._loading = self._loading, []
            self._wait(loading)
            self.stats.stall_seconds += time.perf_counter() - t0

    # ---- prefetch --------------------------------------------------------------------------

    def _prefetch_next(self, x: mx.array) -> None:
        """Start reading the next layer's likely experts: its router applied to x."""
        if self.next_layer is None:
            return
        gate, nxt = self.next_layer
        inds, _ = gate(x)
        likely = np.unique(np.array(inds))[: nxt.slots]
        nxt.start_prefetch(likely)

    def start_prefetch(self, experts: np.ndarray) -> None:
        """Begin reading those of `experts` not resident into LRU slots, without waiting."""
        self._finish_prefetch()
        missing = experts[self.slot_of[experts] < 0]
        if not missing.size:
            return
        held = self.slot_of[experts]
        victims = self._victims(missing.size, keep=held[held >= 0])
        self._loading = self._load(missing, victims)
        self._prefetched.update(int(e) for e in missing)
        self.stats.prefetched += missing.size
        # a prefetched slot counts as just used, so the next misses do not evict it first
        self.clock += 1
        self.last_use[victims] = self.clock
