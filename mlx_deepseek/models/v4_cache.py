"""DeepSeek V4's cache: per layer a bounded window, the compressed rows, the indexer's rows and
the compressors' partial-window state.

Per layer (`V4LayerCache`), all rows [B, n, d] in preallocated buffers (`RowBuffer`):
- window: the K=V rows of the last `sliding_window - 1 + MAX_ROLLBACK` positions (a decode
  step reads the last sliding_window - 1 of them plus its own row);
- compressed: one row per closed window of `ratio` tokens (compressed layers), index = window;
- indexer: the indexer's own compressed rows (compressed sparse layers);
- compressor states: the projected kv and gate logits (with the position bias) of the tokens
  a future row still needs: the open window, the window before it (overlapping ratio-4
  windows pool 2 * ratio tokens) and MAX_ROLLBACK more positions.
Rows emitted from that state equal the full forward's at every window boundary, since both
run the same pooling over the same tokens.

With kv_bits (`quant` = (group size, bits)) the compressed rows are kept quantized
(`QuantizedRows`: the non-RoPE channels in MLX's affine groups, the RoPE channels at full
precision, as V2/V3's c_kv and k_pe; attention reads them in place: ops.shared_kv_attention).
They are what grows with the context (a compressed sparse layer adds 512/4 of its 160 values
per token). The window and the compressor state are bounded, and the indexer's rows (32 of
the 160) stay at full precision: quantizing them moves its top-k and measured ~3x the KL of
the compressed rows' for 15% fewer bytes (README, "Bigger than memory").

`trim(n)` rolls back n <= MAX_ROLLBACK tokens exactly (speculative decoding's rejected
drafts), or all of them; more raises CacheTrimError: the window and the compressor state
before that are gone (re-prefill instead). `offset`, `state`, `trim`, `is_trimmable` follow
mlx-lm's cache protocol; `V4Cache` is the model's list of them, with the MTP layers' caches.
"""

from __future__ import annotations

import copy

import mlx.core as mx

from ..errors import DeepSeekError
from ..ops.types import SplitRows
from .cache import ModelCache, latent_group_size

MAX_ROLLBACK = 16  # speculative decoding drafts at most 8 tokens; room to spare
STEP = 256  # rows a buffer grows by


class CacheTrimError(DeepSeekError):
    """A V4 cache cannot roll back that far (its window and compressor state are bounded)."""


class RowBuffer:
    """Rows [B, n, d] of consecutive indices [start, end), grown in steps. Rows below
    `keep_from` may be dropped when the buffer is next reallocated."""

    def __init__(self) -> None:
        self.buf: mx.array | None = None
        self.start = 0  # index of buf[:, 0]
        self.end = 0
        self.keep_from = 0

    def append(self, rows: mx.array) -> None:
        B, L, d = rows.shape
        used = self.end - self.start
        if self.buf is None or used + L > self.buf.shape[1] or self.buf.dtype != rows.dtype:
            first = max(self.keep_from, self.start)
            new = mx.zeros((B, self.end - first + L + STEP, d), dtype=rows.dtype)
            if self.buf is not None and self.end > first:
                new[:, : self.end - first] = self.buf[:, first - self.start : used]
            self.buf, self.start = new, first
        i = self.end - self.start
        self.buf[:, i : i + L] = rows
        self.end += L

    def rows(self, lo: int, hi: int) -> mx.array:
        """Rows [lo, hi) (lo >= start)."""
        return self.buf[:, lo - self.start : hi - self.start]

    def all(self) -> mx.array | None:
        return None if self.buf is None else self.buf[:, : self.end - self.start]

    def reset(self) -> None:
        self.buf, self.start, self.end, self.keep_from = None, 0, 0, 0

    def arrays(self) -> list[mx.array]:
        return [] if self.buf is None else [self.buf]

    @property
    def nbytes(self) -> int:
        if self.buf is None:
            return 0
        return (self.end - self.start) * self.buf.nbytes // self.buf.shape[1]


def _all_parts(name: str) -> property:
    """A position every part of a QuantizedRows holds alike: the first part's, set on all."""

    def set_all(self, value: int) -> None:
        for p in self.parts:
            setattr(p, name, value)

    return property(lambda self: getattr(self.parts[0], name), set_all)


class QuantizedRows:
    """RowBuffer's interface for rows [B, n, d] kept quantized: the first d - rope channels
    in MLX's affine groups (packed, scales, biases), the last `rope` at full precision; one
    RowBuffer per part. `rows` / `all` give ops.SplitRows."""

    def __init__(self, rope: int, group_size: int, bits: int) -> None:
        self.rope, self.group_size, self.bits = rope, group_size, bits
        self.parts = [RowBuffer() for _ in range(4)]  # packed, scales, biases, rope

    def append(self, rows: mx.array) -> None:
        body = rows[..., : rows.shape[-1] - self.rope]
        quant = mx.quantize(body, group_size=self.group_size, bits=self.bits)
        for part, a in zip(self.parts, (*quant, rows[..., body.shape[-1] :]), strict=True):
            part.append(a)

    def rows(self, lo: int, hi: int) -> SplitRows:
        return SplitRows(*(p.rows(lo, hi) for p in self.parts))

    def all(self) -> SplitRows | None:
        return None if self.parts[0].buf is None else SplitRows(*(p.all() for p in self.parts))

    def dense(self) -> mx.array:
        """All rows held, dequantized: [B, n, d] in the scales' dtype."""
        packed, scales, biases, rope = self.all()
        body = mx.dequantize(packed, scales, biases, group_size=self.group_size, bits=self.bits)
        return mx.concatenate([body, rope.astype(body.dtype)], axis=-1)

    def reset(self) -> None:
        for p in self.parts:
            p.reset()

    def arrays(self) -> list[mx.array]:
        return [a for p in self.parts for a in p.arrays()]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    # the parts always hold the same rows: their positions read from the first, set on all
    start = property(lambda self: self.parts[0].start)
    end = _all_parts("end")
    keep_from = _all_parts("keep_from")


class V4LayerCache:
    """One attention layer's cache; `ratio` 0 for a sliding-window layer."""

    # mlx-lm's prompt-cache files rebuild each layer by class name from its own module
    savable = False

    def __init__(
        self,
        window: int,
        ratio: int = 0,
        overlap: bool = False,
        indexer: bool = False,
        rope: int = 0,
        quant: tuple[int, int] | None = None,
    ):
        """rope: the RoPE channels at the end of each row (kept at full precision when
        quantized); quant: (group size, bits) to keep the compressed rows quantized."""
        self.window_size, self.ratio, self.overlap = window, ratio, overlap
        self.rope, self.quant = rope, quant
        self.offset = 0
        self.window = RowBuffer()  # index = position
        self.compressed: RowBuffer | QuantizedRows | None = None  # index = window
        if ratio:
            self.compressed = QuantizedRows(rope, *quant) if quant else RowBuffer()
        self.comp_state = RowBuffer() if ratio else None  # index = position
        self.indexer = RowBuffer() if indexer else None
        self.index_state = RowBuffer() if indexer else None
        self.index_losses: list[mx.array] | None = None  # training: indexer_loss per prefill

    def _buffers(self) -> list[RowBuffer]:
        return [
            b
            for b in (self.window, self.compressed, self.comp_state, self.indexer, self.index_state)
            if b is not None
        ]

    def fresh(self, quant: tuple[int, int] | None | bool = True) -> V4LayerCache:
        """An empty cache of the same kind (quant: another quantization, True = the same)."""
        quant = self.quant if quant is True else quant
        indexer = self.indexer is not None
        return V4LayerCache(self.window_size, self.ratio, self.overlap, indexer, self.rope, quant)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> V4LayerCache:
        """This cache with its compressed rows quantized (what mlx-lm's kv_bits calls, every
        step: a cache already in that format is returned as it is). The other buffers are
        shared with this cache, which the caller replaces."""
        if self.quant == (group_size, bits) or self.compressed is None:
            return self
        old = self.compressed
        out = copy.copy(self)
        out.quant = (group_size, bits)
        out.compressed = new = QuantizedRows(self.rope, group_size, bits)
        if old.end > old.start:
            rows = old.dense() if isinstance(old, QuantizedRows) else old.all()
            body = rows.shape[-1] - self.rope
            if body % group_size:
                raise DeepSeekError(
                    f"kv_group_size={group_size} does not divide the compressed rows' {body} "
                    f"non-RoPE channels: give kv_group_size={latent_group_size(body)}"
                )
            new.append(rows)
            for p in new.parts:
                p.start, p.end = old.start, old.end
        return out

    # ---- what attention needs to keep ---------------------------------------------------------

    def _window_floor(self, offset: int) -> int:
        """The first position a query after `offset` reads from the window."""
        return max(0, offset - (self.window_size - 1))

    def _state_floor(self, offset: int) -> int:
        """The first position the next compressed row needs (the open window's start, or the
        one before it with overlap)."""
        return max(0, (offset // self.ratio - int(self.overlap)) * self.ratio)

    def advance(self, n: int) -> None:
        """Count n more tokens (their rows are appended) and let old rows go."""
        self.offset += n
        back = max(0, self.offset - MAX_ROLLBACK)
        self.window.keep_from = self._window_floor(back)
        for state in (self.comp_state, self.index_state):
            if state is not None:
                state.keep_from = self._state_floor(back)

    # ---- mlx-lm's cache protocol -------------------------------------------------------------

    @property
    def state(self) -> list[mx.array]:
        """The arrays the cache holds (to evaluate them)."""
        return [a for b in self._buffers() for a in b.arrays()]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers())

    def empty(self) -> bool:
        return self.offset == 0

    def is_trimmable(self) -> bool:
        return True

    def can_trim(self, n: int) -> bool:
        """Whether trim(n) is exact: all tokens, or the state before offset - n still held."""
        if n >= self.offset:
            return True
        target = self.offset - n
        if self.window.start > self._window_floor(target):
            return False
        for state in (self.comp_state, self.index_state):
            if state is not None and state.start > self._state_floor(target):
                return False
        return True

    def trim(self, n: int) -> int:
        """Drop the last n tokens; returns n. Raises CacheTrimError past what is held."""
        n = min(n, self.offset)
        if n <= 0:
            return 0
        if n == self.offset:
            for b in self._buffers():
                b.reset()
            self.offset = 0
            return n
        if not self.can_trim(n):
            raise CacheTrimError(
                f"a DeepSeek V4 cache rolls back at most {MAX_ROLLBACK} tokens exactly, asked "
                f"for {n}: its window and compressor state before that are gone; prefill again"
            )
        target = self.offset - n
        self.window.end = target
        for state in (self.comp_state, self.index_state):
            if state is not None:
                state.end = target
        for rows in (self.compressed, self.indexer):
            if rows is not None:
                rows.end = target // self.ratio
        self.offset = target
        return n


class V4Cache(ModelCache):
    """The model's cache: one V4LayerCache per layer, plus the MTP layers' on `.mtp` (what
    speculative decoding drives, as for V3)."""

    def __init__(self, layers: list[V4LayerCache], mtp: list[V4LayerCache]):
        list.__init__(self, layers)
        self.mtp = mtp
        self.mtp_hidden = None
        self.mtp_hidden_pos = -1

    def reset_mtp(self) -> None:
        self.mtp = [c.fresh() for c in self.mtp]
        self.mtp_hidden, self.mtp_hidden_pos = None, -1

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self) + sum(c.nbytes for c in self.mtp)
