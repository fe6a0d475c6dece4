"""OpenBLAS under MLX whatever the import order: each case in a fresh process, since the point
is what was loaded first."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlx_deepseek import _blas

linux_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="MLX links the reference BLAS on Linux only"
)

# greedy tokens of the bundled demo on a prompt long enough for the dequantized BLAS prefill,
# and which BLAS MLX calls before and after mlx_deepseek comes in
SCRIPT = """
import ctypes, importlib.util, json, sys, warnings
warnings.simplefilter("always")
{first}
import mlx.core as mx
before = None
if "mlx_deepseek" not in sys.modules:  # read MLX's table with a detached copy of _blas.py
    spec = importlib.util.spec_from_file_location("probe", {blas!r})
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    path = probe.mlx_library()
    ref = next(l.split()[-1] for l in open("/proc/self/maps") if "/libblas" in l and "mlx" in l)
    (off, *_), = probe.relocation_slots(path, ("cblas_sgemm",)).values()
    slot = ctypes.c_void_p.from_address(probe._load_bias(path) + off).value
    ref_addr = ctypes.cast(ctypes.CDLL(ref).cblas_sgemm, ctypes.c_void_p).value
    before = "reference" if slot == ref_addr else "other"
import mlx_deepseek
from mlx_deepseek import _blas, load, generate
{between}
with warnings.catch_warnings(record=True) as caught:
    model, tok = load("demo")
    text = generate(model, tok, [{{"role": "user", "content": "Count from 3 to 9, then spell "
                    "planet backwards, then add 23 and 45."}}], max_tokens=12, temperature=0.0)
    load("demo")  # a second load says nothing again
print(json.dumps({{"before": before, "after": _blas.mlx_blas(), "text": text,
                  "warnings": [str(w.message) for w in caught]}}))
"""


def run(first: str = "", between: str = "", env: dict | None = None) -> dict:
    code = SCRIPT.format(first=first, between=between, blas=os.path.abspath(_blas.__file__))
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_openblas
def test_mlx_imported_first_is_repointed_to_openblas():
    if _blas.loaded is None:
        pytest.fail("no OpenBLAS on this Linux machine: .ci/run installs libopenblas0-pthread")
    first = run(first="import mlx.core")  # the habit of mlx-lm users
    ours_first = run(first="import mlx_deepseek")
    lm_first = run(first="import mlx_lm")
    assert first["before"] == "reference"  # bound to MLX's bundled reference BLAS at its load
    for r in (first, ours_first, lm_first):
        assert r["after"] == "openblas"
        assert r["warnings"] == []
    assert first["text"] == ours_first["text"] == lm_first["text"] and first["text"]


@linux_openblas
def test_the_slow_state_is_said_once_with_the_fix():
    # MLX re-bound to its reference BLAS after the import, and re-pointing made impossible
    undo = textwrap.dedent("""
        import ctypes
        path = _blas.mlx_library()
        ref = next(l.split()[-1] for l in open("/proc/self/maps") if "/libblas" in l
                   and "mlx" in l)
        addr = ctypes.cast(ctypes.CDLL(ref).cblas_sgemm, ctypes.c_void_p).value
        for off in _blas.relocation_slots(path, ("cblas_sgemm",))["cblas_sgemm"]:
            _blas._write_pointer(_blas._load_bias(path) + off, addr)
        def refuse():
            raise OSError("cannot patch")
        _blas.repoint = refuse
        assert _blas.mlx_blas() == "other"
    """)
    r = run(first="import mlx.core", between=undo)
    assert r["after"] == "other"
    assert len(r["warnings"]) == 1, r["warnings"]
    (line,) = r["warnings"]
    assert "\n" not in line and "reference BLAS" in line
    assert "import mlx_deepseek before mlx" in line and "LD_PRELOAD=" in line


@linux_openblas
def test_a_missing_openblas_is_said_once():
    r = run(first="import mlx.core", env={"MLX_DEEPSEEK_OPENBLAS": "/nonexistent/libblas.so"})
    assert r["after"] == "other"
    (line,) = r["warnings"]
    assert "'/nonexistent/libblas.so' cannot be loaded" in line and "apt-get install" in line
    off = run(first="import mlx.core", env={"MLX_DEEPSEEK_NO_OPENBLAS": "1"})
    assert off["warnings"] == []  # switched off on purpose: nothing to say


@linux_openblas
def test_relocations_name_mlx_blas_calls():
    import mlx.core  # noqa: F401

    path = _blas.mlx_library()
    assert path and path.endswith("libmlx.so")
    slots = _blas.relocation_slots(path, _blas.SYMBOLS)
    assert set(slots) == set(_blas.SYMBOLS)
    assert all(offsets for offsets in slots.values())
    assert _blas.relocation_slots(path, ("no_such_symbol",)) == {}
    assert _blas.repoint() == 0  # this process is re-pointed already: nothing left to change
    assert _blas.mlx_blas() == "openblas"
