"""`mlx-deepseek bench` on a DeepSeek V4 shape: the tiny V4 model end to end (release-layout
source, converted by mlx-deepseek, measured alone), its cache filled to a context without a
prefill, the bytes a decode step reads, the KV comparison with V3, the options it refuses."""

import mlx.core as mx
import numpy as np
import pytest
from bench_support import quick, run_bench
from typer.testing import CliRunner

from mlx_deepseek.bench import v4
from mlx_deepseek.bench.metrics import weight_bytes_per_token
from mlx_deepseek.bench.models import SHAPES, prepare
from mlx_deepseek.bench.runtimes import cache_read_bytes, filled_cache, load_ours, rewind
from mlx_deepseek.cli import app
from mlx_deepseek.models.deepseek_v4 import Model
from mlx_deepseek.models.tiny import tiny_v4_config
from mlx_deepseek.models.v4_config import ModelArgs

CONTEXTS = [24, 200]  # 200: past the window (8), several ratio-16 rows, more rows than top-4
BUFFERS = ("window", "compressed", "comp_state", "indexer", "index_state")


@pytest.fixture(scope="module")
def bench_v4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-v4")
    run, result = run_bench(quick("tiny-v4", CONTEXTS, 4), tmp / "result.json", tmp / "cache")
    assert "mlx-lm has no deepseek_v4 model" in run.output
    assert "V4-Flash 6,880 B (3,440 values" in run.output
    return result, tmp / "cache", run.output


def test_v4_entry_is_measured_alone_with_its_targets(bench_v4):
    result, _, output = bench_v4
    (entry,) = result["models"]
    assert entry["name"] == "tiny-v4" and entry["model_type"] == "deepseek_v4"
    assert set(entry["runtimes"]) == {"mlx-deepseek"}
    assert entry["config"]["compress_ratios"] == [0, 4, 16]
    r = entry["runtimes"]["mlx-deepseek"]
    tok_s = {c: r["decode_tok_s"][str(c)]["median"] for c in CONTEXTS}
    assert all(v > 0 for v in tok_s.values())
    flat = entry["ratios"]["decode_vs_shortest"]
    assert flat["24"] == 1.0 and flat["200"] == pytest.approx(tok_s[200] / tok_s[24])
    (target,) = entry["targets"]
    assert target["name"] == "decode at 200 vs 24" and target["goal"] == ">= 0.8"
    assert target["met"] == (flat["200"] >= 0.8)
    assert "decode at 200 / at the shortest context" in output
    for c in map(str, CONTEXTS):
        # a decode step reads the window, top-k and indexer rows: less than the cache holds
        assert 0 < r["cache_read_bytes"][c] <= r["cache_bytes"][c]
        w = r["weight_bytes_per_token"]["total"]
        assert r["bytes_read_per_token"][c] == w + r["cache_read_bytes"][c]
    assert r["cache_read_bytes"]["200"] < r["cache_bytes"]["200"]
    counts = r["primitives_per_token"]
    assert 0 < counts["metal_equivalent"]["total"] < counts["this_backend"]["total"]
    # the routed experts are mxfp4: the fused MoE kernels stand in on the Metal-equivalent side
    fused = counts["metal_equivalent"]["by_primitive"]
    assert any(k.startswith("Fused") and "moe" in k for k in fused), fused


def test_kv_comparison_with_v3(bench_v4):
    result, _, _ = bench_v4
    kv = result["models"][0]["kv_comparison"]
    # families-2026.md: V4-Flash ~3,440 values per token in all layers, V3 61 x 576 = 35,136
    assert kv["v4_flash_values_per_token"] == 21 * (512 // 4 + 128 // 4) + 20 * (512 // 128)
    assert kv["v3_values_per_token"] == 61 * 576
    assert kv["v3_bytes_per_token"] == 2 * 61 * 576
    assert kv["v3_over_v4"] == pytest.approx(35136 / 3440)
    assert kv["v4_flash_window_bytes"] == 43 * 128 * 512 * 2
    # tiny-v4: a ratio-4 sparse layer (64-d rows + 32-d indexer rows), a ratio-16 layer
    assert kv["synthetic_values_per_token"] == round(64 / 4 + 32 / 4 + 64 / 16)


def _real_and_filled(cache_dir, context):
    shape = SHAPES["tiny-v4"]()
    rt = load_ours(prepare(shape, cache_dir, log=lambda m: None).ours, mx.float32)
    real = rt.model.make_cache()
    tokens = mx.random.randint(0, 512, (1, context), key=mx.random.key(3))
    mx.eval(rt.model(tokens, real))
    return rt, real, filled_cache(rt, context, room=4)


@pytest.mark.parametrize("context", [9, 40, 131])
def test_filled_cache_holds_what_a_prefill_leaves(bench_v4, context):
    """Every buffer of the random fill spans the positions / rows a real prefill keeps, at
    the same widths and dtype, so a decode step reads the same amount."""
    _, cache_dir, _ = bench_v4
    rt, real, filled = _real_and_filled(cache_dir, context)
    for a, b in zip(real, filled, strict=True):
        assert a.offset == b.offset == context
        for name in BUFFERS:
            x, y = getattr(a, name), getattr(b, name)
            if x is None:
                assert y is None
                continue
            if x.buf is None:  # no row yet (context 9 < ratio 16): the fill holds none either
                assert x.end == y.end == 0
                continue
            assert (x.end, x.buf.shape[2], x.buf.dtype) == (y.end, y.buf.shape[2], y.buf.dtype)
            assert y.start <= max(x.start, x.keep_from), name  # holds at least what is read
    assert cache_read_bytes(rt, filled) == cache_read_bytes(rt, real)


def test_filled_cache_decodes_and_rewinds_exactly(bench_v4):
    _, cache_dir, _ = bench_v4
    rt, _, cache = _real_and_filled(cache_dir, 131)
    tok = mx.array([[5]])
    first = rt.model(tok, cache)
    mx.eval(first)
    for t in (7, 9, 11):  # a few more steps, then back
        mx.eval(rt.model(mx.array([[t]]), cache))
    rewind(cache, 131)
    again = rt.model(tok, cache)
    np.testing.assert_array_equal(np.array(first), np.array(again))
    assert all(c.offset == 132 for c in cache)


def test_read_bytes_by_layer_kind():
    """A compressed sparse layer reads top-k compressed rows and every indexer row, a heavily
    compressed layer all its rows, every layer at most a window of positions."""
    config = tiny_v4_config([0, 4, 16])
    model = Model(ModelArgs.from_dict(config))
    widths = v4.buffer_widths(model)
    f32 = 4
    for context in (5, 64, 400):
        cache = v4.fill(model, widths, context, room=2, key=mx.random.key(0))
        window = min(context, 8) * 64 * f32
        state = {  # the open windows' compressor state: (kv + gate) rows per position
            c.ratio: (context - c._state_floor(context)) for c in cache if c.ratio
        }
        sparse = (
            min(context // 4, 4) * 64 * f32
            + (context // 4) * 32 * f32
            + state[4] * (widths[1]["comp_state"][0] + widths[1]["index_state"][0]) * f32
        )
        heavy = (context // 16) * 64 * f32 + state[16] * widths[2]["comp_state"][0] * f32
        assert v4.read_bytes(cache, topk=4) == 3 * window + sparse + heavy


def test_weights_read_per_token_count_v4_parts():
    config = tiny_v4_config([0, 4])
    model = Model(ModelArgs.from_dict(config))
    parts = weight_bytes_per_token(model, config)
    attn = sum(v.nbytes for layer in model.layers for _, v in _flat(layer.attn))
    assert parts["attention"] == attn
    experts = sum(v.nbytes for layer in model.layers for _, v in _flat(layer.ffn.switch_mlp))
    assert parts["routed_experts"] == experts * 2 // 4  # top-2 of 4
    table = model.layers[0].ffn.gate.tid2eid  # the hash layer's: one row per token
    gates = sum(v.nbytes for layer in model.layers for k, v in _flat(layer.ffn.gate))
    assert parts["router"] == gates - table.nbytes + table.nbytes // table.shape[0]


def _flat(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


@pytest.mark.parametrize(
    "args, text",
    [
        (["--decode-tokens", "17"], "--decode-tokens 17: a V4 shape (tiny-v4) decodes at most 16"),
        (["--profile"], "--profile does not take a V4 shape (tiny-v4)"),
        (["--kernels"], "--kernels does not take a V4 shape (tiny-v4)"),
    ],
)
def test_v4_options_refused_in_one_line(args, text, tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "--shape", "tiny-v4", "--cache-dir", str(tmp_path), *args]
    )
    assert result.exit_code != 0 and text in str(result.exception)
    assert not any(tmp_path.iterdir())  # refused before writing a checkpoint
