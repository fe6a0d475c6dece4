"""`mlx-deepseek bench`: a tiny end-to-end run, the primitive counter, the bytes it reports."""

import json
import statistics

import mlx.core as mx
import mlx.nn as nn
import pytest
from bench_support import quick, run_bench
from typer.testing import CliRunner

from mlx_deepseek.bench import counting
from mlx_deepseek.bench.metrics import weight_bytes_per_token
from mlx_deepseek.bench.models import SHAPES, prepare
from mlx_deepseek.bench.runtimes import (
    cache_bytes_per_token,
    filled_cache,
    load_mlx_lm,
    load_ours,
)
from mlx_deepseek.cli import app

CONTEXTS = [16, 300]  # 300 crosses mlx-lm's 256-token cache step


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """One CLI run on the tiny V2 model (its expanded mlx-lm cache differs from our latent)."""
    tmp = tmp_path_factory.mktemp("bench")
    args = [*quick("tiny-v2", CONTEXTS, 8), "--note", "test run"]
    run, result = run_bench(args, tmp / "result.json", tmp / "cache")
    assert "decode tok/s at 300" in run.output
    return result, tmp / "cache"


RUNTIMES = ("mlx-deepseek", "mlx-lm")
RUNTIME_FIELDS = {
    "checkpoint",
    "notes",
    "weights_bytes",
    "weight_bytes_per_token",
    "prefill_tok_s",
    "decode_tok_s",
    "peak_memory_bytes",
    "cache_bytes",
    "kv_bytes_per_token",
    "primitives_per_token",
    "effective_gbps",
    "bandwidth_fraction",
    "bytes_read_per_token",
}


def test_bench_json_has_every_field(bench_json):
    result, _ = bench_json
    top = {"schema_version", "created", "seconds", "machine", "settings", "bandwidth", "models"}
    assert top <= set(result)
    assert result["settings"]["note"] == "test run"
    assert "random" in result["settings"]["cache_fill"]
    assert "export_to_dot" in result["settings"]["primitive_counting"]
    assert "one node" in result["settings"]["kernel_counting"]
    assert result["settings"]["repeats"] == 2 and result["settings"]["prompt_tokens"] == 8
    assert result["bandwidth"]["read_gbps"] > 0
    assert len(result["bandwidth"]["measurements"]) == 2
    (entry,) = result["models"]
    assert entry["name"] == "tiny-v2" and entry["model_type"] == "deepseek_v2"
    assert entry["checkpoints"]["quantized_by"]["mlx-deepseek"] == "mlx-deepseek convert"
    assert entry["agreement"]["last_logits_max_rel_diff"] < 0.05  # same weights, same maths
    assert set(entry["runtimes"]) == set(RUNTIMES)
    for name, r in entry["runtimes"].items():
        assert RUNTIME_FIELDS <= set(r), (name, RUNTIME_FIELDS - set(r))
        assert r["prefill_tok_s"]["median"] > 0 and len(r["prefill_tok_s"]["samples"]) == 2
        for ctx in map(str, CONTEXTS):
            s = r["decode_tok_s"][ctx]
            assert s["min"] <= s["median"] <= s["max"] and len(s["samples"]) == 2
            assert r["peak_memory_bytes"]["decode"][ctx] >= r["weights_bytes"]
            assert r["bytes_read_per_token"][ctx] == (
                r["weight_bytes_per_token"]["total"] + r["cache_bytes"][ctx]
            )
            assert (
                0
                < r["bandwidth_fraction"][ctx]
                == pytest.approx(r["effective_gbps"][ctx] / result["bandwidth"]["read_gbps"])
            )
        assert r["peak_memory_bytes"]["prefill"] >= r["weights_bytes"]
        counts = r["primitives_per_token"]
        # the CPU expands fast ops that Metal fuses: the Metal-equivalent graph is smaller
        assert 0 < counts["metal_equivalent"]["total"] < counts["this_backend"]["total"]
        # mlx-lm's norms are MLX's fused RMSNorm; ours are in the custom kernels (stood in by
        # one placeholder each where there is no Metal)
        fused = "FusedRMSNorm" if name == "mlx-lm" else "Fusedadd_rms_norm"
        assert counts["metal_equivalent"]["by_primitive"][fused] > 0
    ratios = entry["ratios"]
    assert set(ratios["decode"]) == set(map(str, CONTEXTS))
    ours, lm = (entry["runtimes"][n]["decode_tok_s"]["16"]["samples"] for n in RUNTIMES)
    assert ratios["decode"]["16"] == pytest.approx(
        statistics.median(a / b for a, b in zip(ours, lm, strict=True))
    )
    assert {"prefill", "kv_bytes_per_token", "primitives_per_token"} <= set(ratios)
    names = {t["name"] for t in entry["targets"]}
    assert {"decode at 16", "KV bytes per token"} <= names


@pytest.mark.slow
def test_every_mode_is_measured_for_both_runtimes(tmp_path):
    """Decode after a random cache fill, after a real prefill, and in a child process that
    imported mlx.core first; a ratio and a target for each mode and context."""
    import sys

    args = [*quick("tiny-v2", CONTEXTS, 0), "--modes", "cache,prefill,mlx-first"]
    run, result = run_bench(args, tmp_path / "result.json", tmp_path / "cache")
    assert "decode tok/s at 300 (mlx-first)" in run.output
    (entry,) = result["models"]
    for r in entry["runtimes"].values():
        by_mode = r["decode_tok_s_by_mode"]
        assert set(by_mode) == {"cache", "prefill", "mlx-first"}
        assert by_mode["cache"] == r["decode_tok_s"]
        for mode in by_mode.values():
            assert set(mode) == set(map(str, CONTEXTS))
            assert all(s["median"] > 0 and len(s["samples"]) == 2 for s in mode.values())
    ratios = entry["ratios"]["decode_by_mode"]
    ours, lm = (entry["runtimes"][n]["decode_tok_s_by_mode"]["prefill"] for n in RUNTIMES)
    assert ratios["prefill"]["300"] == pytest.approx(
        statistics.median(
            a / b for a, b in zip(ours["300"]["samples"], lm["300"]["samples"], strict=True)
        )
    )
    names = {t["name"] for t in entry["targets"]}
    for mode in ("prefill", "mlx-first"):
        assert {f"decode at {c} ({mode})" for c in CONTEXTS} <= names
    if sys.platform.startswith("linux"):  # the child re-pointed MLX's BLAS to OpenBLAS
        assert entry["mlx_first_blas"] == "openblas"
    assert set(result["settings"]["modes"]) == {"cache", "prefill", "mlx-first"}


def test_check_fails_on_a_ratio_below_its_target(bench_json):
    import copy

    from mlx_deepseek.bench.harness import derive, missed_targets

    result, _ = bench_json
    slow = copy.deepcopy(result)
    (entry,) = slow["models"]
    ours = entry["runtimes"]["mlx-deepseek"]
    lm = entry["runtimes"]["mlx-lm"]
    for r in (ours, lm):  # a prefill mode as measured: the cache mode's numbers
        r["decode_tok_s_by_mode"]["prefill"] = copy.deepcopy(r["decode_tok_s"])
    for mode in ours["decode_tok_s_by_mode"].values():  # ours at half mlx-lm's speed
        for ctx in mode:
            lm_samples = lm["decode_tok_s_by_mode"]["cache"][ctx]["samples"]
            mode[ctx]["samples"] = [0.5 * s for s in lm_samples]
    ours["decode_tok_s"] = ours["decode_tok_s_by_mode"]["cache"]
    ours["prefill_tok_s"]["samples"] = list(lm["prefill_tok_s"]["samples"])  # 1x: below 10x
    ours["peak_memory_bytes"]["prefill"] = 2 * lm["peak_memory_bytes"]["prefill"]
    derive(entry, slow["bandwidth"]["read_gbps"], prompt_tokens=512)
    missed = " ".join(missed_targets(slow))
    for ctx in CONTEXTS:
        assert f"decode at {ctx} 0.50x" in missed
        assert f"decode at {ctx} (prefill)" in missed
    assert "prefill speed 1.00x (goal >= 10)" in missed
    assert "prefill peak memory 2.00x (goal <= 1.1)" in missed
    fast = copy.deepcopy(slow)
    (entry,) = fast["models"]
    for mode in entry["runtimes"]["mlx-deepseek"]["decode_tok_s_by_mode"].values():
        for ctx in mode:
            mode[ctx]["samples"] = [4 * s for s in mode[ctx]["samples"]]  # 2x mlx-lm's
    entry["runtimes"]["mlx-deepseek"]["prefill_tok_s"]["samples"] = [
        20 * s for s in entry["runtimes"]["mlx-lm"]["prefill_tok_s"]["samples"]
    ]
    entry["runtimes"]["mlx-deepseek"]["peak_memory_bytes"]["prefill"] = entry["runtimes"]["mlx-lm"][
        "peak_memory_bytes"
    ]["prefill"]
    derive(entry, fast["bandwidth"]["read_gbps"], prompt_tokens=512)
    assert not [m for m in missed_targets(fast) if "decode at" in m or "prefill" in m]
    # the prefill targets only hold for a real prompt (the CPU's default is 8 tokens)
    derive(entry, fast["bandwidth"]["read_gbps"], prompt_tokens=8)
    names = {t["name"] for t in entry["targets"]}
    assert "decode at 16 (prefill)" in names
    assert not names & {"prefill speed", "prefill peak memory"}


def test_mtp_rows_measure_plain_and_drafted_decoding(bench_json):
    """On a model with an MTP layer: identical greedy output; perfect drafts are all
    accepted (two tokens per step with one draft)."""
    from mlx_deepseek.bench import modes

    _, cache_dir = bench_json
    ckpt = prepare(SHAPES["tiny-v3"](), cache_dir, log=lambda m: None)
    rt = load_ours(ckpt.ours, mx.float32)
    assert rt.model.mtp
    for draft_tokens in (1, 2):
        r = modes.measure_mtp(rt, tokens=9, repeats=1, draft_tokens=draft_tokens, log=print)
        assert r["identical_to_plain"] and r["decode_tokens"] == 9
        assert r["perfect"]["acceptance"] == 1.0
        # 8 tokens after the first: full rounds of draft_tokens + 1, the last cut short
        assert r["perfect"]["tokens_per_step"] > draft_tokens
        assert 0.0 <= r["own"]["acceptance"] <= 1.0
        for kind in ("own", "perfect"):
            assert r[kind]["tok_s"]["median"] > 0 and r[kind]["speedup"] > 0
    assert not hasattr(rt.model, "__dict__") or "mtp_logits" not in vars(rt.model)


def test_kv_bytes_per_token_equal_the_formula(bench_json):
    result, _ = bench_json
    (entry,) = result["models"]
    c = SHAPES["tiny-v2"]().config
    layers, f32 = c["num_hidden_layers"], 4  # the CPU default compute dtype is float32
    latent = layers * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * f32
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    expanded = layers * c["num_attention_heads"] * (qk + c["v_head_dim"]) * f32
    ours, lm = entry["runtimes"]["mlx-deepseek"], entry["runtimes"]["mlx-lm"]
    assert ours["kv_bytes_per_token"] == latent
    assert lm["kv_bytes_per_token"] == expanded
    assert entry["ratios"]["kv_bytes_per_token"] == pytest.approx(latent / expanded)
    for ctx in CONTEXTS:
        assert ours["cache_bytes"][str(ctx)] == latent * ctx


def test_filled_cache_and_weights_read_per_token(bench_json):
    _, cache_dir = bench_json
    shape = SHAPES["tiny-v3"]()
    ckpt = prepare(shape, cache_dir, log=lambda m: None)
    c = shape.config
    for rt in (load_ours(ckpt.ours, mx.float32), load_mlx_lm(ckpt.mlx_lm, mx.float32)):
        cache = filled_cache(rt, 40, room=3)
        assert all(x.offset == 40 and x.keys.shape[2] == 256 for x in cache)
        # V3 in mlx-lm caches the latent too
        assert cache_bytes_per_token(cache) == 2 * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 4
        parts = weight_bytes_per_token(rt.model, c)
        routed = sum(
            v.nbytes
            for layer in rt.model.layers[1:]
            for v in (
                layer.mlp.switch_mlp.gate_proj.weight,
                layer.mlp.switch_mlp.gate_proj.scales,
                layer.mlp.switch_mlp.gate_proj.biases,
            )
        )
        # gate, up and down hold the same bytes; top-2 of 8 experts are read
        assert parts["routed_experts"] == 3 * routed * 2 // 8
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_chart_or_a_clear_error(bench_json, tmp_path):
    import importlib.util

    from mlx_deepseek.bench.report import write_chart
    from mlx_deepseek.errors import DeepSeekError

    result, _ = bench_json
    png = tmp_path / "chart.png"
    if importlib.util.find_spec("matplotlib") is None:  # the optional `plot` extra
        with pytest.raises(DeepSeekError, match="mlx-deepseek\\[plot\\]"):
            write_chart(result, png)
        assert not png.exists()
    else:
        write_chart(result, png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _leaf(shape):
    a = mx.ones(shape)
    mx.eval(a)
    return a


def test_counter_counts_a_known_graph():
    x, w = _leaf((4, 8)), _leaf((8, 8))
    y = mx.exp(x @ w)  # Matmul, Exp
    y = y.reshape(8, 4).T + 1.0  # Reshape, Transpose, Broadcast: views; Add
    fused = mx.compile(lambda a: mx.sin(a) * 2.0 + 1.0)(y)  # one Compiled node
    count = counting.count_primitives([fused.sum()])  # Sum
    assert count.by_name.pop(next(n for n in count.by_name if n.startswith("Compiled"))) == 1
    assert count.by_name == {"Matmul": 1, "Exp": 1, "Add": 1, "Sum": 1}
    assert count.total == 5
    assert count.views >= 3


def test_metal_equivalent_counting_fuses_what_metal_fuses():
    norm = nn.RMSNorm(64)
    mx.eval(norm.parameters())  # an unevaluated weight would count as a `Full` node
    x = _leaf((1, 4, 1, 64))
    k, v = _leaf((1, 4, 32, 64)), _leaf((1, 4, 32, 64))

    def step():
        q = mx.fast.rope(norm(x), 64, traditional=True, base=1e4, scale=1.0, offset=3)
        return [mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1)]

    cpu = counting.count_step(step, metal_equivalent=False)
    metal = counting.count_step(step, metal_equivalent=True)
    assert metal.by_name == {"FusedRMSNorm": 1, "FusedRoPE": 1, "FusedSDPA": 1}
    assert cpu.total > 10 and "FusedSDPA" not in cpu.by_name
    # the patches are undone: a real call evaluates to real numbers again
    assert mx.fast.rms_norm(x, None, 1e-6).sum().item() == pytest.approx(4 * 64)

    # head dim 512 (MLA's absorbed decode) has no fused Metal kernel in MLX 0.32: expanded
    q512, kv512 = _leaf((1, 16, 1, 512)), _leaf((1, 1, 64, 512))
    assert not counting.metal_sdpa_fused(q512, kv512, kv512, None)
    big = counting.count_step(
        lambda: [mx.fast.scaled_dot_product_attention(q512, kv512, kv512, scale=0.1)]
    )
    assert "FusedSDPA" not in big.by_name and big.by_name["Matmul"] == 2
    # mlx-lm's expanded V2 decode (192/128) has one
    assert counting.metal_sdpa_fused(_leaf((1, 16, 1, 192)), k, _leaf((1, 16, 32, 128)), None)


def test_placeholder_outside_counting_is_refused():
    with pytest.raises(RuntimeError, match="counting"):
        counting.placeholder("X", (2,), mx.float32, [])


def test_bad_options_give_one_line_errors(tmp_path):
    runner = CliRunner()
    for args, text in [
        (["--shape", "v9"], "choose from"),
        (["--contexts", "128,x"], "positive integers"),
        (["--model", str(tmp_path / "nope")], "no such folder"),
        (["--modes", "cache,warm"], "choose from cache, prefill, mlx-first"),
        (["--mtp-draft-tokens", "9"], "give 0 (none) to 8"),
    ]:
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code != 0 and text in str(result.exception), args


# ---- bench --kernels -------------------------------------------------------------------------


def _kernel_bench(cache_dir, tmp_path) -> tuple[object, dict]:
    args = ["--kernels", "--shape", "tiny-v3", "--contexts", "16", "--group-size", "32"]
    args += ["--decode-tokens", "1", "--repeats", "1"]
    return run_bench(args, tmp_path / "kernels.json", cache_dir)


def _check_kernel_result(data: dict, modes: list[str]) -> None:
    assert data["kind"] == "kernels" and data["settings"]["modes"] == modes
    (entry,) = data["models"]
    assert entry["name"] == "tiny-v3" and len(entry["layer_weight_bytes"]) == 2
    for mode in modes:
        r = entry["modes"][mode]
        tok_s = r["decode_tok_s"]["16"]["median"]
        assert r["weights_gbps"]["16"] == pytest.approx(
            entry["weight_bytes_per_token"] * tok_s / 1e9
        )
        assert r["effective_gbps"]["16"] > r["weights_gbps"]["16"] > 0  # + the KV cache
        dense, moe = r["layers"]["16"]
        assert (dense["kind"], moe["kind"]) == ("dense", "moe")
        for layer, nbytes in zip((dense, moe), entry["layer_weight_bytes"], strict=True):
            for part in ("attention", "mlp"):
                seconds = layer[f"{part}_ms"] / 1e3
                assert layer[f"{part}_gbps"] == pytest.approx(nbytes[part] / seconds / 1e9)
    # the MoE layer reads top-2 of its 8 experts
    assert entry["layer_weight_bytes"][1]["mlp"] < entry["layer_weight_bytes"][0]["mlp"]


def test_bench_kernels_says_in_one_line_when_they_cannot_run(bench_json, tmp_path):
    from mlx_deepseek.bench.kernel_bench import NO_METAL
    from mlx_deepseek.kernels import runtime as kernels

    result, data = _kernel_bench(bench_json[1], tmp_path)
    if kernels.available():  # a Mac: both sides measured
        _check_kernel_result(data, ["off", "on"])
        return
    assert result.output.count(NO_METAL) == 1  # on one line of the report
    assert data["note"] == NO_METAL and not data["kernels_available"]
    _check_kernel_result(data, ["off"])
    assert "kernels off (MLX)" in result.output and "kernels on" not in result.output


@pytest.mark.emulator
def test_bench_kernels_compares_on_and_off(bench_json, tmp_path, monkeypatch):
    from kernel_support import metal

    from mlx_deepseek.ops import metal as metal_ops

    with metal(monkeypatch):  # the CPU emulator of Metal stands in where there is no GPU
        result, data = _kernel_bench(bench_json[1], tmp_path)
        assert metal_ops.failed_families() == []
    _check_kernel_result(data, ["off", "on"])
    assert data["kernels_available"] and data["note"] is None
    assert "on / off" in result.output and "attention on" in result.output


def test_bench_kernels_refuses_options_it_does_not_take():
    result = CliRunner().invoke(app, ["bench", "--kernels", "--check"])
    assert result.exit_code != 0 and "--kernels does not take" in str(result.exception)


def test_v32_bench_prefills_at_depth_and_counts_the_indexer_cache(tmp_path):
    """V3.2: both runtimes' caches (ours: latent + indexer keys; mlx-lm: a CacheList whose
    indexer cache keeps the keys twice) filled and measured; prefill at a cache depth."""
    out = tmp_path / "r.json"
    args = ["bench", "--shape", "tiny-v32", "--prompt-tokens", "4", "--decode-tokens", "1"]
    args += ["--repeats", "1", "--contexts", "20", "--prefill-contexts", "30"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--bandwidth-gb", "0.05", "--json", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "prefill tok/s of 4 tokens at 30" in result.output
    (entry,) = json.loads(out.read_text())["models"]
    c = SHAPES["tiny-v32"]().config
    layers, latent, key = c["num_hidden_layers"], c["kv_lora_rank"] + c["qk_rope_head_dim"], 32
    ours, lm = entry["runtimes"]["mlx-deepseek"], entry["runtimes"]["mlx-lm"]
    assert ours["kv_bytes_per_token"] == layers * (latent + key) * 4
    assert lm["kv_bytes_per_token"] == layers * (latent + 2 * key) * 4
    for rt in (ours, lm):
        assert rt["prefill_tok_s_at"]["30"]["median"] > 0
        assert rt["peak_memory_bytes"]["prefill_at"]["30"] > rt["weights_bytes"]
    assert set(entry["ratios"]["prefill_at"]) == {"30"}
