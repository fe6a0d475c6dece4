"""Fuzz suite, untrusted files (issue 13 items 1, 2, 3, 6): generated bad checkpoints,
configs, indexes, destination paths and signals.

Every case asserts the one-line message AND that nothing outside the expected output
changed (a digest of the whole workspace, source included, before and after). Loading a
mutated checkpoint runs in a child process (files_worker.py), as anything that could
reach mx.load may crash: a case passes only if that child ended without a signal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from files_mutators import (
    HEADER_CASES,
    HEADER_CONTROLS,
    INDEX_CASES,
    INDEX_CONTROLS,
    config_field_cases,
    hf_cache_layout,
    run_worker,
    split_safetensors,
    tree_digest,
)
from mlx_deepseek.convert.synthetic import write_checkpoint
from stopping import popen_stopping, wait_stopped_mid_write
from typer.testing import CliRunner

from mlx_deepseek import loading
from mlx_deepseek.cli import app
from mlx_deepseek.errors import CheckpointError, DeepSeekError
from mlx_deepseek.models.config_fields import FIELDS
from mlx_deepseek.models.tiny import convertible_config
from mlx_deepseek.safetensors_check import validate_safetensors

CONFIG = convertible_config("deepseek_v3", num_hidden_layers=2, n_routed_experts=4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One shard, no index (header mutations)."""
    path = tmp_path_factory.mktemp("pristine") / "src"
    write_checkpoint(path, CONFIG, fmt="bf16")
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Two shards and an index (index mutations)."""
    path = tmp_path_factory.mktemp("sharded") / "src"
    write_checkpoint(path, CONFIG, fmt="bf16", shards=2)
    return path


def copy_to(checkpoint: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, root / "src", symlinks=True)
    return root / "src"


def one_line(message: str, expect: str) -> None:
    assert expect in message, message
    assert "\n" not in message and "Traceback" not in message, message


def convert(*args: object):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def assert_refused(result, expect: str) -> None:
    assert result.exit_code == 1 or result.exit_code != 0, result.output
    assert isinstance(result.exception, DeepSeekError), repr(result.exception)
    one_line(str(result.exception), expect)


# ---- safetensors headers: the validator, the loader (child process), the converter ----------


def mutate_header(checkpoint: Path, mutate) -> None:
    shard = checkpoint / "model.safetensors"
    header, body = split_safetensors(shard.read_bytes())
    shard.write_bytes(mutate(header, body))


HEADER_IDS = [case[0] for case in HEADER_CASES]
INDEX_IDS = [case[0] for case in INDEX_CASES]


@pytest.fixture(scope="module")
def loader_runs(pristine, sharded, tmp_path_factory):
    """Every loader case prepared, then loaded in child processes (one batch):
    id -> (workspace, digest before, result)."""
    root = tmp_path_factory.mktemp("loader")
    prepared = {}
    for name, mutate, _ in HEADER_CASES:
        src = copy_to(pristine, root / f"h-{name}")
        mutate_header(src, mutate)
        prepared[f"h-{name}"] = src
    for name, mutate in HEADER_CONTROLS:
        src = copy_to(pristine, root / f"hc-{name}")
        mutate_header(src, mutate)
        prepared[f"hc-{name}"] = src
    for name, mutate, _ in INDEX_CASES + [(n, m, "") for n, m in INDEX_CONTROLS]:
        src = copy_to(sharded, root / f"i-{name}")
        mutate(src, src.parent / "outside")
        prepared[f"i-{name}"] = src
    cache = root / "hub"
    prepared["hf-cache"] = hf_cache_layout(sharded, cache)
    before = {k: tree_digest(p.parent) for k, p in prepared.items()}
    before["hf-cache"] = tree_digest(cache)
    cases = [
        {"id": f"{command}:{k}", "path": str(p), "command": command}
        for k, p in prepared.items()
        for command in ("load", "info")
    ]
    results = run_worker("files_worker.py", cases)
    return {
        f"{command}:{k}": (p, before[k], results[f"{command}:{k}"])
        for k, p in prepared.items()
        for command in ("load", "info")
    }


# every damaged header (h-) and index (i-), as the loader worker's cases name them
LOADER_CASES = [(f"h-{name}", expect) for name, _, expect in HEADER_CASES]
LOADER_CASES += [(f"i-{name}", expect) for name, _, expect in INDEX_CASES]


@pytest.mark.parametrize("command", ["load", "info"])
@pytest.mark.parametrize("key,expect", LOADER_CASES, ids=[key for key, _ in LOADER_CASES])
def test_loader_and_info_refuse_in_one_line(loader_runs, key, expect, command):
    src, before, result = loader_runs[f"{command}:{key}"]
    assert "signal" not in result, f"the loader crashed with signal {result.get('signal')}"
    assert "hung" not in result, "the loader hung"
    assert result.get("clean"), result
    one_line(result["msg"], expect)
    assert tree_digest(src.parent) == before


@pytest.mark.parametrize("name,mutate,expect", HEADER_CASES, ids=HEADER_IDS)
def test_header_validator(pristine, tmp_path, name, mutate, expect):
    src = copy_to(pristine, tmp_path)
    mutate_header(src, mutate)
    before = tree_digest(tmp_path)
    with pytest.raises(CheckpointError) as e:
        validate_safetensors(src / "model.safetensors")
    one_line(str(e.value), expect)
    assert str(src / "model.safetensors") in str(e.value)
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("name,mutate,expect", HEADER_CASES, ids=HEADER_IDS)
def test_header_converter(pristine, tmp_path, name, mutate, expect):
    src = copy_to(pristine, tmp_path)
    mutate_header(src, mutate)
    before = tree_digest(tmp_path)
    assert_refused(convert(src, "-o", tmp_path / "out"), expect)
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("name", [c[0] for c in HEADER_CONTROLS])
def test_header_controls_still_load_and_convert(loader_runs, tmp_path, name):
    src, before, result = loader_runs[f"load:hc-{name}"]
    assert result == {"ok": True} and loader_runs[f"info:hc-{name}"][2] == {"ok": True}
    assert validate_safetensors(src / "model.safetensors")
    result = convert(src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert tree_digest(src.parent) == before


# ---- index entries: the loader (child process), the converter, info -------------------------


@pytest.mark.parametrize("name,mutate,expect", INDEX_CASES, ids=INDEX_IDS)
def test_index_converter(sharded, tmp_path, name, mutate, expect):
    src = copy_to(sharded, tmp_path)
    mutate(src, tmp_path / "outside")
    before = tree_digest(tmp_path)
    assert_refused(convert(src, "-o", tmp_path / "out"), expect)
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("name", [c[0] for c in INDEX_CONTROLS] + ["hf-cache"])
def test_index_controls_load_and_convert(loader_runs, tmp_path, name):
    key = f"i-{name}" if name != "hf-cache" else name
    src, before, result = loader_runs[f"load:{key}"]
    assert result == {"ok": True} and loader_runs[f"info:{key}"][2] == {"ok": True}
    result = convert(src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    root = src.parents[2] if name == "hf-cache" else src.parent
    assert tree_digest(root) == before


# ---- config.json: every field, the loader and the converter ---------------------------------

FIELD_CASES = config_field_cases(FIELDS)
RAW_CONFIGS = [  # (id, config.json bytes, message part)
    ("not-utf8", b'{"model_type": "deepseek_v3", "x": "\xff"}', "not UTF-8"),
    ("array", b"[]", "JSON array, not an object"),
    ("string", b'"deepseek_v3"', "JSON string, not an object"),
    ("number", b"3", "JSON number, not an object"),
    ("empty", b"", "not valid JSON"),
    ("cut", b'{"model_type": ', "not valid JSON"),
]
EXTRA_FIELDS = [  # (id, changes, message part)
    ("model_type-number", {"model_type": 3}, "model_type=3"),
    ("model_type-missing", {"model_type": None}, "model_type=None"),
    (
        "rope_scaling-factor-string",
        {"rope_scaling": {**CONFIG["rope_scaling"], "factor": "4"}},
        "rope_scaling.factor",
    ),
    (
        "rope_scaling-orig-zero",
        {"rope_scaling": {**CONFIG["rope_scaling"], "original_max_position_embeddings": 0}},
        "original_max_position_embeddings",
    ),
    (
        "rope_scaling-beta-string",
        {"rope_scaling": {**CONFIG["rope_scaling"], "beta_fast": "32"}},
        "rope_scaling.beta_fast",
    ),
    (
        "rope_scaling-linear",
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        "'linear' is not supported",
    ),
    (
        "rope_scaling-yarn-no-factor",
        {"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 128}},
        "missing 'factor'",
    ),
    (
        "rope_parameters-string",
        {"rope_scaling": None, "rope_parameters": "yarn"},
        "rope_parameters",
    ),
    ("rope_interleave-false", {"rope_interleave": False}, "rope_interleave=False"),
    ("hidden_size-2**31", {"hidden_size": 2**31}, "too large"),
    ("topk_method-unknown", {"topk_method": "best"}, "topk_method='best'"),
    ("scoring_func-softmax-with-noaux", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ("num_experts_per_tok-null", {"num_experts_per_tok": None}, "num_experts_per_tok=None"),
    ("n_group-not-dividing", {"n_group": 3}, "n_group=3 does not divide"),
    ("rms_norm_eps-NaN", {"rms_norm_eps": float("nan")}, "rms_norm_eps=nan"),
    ("rope_theta-Infinity", {"rope_theta": float("inf")}, "rope_theta=inf"),
    ("quantization-bits-string", {"quantization": {"bits": "4", "group_size": 64}}, "quantization"),
    ("quantization-bits-7", {"quantization": {"bits": 7, "group_size": 64}}, "quantization"),
    (
        "quantization-module-string",
        {"quantization": {"bits": 4, "group_size": 64, "lm_head": "8bit"}},
        "quantization",
    ),
    ("quantization-no-bits", {"quantization": {"group_size": 64}}, "quantization"),
]
FIELD_IDS = [c[0] for c in FIELD_CASES] + [c[0] for c in EXTRA_FIELDS] + [c[0] for c in RAW_CONFIGS]


def write_config(src: Path, case_id: str) -> str:
    """Apply config case `case_id` to src/config.json; returns the expected message part."""
    for cid, name, value, expect in FIELD_CASES:
        if cid == case_id:
            (src / "config.json").write_text(json.dumps({**CONFIG, name: value}))
            return expect
    for cid, changes, expect in EXTRA_FIELDS:
        if cid == case_id:
            config = {**CONFIG, **changes}
            config = {k: v for k, v in config.items() if not (k == "model_type" and v is None)}
            (src / "config.json").write_text(json.dumps(config))
            return expect
    cid, raw, expect = next(c for c in RAW_CONFIGS if c[0] == case_id)
    (src / "config.json").write_bytes(raw)
    return expect


@pytest.mark.parametrize("target", ["load", "convert"])
@pytest.mark.parametrize("case_id", FIELD_IDS)
def test_config_field(pristine, tmp_path, case_id, target):
    src = copy_to(pristine, tmp_path)
    expect = write_config(src, case_id)
    before = tree_digest(tmp_path)
    if target == "load":
        with pytest.raises(DeepSeekError) as e:
            loading.load_model(src)
        one_line(str(e.value), expect)
    else:
        assert_refused(convert(src, "-o", tmp_path / "out"), expect)
    assert tree_digest(tmp_path) == before


def test_converter_refuses_a_quantization_config_that_is_not_an_object(pristine, tmp_path):
    src = copy_to(pristine, tmp_path)
    (src / "config.json").write_text(json.dumps({**CONFIG, "quantization_config": "fp8"}))
    before = tree_digest(tmp_path)
    assert_refused(convert(src, "-o", tmp_path / "out"), "quantization_config='fp8'")
    assert tree_digest(tmp_path) == before


def test_config_with_a_byte_order_mark_loads(pristine, tmp_path):
    src = copy_to(pristine, tmp_path)
    (src / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(CONFIG).encode())
    assert len(loading.load_model(src).layers) == CONFIG["num_hidden_layers"]


# ---- sizes that would exhaust memory: refused before anything is built --------------------

HUGE = [  # (id, changes, loader's message part, converter's message part)
    ("layers-10M", {"num_hidden_layers": 10**7}, "num_hidden_layers=10000000", "=10000000"),
    ("kv_lora_rank-2**30", {"kv_lora_rank": 2**30}, "GB of cache", "has shape"),
    (
        "mtp-layers-10M",
        {"num_nextn_predict_layers": 10**7},
        "GB of cache",
        "num_nextn_predict_layers=10000000",
    ),
    ("experts-1M", {"n_routed_experts": 10**6}, "n_routed_experts=1000000", "n_routed_experts"),
]


@pytest.mark.parametrize("target", ["load", "convert"])
@pytest.mark.parametrize("name,changes,load_expect,convert_expect", HUGE, ids=[h[0] for h in HUGE])
def test_huge_config_is_refused_in_milliseconds(
    pristine, tmp_path, name, changes, load_expect, convert_expect, target
):
    src = copy_to(pristine, tmp_path)
    (src / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    before = tree_digest(tmp_path)
    start = time.perf_counter()
    if target == "load":
        with pytest.raises(DeepSeekError) as e:
            loading.load_model(src)
        message = str(e.value)
        one_line(message, load_expect)
    else:
        assert_refused(convert(src, "-o", tmp_path / "out"), convert_expect)
    assert time.perf_counter() - start < 2.0  # no model of that size was built or listed
    assert tree_digest(tmp_path) == before


def test_huge_layer_count_is_refused_even_without_the_memory_check(pristine, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DEEPSEEK_SKIP_MEMORY_CHECK", "1")
    src = copy_to(pristine, tmp_path)
    (src / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": 10**7}))
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        loading.load_model(src)
    one_line(str(e.value), "num_hidden_layers=10000000, but the weights hold layers 0..2")
    assert time.perf_counter() - start < 2.0


# ---- lm_head: never dropped silently ------------------------------------------------------


@pytest.fixture(scope="module")
def tied_but_different(tmp_path_factory) -> Path:
    """tie_word_embeddings=true, but the checkpoint's lm_head differs from its embedding."""
    path = tmp_path_factory.mktemp("tied") / "src"
    write_checkpoint(path, {**CONFIG, "tie_word_embeddings": False}, fmt="bf16")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return path


@pytest.mark.parametrize("target", ["load", "convert"])
def test_tied_config_with_a_different_lm_head_is_refused(tied_but_different, tmp_path, target):
    src = copy_to(tied_but_different, tmp_path)
    before = tree_digest(tmp_path)
    if target == "load":
        with pytest.raises(CheckpointError) as e:
            loading.load_model(src)
        message = str(e.value)
    else:
        result = convert(src, "-o", tmp_path / "out")
        assert_refused(result, "lm_head")
        message = str(result.exception)
    one_line(message, "tie_word_embeddings")
    assert "lm_head" in message and "differs" in message
    assert tree_digest(tmp_path) == before


# ---- a hub id must look like one ------------------------------------------------------------

MISTYPED = ["./my-modle", "~/models/x", "a/b/c", "/nonexistent/x", "models/x", "my model/x"]
MISTYPED += ["owner/na me", "x/../y", "owner--x/y", "owner/", "/", "owner/name.git/x"]
MISTYPED += ["x" * 5000, "owner/" + "n" * 300, "loop"]


@pytest.mark.parametrize("name", MISTYPED)
def test_a_mistyped_local_path_says_no_such_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so "models/x" is clearly a local path
    (tmp_path / "loop").symlink_to("loop")
    before = tree_digest(tmp_path)
    result = CliRunner().invoke(app, ["info", name])
    if name == "/":
        assert_refused(result, "no config.json")
    else:
        assert_refused(result, "no such folder")
        assert "Hugging Face cache" not in str(result.exception)
    assert tree_digest(tmp_path) == before


# ---- convert: SRC / DST spellings (real paths compared) -----------------------------------


@pytest.fixture
def ws(pristine, tmp_path) -> Path:
    """A workspace: src/ (the checkpoint), x/ (a folder), link -> src, file.txt."""
    ws = tmp_path / "ws"
    copy_to(pristine, ws)
    (ws / "x").mkdir()
    (ws / "link").symlink_to("src")
    (ws / "file.txt").write_text("a regular file")
    (ws / "src-config").symlink_to("src/config.json")
    return ws


SPELLINGS = [  # (id, SRC relative to ws, -o relative to ws, --force, message part)
    ("dst-x-dotdot-src", "src", "x/../src", True, "is the source checkpoint"),
    ("dst-src-dot", "src", "src/.", True, "is the source checkpoint"),
    ("dst-src-trailing-slash", "src", "src/", True, "is the source checkpoint"),
    ("dst-symlink-to-src", "src", "link", True, "is the source checkpoint"),
    ("dst-link-dotdot-src", "src", "link/../src", True, "is the source checkpoint"),
    ("src-through-symlink", "link", "src", True, "is the source checkpoint"),
    ("src-dotdot-spelling", "x/../src", "src", True, "is the source checkpoint"),
    ("dst-inside-src", "src", "src/sub", False, "lies inside the source checkpoint"),
    ("dst-deep-inside-src", "src", "src/sub/deeper", True, "lies inside the source"),
    ("dst-inside-src-via-link", "src", "link/out", True, "lies inside the source"),
    ("dst-is-a-source-file", "src", "src-config", True, "lies inside the source"),
    ("dst-contains-src", "src", ".", True, "contains the source checkpoint"),
    ("dst-contains-src-dotdot", "src", "x/..", True, "contains the source checkpoint"),
    ("dst-grandparent", "src", "..", True, "contains the source checkpoint"),
    ("dst-under-a-file", "src", "file.txt/out", False, "is a file, not a folder"),
    ("dst-deep-under-a-file", "src", "file.txt/a/b", True, "is a file, not a folder"),
    ("dst-exists-no-force", "src", "x/../file.txt", False, "already exists"),
    ("dst-root", "src", "/", True, "-o /"),
]


@pytest.mark.parametrize("name,src,dst,force,expect", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_convert_path_spellings(ws, monkeypatch, name, src, dst, force, expect):
    monkeypatch.chdir(ws)
    root = ws.parent if dst == ".." else ws
    before = tree_digest(root)
    result = convert(src, "-o", dst, *(["--force"] if force else []))
    assert_refused(result, expect)
    assert tree_digest(root) == before  # the source and everything beside it untouched


@pytest.mark.parametrize("dst", ["models--owner--tiny", "models--owner--tiny/blobs"])
def test_convert_never_replaces_the_hub_cache_it_reads(sharded, tmp_path, monkeypatch, dst):
    import huggingface_hub.constants

    hf_cache_layout(sharded, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = tree_digest(tmp_path)
    result = convert("owner/tiny", "-o", tmp_path / "hub" / dst, "--force")
    assert_refused(result, "contains the source checkpoint")
    assert tree_digest(tmp_path) == before


def readonly_folder(path: Path) -> Path:
    """A folder this process cannot create anything in: chmod 0o555, and for root (whom
    modes do not stop) the immutable attribute, else sysfs, which refuses everyone."""
    path.mkdir()
    path.chmod(0o555)
    probe = path / ".probe"
    try:
        probe.mkdir()
    except OSError:
        return path
    probe.rmdir()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return path
    if Path("/sys/kernel").is_dir():
        return Path("/sys/kernel")
    pytest.fail("cannot make a folder unwritable on this machine (not root: chmod; root: chattr)")


def test_convert_to_a_read_only_place_is_one_line(ws):
    ro = readonly_folder(ws / "ro")
    try:
        before = tree_digest(ws)
        result = convert(ws / "src", "-o", ro / "out")
        assert_refused(result, f"-o {ro / 'out'}")
        assert any(w in str(result.exception) for w in ("not writable", "cannot create"))
        assert tree_digest(ws) == before
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        if ro.is_relative_to(ws):
            ro.chmod(0o755)


def test_convert_output_is_the_only_change_and_names_no_local_path(ws):
    before = tree_digest(ws)
    result = convert(ws / "x" / ".." / "src", "-o", ws / "link" / ".." / "out")
    assert result.exit_code == 0, result.output
    assert tree_digest(ws, skip=("out",)) == before
    card = (ws / "out" / "README.md").read_text()
    assert "Converted from `src`" in card and str(ws) not in card


# ---- signals during convert ----------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """Many 100KB output shards: a conversion stopped after its first write is mid-way."""
    path = tmp_path_factory.mktemp("big") / "src"
    config = convertible_config(hidden_size=256, moe_intermediate_size=256, intermediate_size=512)
    write_checkpoint(path, config, fmt="bf16")
    return path


@pytest.fixture(scope="module")
def signal_runs(big, tmp_path_factory):
    """SIGTERM, SIGHUP and SIGINT, each sent mid-write to a conversion in one child process."""
    cases, before = [], {}
    for sig in ("SIGTERM", "SIGHUP", "SIGINT"):
        src = copy_to(big, tmp_path_factory.mktemp(sig))
        before[sig] = tree_digest(src.parent)
        cases.append({"id": sig, "src": str(src), "dst": str(src.parent / "out"), "signal": sig})
    results = run_worker("files_signal_worker.py", cases)
    return {c["id"]: (Path(c["src"]), before[c["id"]], results[c["id"]]) for c in cases}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_mid_conversion_cleans_up(signal_runs, sig):
    src, before, result = signal_runs[sig]
    assert "signal" not in result, f"the conversion died of {signal.Signals(result['signal'])}"
    assert result["progress_calls"] == 5  # stopped at once, mid-write
    if sig == "SIGINT":
        assert result["type"] == "KeyboardInterrupt"
    else:
        assert result["type"] == "Interrupted" and result["signum"] == getattr(signal, sig)
    assert tree_digest(src.parent) == before  # no DST, no staging folder, source untouched


def cli(*args: object) -> subprocess.Popen:
    """The CLI in a child process that stops itself after its first shard write."""
    code = "from mlx_deepseek.cli import main; main()"
    return popen_stopping([sys.executable, "-c", code, *map(str, args)])


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_cli_exits_128_plus_the_signal_and_cleans_up(big, tmp_path, sig):
    src = copy_to(big, tmp_path)
    before = tree_digest(tmp_path)
    proc = cli("convert", src, "-o", tmp_path / "out", "--shard-size", "100KB")
    wait_stopped_mid_write(proc, tmp_path)
    signum = getattr(signal, sig)
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {sig}" in err and "Traceback" not in err
    assert tree_digest(tmp_path) == before


@pytest.mark.slow
def test_a_conversion_killed_mid_write_is_cleaned_up_by_the_next(big, tmp_path):
    src = copy_to(big, tmp_path)
    before = tree_digest(tmp_path)
    proc = cli("convert", src, "-o", tmp_path / "out", "--shard-size", "100KB")
    wait_stopped_mid_write(proc, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    (stale,) = tmp_path.glob(".out.partial-*")
    result = convert(src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"removed {stale.name}" in result.output and not stale.exists()
    assert tree_digest(tmp_path, skip=("out",)) == before


# ---- stale staging folders: removed only when recognisably ours ---------------------------

KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from mlx_deepseek.convert.destination import Staging
stage = Staging(Path(sys.argv[1])).__enter__()
(stage.path / "model.safetensors").write_bytes(b"half")
print(stage.path.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed(ws: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(ws / "out")], capture_output=True, text=True
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    return out.stdout.strip()


def _staging(ws: Path, name: str, marker: dict | None, pid: int = 123456) -> str:
    p = ws / name.format(pid=pid)
    p.mkdir()
    (p / "model.safetensors").write_bytes(b"user data")
    if marker is not None:
        (p / ".mlx-deepseek-staging").write_text(json.dumps(marker))
    return p.name


def _marker(**changes) -> dict:
    return {"pid": 123456, "host": socket.gethostname(), "dst": "out", **changes}


def _symlinked_marker(ws: Path) -> str:
    name = _staging(ws, ".out.partial-{pid}-abcdef", None)
    (ws / name / ".mlx-deepseek-staging").symlink_to("/dev/zero")
    return name


def _symlink_to_users_folder(ws: Path) -> str:
    (ws / "mine").mkdir()
    (ws / "mine" / "notes.txt").write_text("keep")
    (ws / ".out.partial-123456-abcdef").symlink_to("mine")
    return ".out.partial-123456-abcdef"


def _file(ws: Path) -> str:
    (ws / ".out.partial-123456-abcdef").write_text("user file")
    return ".out.partial-123456-abcdef"


STALE = [  # (id, make(ws) -> name, removed?, note part or None)
    ("killed-conversion", _killed, True, "removed"),
    ("no-marker", lambda ws: _staging(ws, ".out.partial-{pid}-abcdef", None), False, "marker"),
    ("marker-to-dev-zero", _symlinked_marker, False, "marker"),
    ("symlink-to-a-user-folder", _symlink_to_users_folder, False, "not a folder"),
    ("regular-file", _file, False, "not a folder"),
    (
        "process-alive",
        lambda ws: _staging(ws, ".out.partial-{pid}-abcdef", _marker(pid=os.getpid()), os.getpid()),
        False,
        None,
    ),
    (
        "other-machine",
        lambda ws: _staging(ws, ".out.partial-{pid}-abcdef", _marker(host="elsewhere")),
        False,
        "another machine",
    ),
    (
        "marker-for-another-pid",
        lambda ws: _staging(ws, ".out.partial-{pid}-abcdef", _marker(pid=1)),
        False,
        "does not match",
    ),
    (
        "another-destination",
        lambda ws: _staging(ws, ".other.partial-{pid}-abcdef", _marker()),
        False,
        None,
    ),
    (
        "name-almost-ours",
        lambda ws: _staging(ws, ".out.partial-{pid}-abcdefg", _marker()),
        False,
        None,
    ),
]


@pytest.mark.parametrize("name,make,removed,note", STALE, ids=[s[0] for s in STALE])
def test_stale_staging_folders(pristine, tmp_path, name, make, removed, note):
    src = copy_to(pristine, tmp_path)
    stale = make(tmp_path)
    before = tree_digest(tmp_path)
    result = convert(src, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    after = tree_digest(tmp_path, skip=("out",))
    if removed:
        before = {k: v for k, v in before.items() if k.split(os.sep)[0] != stale}
        assert not (tmp_path / stale).exists()
    assert after == before  # only DST added, only our own stale folder gone
    text = "".join(result.output.split())  # rich wraps long lines, even mid-word
    if note is None:
        assert stale not in text, result.output
    else:
        assert stale in text and "".join(note.split()) in text, result.output
