"""--expert-cache SIZE: the memory the routed experts may hold, as slots per MoE layer.

SIZE is bytes ("40GB", "512MiB", "1e9", a bare number of bytes), a percentage of the
routed experts ("25%"), or "auto" (what fits next to everything else). Every MoE layer
gets the same number of slots: budget // (layers x one expert's bytes), at most all of its
experts. A layer needs a slot for each expert one token uses (num_experts_per_tok), so a
smaller budget is refused with that minimum.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from ..errors import ArgumentTypeError, ArgumentValueError, DeepSeekError, OutOfMemoryError

AUTO = "auto"
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")
HEADROOM = 0.9  # "auto" leaves a tenth of what is available to the rest of the system


@dataclass(frozen=True)
class Budget:
    """A parsed SIZE: bytes, a fraction of the routed experts, or auto."""

    text: str
    nbytes: int | None = None
    fraction: Fraction | None = None

    @property
    def auto(self) -> bool:
        return self.nbytes is None and self.fraction is None


def parse_budget(value: str | int) -> Budget:
    """SIZE as given to --expert-cache or load(expert_cache=...) -> Budget (one line if bad)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ArgumentTypeError(
            f'expert_cache={value!r}: give a size as text ("40GB", "25%", "auto") or a '
            "number of bytes (int)"
        )
    text = str(value).strip()
    if not text:
        raise _bad(value)
    if isinstance(value, int):
        if value <= 0:
            raise _bad(value)
        return Budget(text, nbytes=value)
    low = text.lower()
    if low == AUTO:
        return Budget(text)
    if low.endswith("%"):
        try:
            fraction = Fraction(low[:-1].strip()) / 100
        except ValueError:
            raise _bad(value) from None
        if not 0 < fraction <= 1:
            raise ArgumentValueError(
                f"--expert-cache {text}: a percentage of the routed experts must be in (0, 100]"
            )
        return Budget(text, fraction=fraction)
    m = _SIZE.match(low)
    if m is None or m.group(2) not in _UNITS:
        raise _bad(value)
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2)])
    if nbytes <= 0:
        raise _bad(value)
    return Budget(text, nbytes=nbytes)


def _bad(value: object) -> ArgumentValueError:
    return ArgumentValueError(
        f"--expert-cache {value!r}: give a size (40GB, 512MiB, a number of bytes), a "
        "percentage of the routed experts (25%), or auto"
    )


@dataclass(frozen=True)
class ExpertShape:
    """What a budget is counted in: the routed experts of the streamed MoE layers."""

    layers: int  # MoE layers (the MTP layers' included)
    experts: int  # routed experts per layer
    top_k: int  # experts one token uses per layer
    expert_bytes: int  # one expert in memory (gate + up + down, packed weights + scales)

    @property
    def total(self) -> int:
        return self.layers * self.experts * self.expert_bytes

    def nbytes(self, slots: int) -> int:
        """The memory `slots` slots per layer take."""
        return self.layers * slots * self.expert_bytes


def gb(n: int, up: bool = True) -> str:
    """Bytes as a SIZE --expert-cache reads back ("41.25GB", "3.50MB"), rounded up (a minimum
    printed so is enough when given back) or down (a most that fits)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            hundredths = -(-n * 100 // scale) if up else n * 100 // scale
            return f"{hundredths // 100}.{hundredths % 100:02d}{unit}"
    return f"{n}B"


def slots_for(budget: Budget, shape: ExpertShape, room: int | None = None) -> int:
    """Slots per layer for `budget`. room: bytes left for the experts after everything else
    (None: unknown); "auto" needs it and takes HEADROOM of it."""
    per_slot = shape.layers * shape.expert_bytes
    if budget.fraction is not None:
        slots = int(budget.fraction * shape.experts)
    elif budget.nbytes is not None:
        slots = budget.nbytes // per_slot
    else:
        if room is None:
            raise DeepSeekError(
                "--expert-cache auto: this machine's available memory is unknown; give a size"
            )
        slots = int(room * HEADROOM) // per_slot
        if slots < shape.top_k:
            raise OutOfMemoryError(
                f"--expert-cache auto: only {gb(max(room, 0))} is left for the routed experts "
                f"after the other weights and the cache, below the minimum of "
                f"{gb(shape.nbytes(shape.top_k))} ({shape.top_k} experts per MoE layer): "
                "use a lower-bit conversion or a machine with more memory"
            )
    slots = min(slots, shape.experts)
    if slots < shape.top_k:
        least = shape.nbytes(shape.top_k)
        pct = math.ceil(10000 * shape.top_k / shape.experts) / 100
        raise DeepSeekError(
            f"--expert-cache {budget.text}: below the minimum that works, {gb(least)} "
            f"({pct:g}% of the routed experts: the {shape.top_k} experts one token uses in "
            f"each of {shape.layers} MoE layers); give at least that"
        )
    return slots
