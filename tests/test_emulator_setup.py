"""Without a clang >= 16 the emulator tests (marked `emulator`) fail with one message that
names the package to install, not each with its own TypeError or assertion (conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# a few emulator tests from each kind of module: the emulator itself, kernels in a fake Metal
SUBSET = [
    "tests/test_metal_emulator.py::test_signature_is_written_as_mlx_writes_it",
    "tests/test_metal_emulator.py::test_lockstep_errors_are_reported[deadlock]",
    "tests/test_fused_kernels.py::test_router_matches_float64",
    "tests/test_kernels.py::test_fused_moe_self_checks_once_then_falls_back_with_one_warning",
]


def run_subset(clang: str, tmp_path: Path) -> str:
    env = {**os.environ, "MLX_DEEPSEEK_EMU_CLANG": clang, "MLX_DEEPSEEK_EMU_CACHE": str(tmp_path)}
    env["COLUMNS"] = "1000"  # whole lines in the summary
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *SUBSET],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def old_clang(tmp_path: Path) -> str:
    fake = tmp_path / "clang-14"
    fake.write_text("#!/bin/sh\necho 'Debian clang version 14.0.6'\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize("kind", ["missing", "too old"])
def test_without_clang_16_every_emulator_test_fails_with_the_one_install_line(tmp_path, kind):
    clang = str(tmp_path / "no-such-clang") if kind == "missing" else old_clang(tmp_path)
    out = run_subset(clang, tmp_path)
    reported = re.findall(r"^(?:ERROR|FAILED) (tests/\S+) - (.*)$", out, re.M)
    ran = re.search(r"(\d+) errors? in", out)
    assert ran and len(reported) == int(ran.group(1)) >= len(SUBSET), out
    messages = {m for _, m in reported}
    assert len(messages) == 1, messages  # one message, whatever the test
    assert "apt-get install clang-19" in out and "clang >= 16" in out
    for wrong in ("TypeError", "AssertionError", "Traceback", "DID NOT WARN"):
        assert wrong not in out
