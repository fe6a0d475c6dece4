"""demo_train/average.py: the mean of two training runs of one model, and its refusals."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_deepseek.demo_train.average import average, main
from mlx_deepseek.errors import DeepSeekError


def _run(path, seed, table=(0, 1, 2), config=None):
    """A train.py-like output folder: a config, a tokenizer, two shards (floats and the
    integer hash-routing table), a checkpoint folder and a training log."""
    rng = np.random.default_rng(seed)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config or {"model_type": "deepseek_v4"}))
    (path / "tokenizer.json").write_text('{"tok": 1}')
    (path / "training_log.json").write_text("{}")
    (path / "checkpoint").mkdir()
    w = {"a.weight": mx.array(rng.standard_normal((3, 4)).astype(np.float32))}
    w["b.tid2eid"] = mx.array(np.array(table, dtype=np.int32))
    mx.save_safetensors(str(path / "model-00001-of-00002.safetensors"), w)
    h = {"c.weight": mx.array(rng.standard_normal(5).astype(np.float16))}
    mx.save_safetensors(str(path / "model-00002-of-00002.safetensors"), h)
    return path


def test_average_mixes_floats_keeps_the_rest_and_writes_the_run_layout(tmp_path):
    a, b = _run(tmp_path / "a", 1), _run(tmp_path / "b", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")  # an earlier output is replaced whole
    average(a, b, out, 0.25)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        xa, xb, xo = (mx.load(str(p / shard)) for p in (a, b, out))
        for k in xo:
            if k.endswith("tid2eid"):
                assert mx.array_equal(xo[k], xa[k]).item() and xo[k].dtype == mx.int32
            else:
                want = 0.25 * np.array(xa[k], np.float32) + 0.75 * np.array(xb[k], np.float32)
                assert xo[k].dtype == xa[k].dtype
                np.testing.assert_allclose(np.array(xo[k], np.float32), want, atol=1e-3)
                assert not np.allclose(np.array(xo[k]), np.array(xa[k]))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "average.json"} <= names
    assert not {"checkpoint", "training_log.json", "stale.txt"} & names
    assert json.loads((out / "average.json").read_text())["weight"] == 0.25


def test_average_refuses_runs_of_other_models_and_writes_nothing(tmp_path, capsys):
    a = _run(tmp_path / "a", 1)
    other_config = _run(tmp_path / "b", 2, config={"model_type": "deepseek_v3"})
    other_table = _run(tmp_path / "c", 3, table=(2, 1, 0))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="different configs"):
        average(a, other_config, out)
    with pytest.raises(ValueError, match="tid2eid"):
        average(a, other_table, out)
    with pytest.raises(ValueError, match="between 0 and 1"):
        average(a, a, out, 1.5)
    with pytest.raises(DeepSeekError, match="inside"):
        average(a, a, a / "mean")  # never written into a run it reads
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main([str(a), str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing" in err and len(err.splitlines()) == 1
    assert main([str(a), str(a), "--out", str(out)]) == 0 and out.is_dir()
