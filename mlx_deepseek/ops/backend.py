"""Which back-end implements the ops: chosen once, overridable for a block.

`resolve()` picks one for the default device (mlx_deepseek.load calls it): "metal" on a Mac's
GPU, "cpu" on MLX's CPU back-end, "mlx" elsewhere (e.g. MLX's CUDA build). MLX_DEEPSEEK_BACKEND
forces one; `use(name)` switches for a block (tests, benchmarks) and restores the previous.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import mlx.core as mx

from ..errors import DeepSeekError

ENV_BACKEND = "MLX_DEEPSEEK_BACKEND"
NAMES = ("mlx", "cpu", "metal")


class _State:
    name: str | None = None
    impl: ModuleType | None = None


def default_name() -> str:
    """The back-end for MLX's default device."""
    if mx.default_device() == mx.gpu:
        return "metal" if mx.metal.is_available() else "mlx"
    return "cpu"


def resolve(name: str | None = None) -> str:
    """Choose the back-end: `name`, else MLX_DEEPSEEK_BACKEND, else the default device's.
    Returns its name."""
    name = name or os.environ.get(ENV_BACKEND, "").strip().lower() or default_name()
    if name not in NAMES:
        raise DeepSeekError(f"{ENV_BACKEND}={name!r}: choose one of {', '.join(NAMES)}")
    impl = importlib.import_module(f".{name}", __package__)
    configure = getattr(impl, "configure", None)
    if configure is not None:
        configure()
    _State.name, _State.impl = name, impl
    return name


def active() -> ModuleType:
    """The back-end module in use (resolved on first use if nobody chose one)."""
    if _State.impl is None:
        resolve()
    return _State.impl


def current() -> str:
    """The name of the back-end in use."""
    active()
    return _State.name


@contextmanager
def use(name: str) -> Iterator[ModuleType]:
    """Run a block with the back-end `name` (the previous one is restored after)."""
    saved = (_State.name, _State.impl)
    resolve(name)
    try:
        yield _State.impl
    finally:
        _State.name, _State.impl = saved
