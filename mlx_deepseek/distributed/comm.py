"""The collectives a split model uses (MLX's `mx.distributed` on the global group), each
counting the bytes this rank puts on the wire, so that a run can say what a token costs.

Counts follow the ring algorithms: an all_sum of n bytes over N ranks sends 2(N-1)/N * n per
rank (reduce-scatter, then all-gather), an all_gather of n bytes per rank sends (N-1) * n, a
send sends n. They are counted when the operation is built; a model evaluates every one it
builds in decode (the logits of each step are read).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class Traffic:
    """Bytes sent by this rank and collectives issued, in all and by kind."""

    sent: int = 0
    ops: int = 0
    by_kind: Counter = field(default_factory=Counter)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent += nbytes
        self.ops += 1
        self.by_kind[kind] += nbytes

    def snapshot(self) -> tuple[int, int]:
        return self.sent, self.ops


TRAFFIC = Traffic()


def group() -> mx.distributed.Group:
    """The global group (MLX returns the one it initialised)."""
    return mx.distributed.init()


def all_sum(x: mx.array, stream: mx.Stream | mx.Device | None = None) -> mx.array:
    n = group().size()
    if n == 1:
        return x
    TRAFFIC.add("all_sum", 2 * (n - 1) * x.nbytes // n)
    return mx.distributed.all_sum(x, stream=stream)


def all_gather(x: mx.array) -> mx.array:
    """Every rank's x concatenated along axis 0, in rank order."""
    n = group().size()
    if n == 1:
        return x
    TRAFFIC.add("all_gather", (n - 1) * x.nbytes)
    return mx.distributed.all_gather(x)


# A pipeline's sends, receives and logits' broadcast run on the CPU stream: a receive waits
# for every earlier stage's work (seconds for a long prefill chunk), longer than a Metal
# command buffer may run before the GPU times it out.
def send(x: mx.array, dst: int) -> mx.array:
    """x, which when evaluated has been sent to rank dst."""
    TRAFFIC.add("send", x.nbytes)
    return mx.distributed.send(x, dst, stream=mx.cpu)


def recv(shape: tuple[int, ...], dtype: mx.Dtype, src: int) -> mx.array:
    """An array of `shape` and `dtype` received from rank src."""
    return mx.distributed.recv(shape, dtype, src, stream=mx.cpu)


def share(x: mx.array) -> mx.array:
    """One rank's x on every rank, exactly: the others pass zeros of its shape and dtype (which
    may carry dependencies, e.g. on a send that must happen first) and all_sum adds them."""
    return all_sum(x, stream=mx.cpu)
