import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny test models stand in for big quantized ones: keep them quantized on the CPU (ops/cpu.py
# runs small models from float weights); tests of that path, and the demo's, turn it on.
os.environ.setdefault("MLX_DEEPSEEK_SMALL_FLOAT", "0")

sys.path.insert(0, str(Path(__file__).parent))

import mlx_deepseek  # noqa: E402,F401  (preloads OpenBLAS before mlx.core)

_EMULATOR_PROBLEM: list[str | None] = []


def _emulator_problem() -> str | None:
    """Why the CPU emulator of Metal cannot run here (no clang >= 16), or None. Checked once."""
    if not _EMULATOR_PROBLEM:
        import mlx.core as mx
        from metal_emulator import ClangNotFoundError, find_clang

        problem = None
        if not mx.metal.is_available():  # on a Mac the kernels run on the GPU instead
            try:
                find_clang()
            except ClangNotFoundError as e:
                problem = str(e)
        _EMULATOR_PROBLEM.append(problem)
    return _EMULATOR_PROBLEM[0]


def pytest_runtest_setup(item):
    """Tests marked `emulator` fail with the one line saying what to install when there is
    no clang to compile the kernels, instead of each failing its own way."""
    if item.get_closest_marker("emulator") is not None:
        problem = _emulator_problem()
        if problem:
            pytest.fail(problem, pytrace=False)


def pytest_terminal_summary(terminalreporter):
    problem = _EMULATOR_PROBLEM[0] if _EMULATOR_PROBLEM else None
    if problem:
        terminalreporter.write_line(f"emulator tests could not run: {problem}", red=True)
