"""Find clang, compile emulated kernels to shared objects, cache them by a hash of the source."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CANDIDATES = ("clang-21", "clang-20", "clang-19", "clang-18", "clang-17", "clang-16", "clang")
MIN_VERSION = 16


class MetalEmulatorError(RuntimeError):
    """A kernel the emulator could not compile or that misbehaved when run."""


class ClangNotFoundError(MetalEmulatorError):
    pass


@functools.lru_cache(maxsize=1)
def find_clang() -> tuple[str, int]:
    """(path, major version) of a clang >= 16; MLX_DEEPSEEK_EMU_CLANG overrides the search."""
    wanted = os.environ.get("MLX_DEEPSEEK_EMU_CLANG")
    tried = []
    for name in (wanted,) if wanted else CANDIDATES:
        path = shutil.which(name)
        if not path:
            tried.append(name)
            continue
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"clang version (\d+)", out)
        major = int(m.group(1)) if m else 0
        if major >= MIN_VERSION:
            return path, major
        tried.append(f"{name} (version {major})")
    raise ClangNotFoundError(
        f"the Metal emulator needs clang >= {MIN_VERSION} (for _Float16 and __bf16 on x86-64); "
        f"tried {', '.join(tried)}. Install clang-19 (Debian/Ubuntu: apt-get install clang-19) "
        "or point MLX_DEEPSEEK_EMU_CLANG at one."
    )


def cache_dir() -> Path:
    root = os.environ.get("MLX_DEEPSEEK_EMU_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "mlx_deepseek_metal_emu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _flags(major: int) -> list[str]:
    flags = ["-O1", "-fPIC", "-fno-strict-aliasing", "-fvisibility=hidden"]
    # Round _Float16 / __bf16 after every operation, as Metal does, not at assignments.
    flags += ["-Xclang", "-ffloat16-excess-precision=none"]
    if major >= 17:
        flags += ["-Xclang", "-fbfloat16-excess-precision=none"]
    return flags


def _support_digest() -> str:
    h = hashlib.sha256()
    for name in ("msl.h", "msl_runtime.h", "runtime.c"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


def _atomic_build(cmd: list[str], target: Path, what: str) -> None:
    """Run cmd with `{out}` replaced by a temporary path, then move it to target."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=target.suffix + ".tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [c.replace("{out}", tmp) for c in cmd], capture_output=True, text=True
        )
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            msg = "\n".join(lines[:60]) + ("\n..." if len(lines) > 60 else "")
            raise MetalEmulatorError(f"{what} does not compile:\n{msg}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _runtime_object() -> Path:
    clang, major = find_clang()
    key = hashlib.sha256(f"{clang}{major}{_support_digest()}".encode()).hexdigest()[:20]
    target = cache_dir() / f"runtime-{key}.o"
    if not target.exists():
        cmd = [
            clang,
            "-x",
            "c",
            "-std=gnu11",
            "-O2",
            "-fPIC",
            "-fvisibility=hidden",
            "-U_FORTIFY_SOURCE",
            "-c",
            str(HERE / "runtime.c"),
            "-o",
            "{out}",
        ]
        _atomic_build(cmd, target, "the emulator runtime")
    return target


def compile_kernel(source: str, label: str) -> Path:
    """Compile one emulator translation unit (see signature.emulator_source), cached."""
    clang, major = find_clang()
    flags = _flags(major)
    key = hashlib.sha256(
        f"{clang}{major}{flags}{_support_digest()}\0{source}".encode()
    ).hexdigest()[:24]
    target = cache_dir() / f"{key}.so"
    if target.exists():
        return target
    runtime = _runtime_object()
    src = cache_dir() / f"{key}.cpp"
    src.write_text(source)
    cmd = [
        clang,
        "--driver-mode=g++",
        "-std=c++17",
        *flags,
        "-fno-exceptions",
        "-fno-rtti",
        "-Wno-unknown-attributes",
        "-Wno-ignored-attributes",
        f"-I{HERE}",
        f"-I{HERE / 'include'}",
        "-shared",
        "-o",
        "{out}",
        str(src),
        str(runtime),
        "-lm",
    ]
    _atomic_build(cmd, target, f"kernel '{label}'")
    return target


@functools.cache
def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.msl_run.restype = ctypes.c_int
    lib.msl_run.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.msl_alloc_guarded.restype = ctypes.c_void_p
    lib.msl_alloc_guarded.argtypes = [ctypes.c_size_t]
    lib.msl_free_guarded.restype = None
    lib.msl_free_guarded.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib
