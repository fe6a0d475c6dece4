"""A CPU emulator of the Metal Shading Language for `mx.fast.metal_kernel` sources.

`metal_kernel(...)` takes the same arguments as `mx.fast.metal_kernel(...)` and returns a
kernel called the same way. The body and header are wrapped in the signature MLX generates
(signature.py), compiled by clang >= 16 as C++ against msl.h (compiler.py, cached by hash),
and run with one fiber per GPU thread, one threadgroup after another (runtime.c).

It reports: unwritten outputs and reads of threadgroup memory before any write (both start as
NaN), divergent barriers, barriers some threads skip, lanes meeting at different SIMD-group
functions, deadlocks, threadgroup memory over 32 KB, reads or writes past the end of a buffer,
and kernels Metal would reject for address-space mismatches.

What it cannot prove: that Apple's compiler accepts the source (it is a subset, compiled by
clang), Metal's fast-math precision, the GPU's reduction order inside simd_sum, per-kernel
thread limits, races between threadgroups (they run one after another) or between threads of
a threadgroup beyond the forward/reverse schedules tried, and speed.
"""

from .compiler import ClangNotFoundError, MetalEmulatorError, find_clang
from .emulator import EmulatedKernel, metal_kernel

__all__ = [
    "ClangNotFoundError",
    "EmulatedKernel",
    "MetalEmulatorError",
    "find_clang",
    "metal_kernel",
]
