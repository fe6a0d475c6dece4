"""OpenBLAS for MLX's float32 matmuls on Linux, whatever was imported first.

MLX's Linux CPU wheel links the slow reference BLAS (libmlx.so needs a bundled libblas).
OpenBLAS makes its float32 matmuls ~8-25x faster on a 2-core x86 machine. Two ways in:

- before MLX is loaded: OpenBLAS opened with RTLD_GLOBAL, so that loading libmlx.so binds
  its `cblas_*` calls to it (`import mlx_deepseek` does this first thing);
- after (a script that imported mlx.core or mlx_lm first): Python loads extensions with
  RTLD_NOW, so libmlx.so's calls are already bound to the reference BLAS through its global
  offset table. `repoint()` rewrites those table entries (the JUMP_SLOT / GLOB_DAT
  relocations libmlx.so's ELF file lists for the `cblas_*` symbols) with OpenBLAS's
  addresses: the dynamic linker's own mechanism, redone once for a few symbols.

`mlx_blas()` reads the table back: which library MLX's sgemm calls now. Nothing happens on
macOS (MLX uses Accelerate and Metal), when no OpenBLAS is installed, or when
MLX_DEEPSEEK_NO_OPENBLAS=1; MLX_DEEPSEEK_OPENBLAS=PATH names the library to use.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from functools import cache

ENV_OFF = "MLX_DEEPSEEK_NO_OPENBLAS"
ENV_PATH = "MLX_DEEPSEEK_OPENBLAS"
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)
# the BLAS calls libmlx.so makes (nm -D --undefined-only): the matmuls
SYMBOLS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")
PROBE = "cblas_sgemm"  # the one every float32 matmul goes through

loaded: str | None = None
_lib: ctypes.CDLL | None = None
default_threads: int | None = None  # OpenBLAS's own choice, before anyone changed it


def preload_openblas() -> str | None:
    """Load OpenBLAS (once) and, when MLX is already loaded, re-point MLX's BLAS calls to it.
    Returns the library's path, or None when there is none to use."""
    global loaded, _lib, default_threads
    if not sys.platform.startswith("linux") or os.environ.get(ENV_OFF) == "1":
        return None
    if not loaded:
        given = os.environ.get(ENV_PATH, "").strip()
        for path in (given,) if given else _CANDIDATES:
            if os.path.exists(path):
                try:
                    _lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                loaded = path
                break
        default_threads = threads()
    if loaded and mlx_library() is not None:
        try:
            repoint()
        except OSError:
            pass  # the check at load (slow_state) says so in one line
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


# ---- MLX's binding -----------------------------------------------------------------------------


def mlx_library() -> str | None:
    """The path of the libmlx.so this process has loaded, or None (not loaded yet, or not
    Linux)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.endswith("/libmlx.so"):
                    return path
    except OSError:
        pass
    return None


def _load_bias(path: str) -> int:
    """Where the already-loaded library `path` sits in memory (its link_map's l_addr)."""

    class LinkMap(ctypes.Structure):
        _fields_ = [("l_addr", ctypes.c_size_t), ("l_name", ctypes.c_char_p)]

    handle = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)._handle  # no new load: the one in use
    dl = ctypes.CDLL(None)
    dl.dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    link = ctypes.POINTER(LinkMap)()
    if dl.dlinfo(handle, 2, ctypes.byref(link)) != 0:  # RTLD_DI_LINKMAP
        raise OSError(f"dlinfo failed for {path}")
    return link.contents.l_addr


@cache
def relocation_slots(path: str, names: tuple[str, ...]) -> dict[str, list[int]]:
    """Offsets (from the load address) of the global-offset-table entries through which the
    ELF64 library `path` calls each of `names`: its RELA relocations of type GLOB_DAT (6) or
    JUMP_SLOT (7) against those dynamic symbols."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:5] != b"\x7fELF\x02" or data[5] != 1:
        raise OSError(f"{path}: not a little-endian ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # section header: name, type, flags, addr, offset, size, link, info, align, entsize
    header = "<IIQQQQIIQQ"
    sections = [struct.unpack_from(header, data, shoff + i * shentsize) for i in range(shnum)]
    wanted = set(names)
    slots: dict[str, list[int]] = {}
    for sec in sections:
        if sec[1] != 4:  # SHT_RELA
            continue
        symtab = sections[sec[6]]
        strtab = sections[symtab[6]]
        for at in range(sec[4], sec[4] + sec[5], 24):
            offset, info, _ = struct.unpack_from("<QQq", data, at)
            sym, kind = info >> 32, info & 0xFFFFFFFF
            if kind not in (6, 7) or sym == 0:
                continue
            start = strtab[4] + struct.unpack_from("<I", data, symtab[4] + 24 * sym)[0]
            name = data[start : data.index(b"\0", start)].decode()
            if name in wanted:
                slots.setdefault(name, []).append(offset)
    return slots


def _address(lib: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _write_pointer(address: int, value: int) -> None:
    """Store a pointer, making its page writable for the moment when it is read-only (a
    RELRO table)."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    page = address & ~(page_size - 1)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    writable = _page_writable(page)
    if not writable and libc.mprotect(page, page_size, 3) != 0:  # PROT_READ | PROT_WRITE
        raise OSError(ctypes.get_errno(), "mprotect failed")
    ctypes.c_void_p.from_address(address).value = value  # one aligned store: atomic
    if not writable:
        libc.mprotect(page, page_size, 1)  # PROT_READ, as it was


def _page_writable(page: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(v, 16) for v in span.split("-"))
            if lo <= page < hi:
                return "w" in perms
    return False


def repoint() -> int:
    """Re-point the loaded libmlx.so's BLAS calls (SYMBOLS) to the loaded OpenBLAS; returns
    how many table entries changed (0 when they pointed there already, or nothing is
    loaded). Raises OSError when the library cannot be read or patched."""
    path = mlx_library()
    if _lib is None or path is None:
        return 0
    bias = _load_bias(path)
    changed = 0
    for name, offsets in relocation_slots(path, SYMBOLS).items():
        target = _address(_lib, name)
        if target is None:
            continue
        for offset in offsets:
            slot = ctypes.c_void_p.from_address(bias + offset)
            if slot.value != target:
                _write_pointer(bias + offset, target)
                changed += 1
    return changed


def mlx_blas() -> str:
    """Which BLAS MLX's float32 matmuls call now: "openblas" (the loaded OpenBLAS),
    "other" (anything else: MLX's bundled reference BLAS), or "unknown" (MLX not loaded,
    not Linux, or its tables unreadable)."""
    path = mlx_library()
    if path is None:
        return "unknown"
    try:
        offsets = relocation_slots(path, (PROBE,)).get(PROBE)
        if not offsets:
            return "unknown"
        value = ctypes.c_void_p.from_address(_load_bias(path) + offsets[0]).value
    except OSError:
        return "unknown"
    return "openblas" if _lib is not None and value == _address(_lib, PROBE) else "other"


def slow_state() -> str | None:
    """One line saying MLX's matmuls run on the slow reference BLAS here and how to fix it, or
    None when they do not (or this is not a Linux CPU build, or OpenBLAS is switched off)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_OFF) == "1":
        return None
    if loaded is None:
        given = os.environ.get(ENV_PATH, "").strip()
        where = f"{ENV_PATH}={given!r} cannot be loaded" if given else "no OpenBLAS found"
        return (
            f"{where}: MLX's CPU matmuls use its slow reference BLAS (prefill ~10x slower); "
            f"install it (apt-get install libopenblas0-pthread) or set {ENV_PATH}=PATH"
        )
    if mlx_blas() == "other":
        return (
            "MLX's matmuls still call its slow reference BLAS (it was loaded before "
            "mlx_deepseek and could not be re-pointed): import mlx_deepseek before mlx, or run "
            f"with LD_PRELOAD={loaded}"
        )
    return None
