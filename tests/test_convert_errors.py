"""Bad input to `mlx-deepseek convert`: one clear error, non-zero exit, nothing left behind."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx_deepseek.convert.pipeline as pipeline
import numpy as np
import pytest
from mlx_deepseek.convert.synthetic import source_shapes, write_checkpoint
from stopping import popen_stopping, wait_stopped_mid_write
from typer.testing import CliRunner

from mlx_deepseek.cli import app
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.models.tiny import convertible_config

FP8 = dict(fmt="fp8", shards=3, block=(32, 48), scales_elsewhere=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "src"
    write_checkpoint(path, convertible_config("deepseek_v3"), **FP8)
    return path


@pytest.fixture
def src(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "src")
    return tmp_path / "src"


def run(*args) -> object:
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def leftovers(dst: Path) -> list[Path]:
    return list(dst.parent.glob(f".{dst.name}.*"))


def assert_clean_failure(result, dst: Path, match: str, exc_type=DeepSeekError) -> str:
    assert result.exit_code != 0
    assert isinstance(result.exception, exc_type), repr(result.exception)
    message = str(result.exception)
    assert match in message, message
    assert "\n" not in message
    assert not dst.exists() and not leftovers(dst)
    return message


def shard_of(src: Path, tensor: str) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"][tensor]


def test_missing_shard(src, tmp_path):
    (src / "model-00002-of-00003.safetensors").unlink()
    msg = assert_clean_failure(run(src, "-o", tmp_path / "out"), tmp_path / "out", "is missing")
    assert "model-00002-of-00003.safetensors" in msg and "re-download" in msg


def test_truncated_shard(src, tmp_path):
    f = src / "model-00003-of-00003.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    msg = assert_clean_failure(run(src, "-o", tmp_path / "out"), tmp_path / "out", "is truncated")
    assert f.name in msg


def test_missing_expert_tensor(tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    write_checkpoint(tmp_path / "src", convertible_config(), keep=lambda n: n != name, **FP8)
    msg = assert_clean_failure(
        run(tmp_path / "src", "-o", tmp_path / "out"), tmp_path / "out", name
    )
    assert "missing" in msg


def test_missing_scale_inv_in_the_index(src, tmp_path):
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"
    del index["weight_map"][name]
    index_file.write_text(json.dumps(index))
    assert_clean_failure(run(src, "-o", tmp_path / "out"), tmp_path / "out", f"{name} is missing")


def test_misshaped_tensor(tmp_path):
    config = convertible_config()
    rng = np.random.default_rng(0)
    weights = {
        k: rng.standard_normal(s).astype(np.float32) for k, s in source_shapes(config).items()
    }
    name = "model.layers.1.self_attn.o_proj.weight"
    weights[name] = weights[name][:, :-8]
    write_checkpoint(tmp_path / "src", config, weights, fmt="bf16")
    msg = assert_clean_failure(
        run(tmp_path / "src", "-o", tmp_path / "out"), tmp_path / "out", name
    )
    assert "[64, 120]" in msg and "[64, 128]" in msg


def test_unknown_dtype(src, tmp_path):
    f = shard_of(src, "model.layers.0.mlp.up_proj.weight")
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b'"F8_E4M3"', b'"F8_E5M2"', 1)  # same length
    f.write_bytes(bytes(data[:8]) + bytes(header) + bytes(data[8 + n :]))
    msg = assert_clean_failure(run(src, "-o", tmp_path / "out"), tmp_path / "out", "F8_E5M2")
    assert "cannot read" in msg


def test_existing_destination_needs_force(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    result = run(src, "-o", dst)
    assert result.exit_code != 0 and "--force" in str(result.exception)
    assert (dst / "precious.txt").read_text() == "keep me" and not leftovers(dst)
    assert run(src, "-o", dst, "--force").exit_code == 0
    assert not (dst / "precious.txt").exists() and (dst / "config.json").exists()
    assert not leftovers(dst)


def test_force_never_replaces_the_source(src):
    result = run(src, "-o", src.parent, "--force")
    assert result.exit_code != 0 and "source checkpoint" in str(result.exception)
    assert (src / "config.json").exists()


def test_disk_full_mid_write(src, tmp_path, monkeypatch):
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    msg = assert_clean_failure(run(src, "-o", tmp_path / "out"), tmp_path / "out", "disk full")
    assert len(calls) == 20 and "free some space" in msg


def test_not_enough_space_is_caught_before_writing(src, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    assert_clean_failure(run(src, "-o", tmp_path / "out"), tmp_path / "out", "GB free")


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_or_ctrl_c_mid_conversion_leaves_nothing(src, tmp_path, monkeypatch, exc):
    real, calls = pipeline.dequantize_fp8, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 30:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "dequantize_fp8", failing)
    dst = tmp_path / "out"
    result = run(src, "-o", dst)
    assert result.exit_code != 0 and len(calls) == 30
    if isinstance(exc, RuntimeError):
        assert result.exception is exc
    assert not dst.exists() and not leftovers(dst)


def test_already_converted_source(src, tmp_path):
    assert run(src, "-o", tmp_path / "once").exit_code == 0
    assert_clean_failure(
        run(tmp_path / "once", "-o", tmp_path / "twice"), tmp_path / "twice", "already converted"
    )


def test_unsupported_quantization_method(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    assert_clean_failure(run(src, "-o", tmp_path / "out"), tmp_path / "out", "quant_method='gptq'")


def test_unsupported_model_type(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    assert_clean_failure(run(src, "-o", tmp_path / "out"), tmp_path / "out", "model_type='llama'")


@pytest.mark.parametrize(
    "option,match",
    [
        (["--bits", "7"], "--bits 7 is not supported"),
        (["--group-size", "48"], "--group-size 48 is not supported"),
        (["--shard-size", "5XB"], "--shard-size '5XB'"),
    ],
)
def test_bad_options(src, tmp_path, option, match):
    assert_clean_failure(run(src, "-o", tmp_path / "out", *option), tmp_path / "out", match)


def test_bad_dtype_is_a_usage_error(src, tmp_path):
    result = run(src, "-o", tmp_path / "out", "--dtype", "float8")
    assert result.exit_code == 2 and "float8" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path):
    assert_clean_failure(
        run(tmp_path / "nope", "-o", tmp_path / "out"), tmp_path / "out", "no such folder"
    )


KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from mlx_deepseek.convert.destination import Staging
stage = Staging(Path(sys.argv[1])).__enter__()
(stage.path / "model.safetensors").write_bytes(b"half")
print(stage.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stale_staging_folder_of_a_killed_run_is_removed(src, tmp_path):
    dst = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(dst)], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL
    stale = Path(killed.stdout.strip())
    assert stale.is_dir() and stale.name.startswith(".out.partial-")
    # named like ours, but made by the user (no marker): never removed, only reported
    theirs = tmp_path / ".out.partial-1-abcdef"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    result = run(src, "-o", dst)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and (theirs / "notes.txt").read_text() == "mine"
    assert f"removed {stale.name}" in result.output
    assert f"left {theirs} alone" in result.output.replace("\n", "")


def test_upload_goes_through_huggingface_hub(src, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id))

        def upload_large_folder(self, folder_path, repo_id, repo_type):
            calls.append(("upload", repo_id, Path(folder_path).name, repo_type))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = run(src, "-o", tmp_path / "out", "--upload-repo", "me/tiny-mlx")
    assert result.exit_code == 0, result.output
    assert calls == [("create", "me/tiny-mlx"), ("upload", "me/tiny-mlx", "out", "model")]
    assert "mlx" in (tmp_path / "out/README.md").read_text()


def console_script() -> str:
    return shutil.which("mlx-deepseek") or pytest.fail("mlx-deepseek console script not installed")


def test_console_script_prints_one_line(tmp_path):
    bad = subprocess.run(
        [console_script(), "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert "no such folder" in bad.stderr


@pytest.mark.slow
def test_ctrl_c_in_the_console_script_exits_130_and_cleans_up(tmp_path):
    # several output shards: the conversion stops itself after its first write, mid-way
    big = convertible_config(
        hidden_size=512, moe_intermediate_size=512, intermediate_size=1024, vocab_size=4096
    )
    write_checkpoint(tmp_path / "big", big, fmt="bf16")
    dst = tmp_path / "out"
    proc = popen_stopping(
        [console_script(), "convert", str(tmp_path / "big"), "-o", str(dst), "--shard-size", "1MB"]
    )
    wait_stopped_mid_write(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not dst.exists() and not leftovers(dst)
