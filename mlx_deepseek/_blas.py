"""Load an optimised BLAS into the process before MLX, on Linux only.

MLX's Linux CPU wheel links the slow reference BLAS. Loading OpenBLAS with RTLD_GLOBAL
before ``mlx.core`` is imported lets MLX's float32 matmuls resolve to it (about 8x faster
on a 2-core x86 machine). Nothing happens on macOS (MLX uses Accelerate and Metal), when
no OpenBLAS is installed, or when MLX_DEEPSEEK_NO_OPENBLAS=1.
"""

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

loaded: str | None = None
_lib: ctypes.CDLL | None = None
default_threads: int | None = None  # OpenBLAS's own choice, before anyone changed it


def preload_openblas() -> str | None:
    global loaded, _lib
    if loaded or not sys.platform.startswith("linux"):
        return loaded
    if os.environ.get("MLX_DEEPSEEK_NO_OPENBLAS") == "1":
        return None
    for path in _CANDIDATES:
        if os.path.exists(path):
            try:
                _lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    global default_threads
    default_threads = threads()
    return loaded


def threads() -> int | None:
    """OpenBLAS's thread count, or None when it is not the loaded BLAS."""
    fn = getattr(_lib, "openblas_get_num_threads", None)
    return None if fn is None else int(fn())


def set_threads(n: int) -> None:
    """Set OpenBLAS's thread count (nothing without OpenBLAS). One thread when work is split
    across MLX streams already: its idle helper threads spin and steal those cores."""
    fn = getattr(_lib, "openblas_set_num_threads", None)
    if fn is not None:
        fn(int(n))
