"""Routed experts streamed from the checkpoint (`--expert-cache`): the same output as fully
resident at every budget, on every back-end, for each checkpoint layout (Hugging Face
per-expert tensors, mlx-lm's stacked quantized ones with float32 or bf16 scales, this
project's converter with an MTP layer); the minimum budget; bad budgets; the fallback when
the experts cannot be read by offset; the statistics; prefetching; the memory preflight's
offer; and the server's metrics.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_hf_model, save_hf_checkpoint
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import quantize_model, save_config, save_model

import mlx_deepseek
from mlx_deepseek import loading, ops
from mlx_deepseek.errors import DeepSeekError, OutOfMemoryError
from mlx_deepseek.offload import expert_store, parse_budget
from mlx_deepseek.ops import cpu

PROMPT = np.random.RandomState(3).randint(2, 320, size=24).tolist()
# 16 experts, 3 per token: 25% = 4 slots, the minimum 3 (a prompt uses more: rounds)
SIZES = dict(n_routed_experts=16, num_experts_per_tok=3, num_hidden_layers=4)


def greedy(model, prompt: list[int], n: int = 10) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after `prompt` through the cache, and every step's logits."""
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    tokens, steps = [], [np.array(logits)]
    for _ in range(n):
        t = int(mx.argmax(logits, axis=-1).item())
        tokens.append(t)
        logits = model(mx.array([[t]]), cache=cache)[:, -1]
        steps.append(np.array(logits))
    return tokens, np.concatenate(steps)


def mlx_lm_quantized(hf_path: Path, out: Path, bits: int, group_size: int, mode="affine"):
    model, config = mlx_lm_load_model(hf_path, lazy=True)
    model, config = quantize_model(model, config, group_size=group_size, bits=bits, mode=mode)
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints of three layouts, built once for the module."""
    root = tmp_path_factory.mktemp("expert-cache")
    hf_v2 = save_hf_checkpoint(build_hf_model("v2_greedy", **SIZES), root / "hf-v2")
    bf16_v3 = save_hf_checkpoint(
        build_hf_model("v3_noaux", seed=1, **SIZES).to(torch.bfloat16), root / "hf-v3-bf16"
    )
    hf_group = save_hf_checkpoint(build_hf_model("v2_group", seed=2, **SIZES), root / "hf-v2g")
    return {
        # per-expert float32 tensors (DeepSeek's own layout)
        "hf-v2": hf_v2,
        # stacked 4-bit experts with bf16 scales: converted into float32 slots on the CPU
        "mlx-lm-v3-q4": mlx_lm_quantized(bf16_v3, root / "q4-v3", 4, 32),
        # stacked 8-bit experts, group-limited routing
        "mlx-lm-v2-q8": mlx_lm_quantized(hf_group, root / "q8-v2g", 8, 64),
    }


def budgets(model) -> dict[str, str]:
    """100%, 25% and the minimum (top_k experts per layer) for this model."""
    args = model.args
    least = args.num_experts_per_tok / args.n_routed_experts
    return {"100%": "100%", "25%": "25%", "minimum": f"{100 * least}%"}


def backend_block(backend: str, monkeypatch):
    """mlx; cpu; cpu split over 3 streams for any size; metal with the fused MoE kernels (the
    emulator standing in for a Mac's GPU), which must pass their self-check on the bank."""
    if backend == "cpu-split":
        monkeypatch.setattr(cpu, "MIN_PART_BYTES", 1)
        monkeypatch.setenv(cpu.ENV_THREADS, "3")
        return ops.use("cpu")
    if backend == "metal":
        from kernel_support import metal

        return metal(monkeypatch, "moe")
    return ops.use(backend)


@pytest.mark.parametrize(
    "layout,backend",
    [
        ("hf-v2", "mlx"),
        ("hf-v2", "cpu-split"),
        ("mlx-lm-v3-q4", "mlx"),
        ("mlx-lm-v3-q4", "cpu-split"),
        ("mlx-lm-v3-q4", "metal"),
        ("mlx-lm-v2-q8", "cpu"),
    ],
)
def test_greedy_output_is_identical_to_resident_at_every_budget(
    checkpoints, layout, backend, monkeypatch
):
    path = checkpoints[layout]
    resident = mlx_deepseek.load_model(path)
    with backend_block(backend, monkeypatch):
        want_tokens, want_logits = greedy(resident, PROMPT)
        for label, budget in budgets(resident).items():
            model = mlx_deepseek.load_model(path, expert_cache=budget)
            store = expert_store(model)
            assert store is not None and store.slots <= model.args.n_routed_experts
            tokens, logits = greedy(model, PROMPT)
            assert tokens == want_tokens, f"{layout} {backend} at {label}"
            # the same products; a prefill groups them differently (other ids, rounds when more
            # experts than slots): float32 rounding only
            scale = np.abs(want_logits).max()
            assert np.abs(logits - want_logits).max() <= 1e-5 * scale, label
            stats = store.snapshot()
            assert 0 < stats.reads and stats.tokens == len(PROMPT) + 10
            if label == "minimum":
                assert store.slots == model.args.num_experts_per_tok
                assert stats.hit_rate < 1


def test_mtp_drafting_with_streamed_experts_gives_the_plain_greedy_output():
    """The bundled demo (this project's converter: stacked experts, an MTP layer in its own
    shard, whose experts stream too) drafting with MTP at the minimum budget."""
    model, tokenizer = mlx_deepseek.load("demo")
    prompt = [{"role": "user", "content": "What is 23 + 45?"}]
    want = mlx_deepseek.generate(model, tokenizer, prompt, 24, mtp=False)
    for budget in ("25%", "50%"):
        streamed, _ = mlx_deepseek.load("demo", expert_cache=budget)
        store = expert_store(streamed)
        assert len(store.layers) == len(streamed.layers) - 1 + len(streamed.mtp)  # MTP's too
        responses = list(mlx_deepseek.stream_generate(streamed, tokenizer, prompt, 24, mtp=True))
        assert "".join(r.text for r in responses) == want
        assert responses[-1].acceptance_rate is not None
        stats = responses[-1].expert_cache
        assert stats is not None and stats.lookups > 0 and 0 <= stats.hit_rate <= 1


def test_a_warm_full_budget_reads_nothing_and_prefetch_changes_nothing(checkpoints):
    path = checkpoints["mlx-lm-v3-q4"]
    model = mlx_deepseek.load_model(path, expert_cache="100%")
    store = expert_store(model)
    greedy(model, PROMPT, 4)
    before = store.snapshot()
    greedy(model, PROMPT, 4)
    warm = store.snapshot() - before
    assert warm.bytes_read == 0 and warm.reads == 0 and warm.hit_rate == 1.0
    assert warm.tokens == len(PROMPT) + 4 and warm.lookups > 0

    # at the minimum, with and without prefetching the next layer's experts
    outputs = {}
    for prefetch in (True, False):
        model = mlx_deepseek.load_model(path, expert_cache="18.75%")
        store = expert_store(model)
        store.set_prefetch(prefetch)
        outputs[prefetch] = greedy(model, PROMPT, 8)
        stats = store.snapshot()
        # as stored: bf16 scales, while the slots hold them in float32
        assert stats.bytes_read == stats.reads * store.plan.read_bytes
        assert store.plan.read_bytes < store.plan.shape.expert_bytes
        if prefetch:
            assert 0 < stats.prefetch_used <= stats.prefetched
        else:
            assert stats.prefetched == 0
    assert outputs[True][0] == outputs[False][0]
    assert np.array_equal(outputs[True][1], outputs[False][1])


def test_a_budget_below_one_layers_active_experts_is_refused_with_the_minimum(checkpoints):
    path = checkpoints["hf-v2"]
    shape = mlx_deepseek.load_model(path, expert_cache="100%").expert_store.plan.shape
    least = shape.layers * shape.top_k * shape.expert_bytes
    with pytest.raises(DeepSeekError) as e:
        mlx_deepseek.load_model(path, expert_cache=least - 1)
    message = str(e.value)
    assert "\n" not in message and "minimum" in message and f"{shape.top_k} experts" in message
    given_back = re.search(r"minimum that works, (\S+)", message).group(1)
    assert parse_budget(given_back).nbytes >= least
    model = mlx_deepseek.load_model(path, expert_cache=given_back)  # the minimum works
    assert model.expert_store.slots == shape.top_k
    pct = re.search(r"\(([0-9.]+%)", message).group(1)
    assert mlx_deepseek.load_model(path, expert_cache=pct).expert_store.slots == shape.top_k
    with pytest.raises(DeepSeekError, match="minimum"):
        mlx_deepseek.load_model(path, expert_cache="10%")  # 1.6 slots of 16


@pytest.mark.parametrize("bad", ["lots", "0", "-5GB", "150%", "0%", "12XB", "", "1e", "%"])
def test_bad_budgets_are_one_line(bad):
    with pytest.raises(DeepSeekError) as e:
        parse_budget(bad)
    assert "--expert-cache" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,nbytes", [("40GB", 40 * 10**9), ("512MiB", 512 << 20), ("1e9", 10**9), ("7", 7)]
)
def test_budget_sizes(text, nbytes):
    assert parse_budget(text).nbytes == nbytes
    assert parse_budget(f" {text.lower()} ").nbytes == nbytes


def test_experts_that_cannot_be_read_by_offset_fall_back_to_memory_in_one_line(tmp_path, capfd):
    """Expert tensors stored as int32 (no slot takes them) and a model without routed
    experts: one line each, and the model loads as it would without --expert-cache."""
    from safetensors.numpy import load_file, save_file

    hf = save_hf_checkpoint(build_hf_model("v2_greedy", **SIZES), tmp_path / "int")
    tensors = load_file(str(hf / "model.safetensors"))
    for k in [k for k in tensors if ".experts.5.down_proj" in k]:
        tensors[k] = (tensors[k] * 1000).astype(np.int32)
    save_file(tensors, str(hf / "model.safetensors"))
    capfd.readouterr()
    model = mlx_deepseek.load_model(hf, expert_cache="25%")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experts.5.down_proj.weight is stored as I32" in err[0]
    assert expert_store(model) is None
    want = np.array(mlx_deepseek.load_model(hf)(mx.array([PROMPT])))
    assert np.array_equal(np.array(model(mx.array([PROMPT]))), want)

    dense = save_hf_checkpoint(
        build_hf_model("v3_noaux", **SIZES, first_k_dense_replace=4), tmp_path / "dense"
    )
    capfd.readouterr()
    assert expert_store(mlx_deepseek.load_model(dense, expert_cache="auto")) is None
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no routed experts" in err[0]


def test_the_memory_preflight_offers_the_budget_that_fits(checkpoints, monkeypatch):
    path = checkpoints["mlx-lm-v3-q4"]
    full = mlx_deepseek.load_model(path, expert_cache="100%").expert_store.plan.shape
    model = mlx_deepseek.load_model(path)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    announced = loading.check_checkpoint(path)[0]  # the preflight counts the config's layers
    _, cache = loading.estimate_memory(announced, {}, mx.float32)
    # room for the rest and about half the experts
    monkeypatch.setattr(loading, "available_memory", lambda: weights + cache - full.total // 2)
    with pytest.raises(OutOfMemoryError) as e:
        mlx_deepseek.load_model(path)
    message = str(e.value)
    assert "\n" not in message
    offer = re.search(r"--expert-cache (\S+)", message).group(1)
    model = mlx_deepseek.load_model(path, expert_cache=offer)  # the offer loads
    slots = model.expert_store.slots
    assert full.top_k <= slots < full.experts
    auto = mlx_deepseek.load_model(path, expert_cache="auto")
    assert auto.expert_store.slots == slots
    with pytest.raises(OutOfMemoryError, match="--expert-cache"):
        mlx_deepseek.load_model(path, expert_cache="100%")  # more than fits: one line


def test_generate_cli_reports_the_expert_cache(tmp_path):
    from typer.testing import CliRunner

    from mlx_deepseek.cli import app

    runner = CliRunner()
    args = ["generate", "demo", "-p", "What is 2 + 3?", "-m", "8", "--expert-cache", "50%"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"experts \d+% hit, [0-9.]+ [MG]B/tok read", result.stderr)
    for option, value, says in [
        ("--expert-cache", "1KB", "minimum that works"),
        ("--expert-cache", "lots", "give a size"),
        ("--kv-bits", "3", "give 8 or 4"),
    ]:
        bad = runner.invoke(app, ["generate", "demo", "-p", "hi", option, value])
        assert bad.exit_code == 1 and isinstance(bad.exception, DeepSeekError)
        assert says in str(bad.exception) and "\n" not in str(bad.exception)


def test_the_chats_stats_show_the_expert_cache_and_the_kv_cache():
    from mlx_deepseek.chat.repl import memory_line, stats_line
    from mlx_deepseek.chat.session import ChatSession

    model, tokenizer = mlx_deepseek.load("demo", expert_cache="50%", kv_bits=8)
    session = ChatSession(model, tokenizer, name="demo", mtp=False)
    "".join(c.text for c in session.respond("What is 12 + 30?"))
    assert session.last.expert_cache is not None and session.last.expert_cache.lookups > 0
    assert re.search(r"experts \d+% hit, [0-9.]+ [MG]B/tok read, [0-9.]+ s/tok stalled",
                     stats_line(session.last))  # fmt: skip
    line = memory_line(session)
    assert "KV cache c_kv 8-bit" in line and "4 of 8 experts per MoE layer" in line
    assert "since loading" in line


def test_the_servers_metrics_show_the_expert_cache():
    from mlx_deepseek.serve.engine import Engine
    from mlx_deepseek.serve.sampler import GenParams

    model, tokenizer = mlx_deepseek.load("demo", expert_cache="25%")
    with Engine(model, max_batch=2) as engine:
        prompt = tokenizer.encode("What is 12 + 30?")
        handles = [engine.submit(prompt, GenParams(max_tokens=6)) for _ in range(2)]
        outs = [[e.token for e in h if e.finish is None] for h in handles]
        stats = engine.stats()["expert_cache"]
    assert outs[0] == outs[1] and len(outs[0]) == 6
    assert stats["slots_per_layer"] == 2 and stats["experts_per_layer"] == 8
    assert stats["lookups"] > 0 and 0 <= stats["hit_rate"] <= 1 and stats["bytes_read"] > 0


# VmHWM: this process image's peak RSS (ru_maxrss would carry the forking parent's over)
RSS_SCRIPT = """
import sys
import mlx.core as mx
import mlx_deepseek
budget = None if sys.argv[2] == "-" else sys.argv[2]
model = mlx_deepseek.load_model(sys.argv[1], expert_cache=budget)
cache = model.make_cache()
y = model(mx.array([list(range(2, 34))]), cache=cache)
for _ in range(8):
    y = model(mx.argmax(y[:, -1:], axis=-1), cache=cache)
mx.eval(y)
try:
    status = open("/proc/self/status").read().splitlines()
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
except OSError:  # macOS: no /proc; there ru_maxrss is in bytes and exec starts it afresh
    import resource
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_rss_with_a_small_budget_is_well_under_fully_resident(tmp_path):
    """A model whose routed experts are ~95% of its bytes (bf16 in the file, float32 in
    memory on the CPU), measured in fresh processes."""
    from mlx_deepseek.convert.synthetic import random_tensor, write_checkpoint

    from mlx_deepseek.models.tiny import tiny_config

    config = tiny_config(
        "v3_noaux", n_routed_experts=64, num_experts_per_tok=4, n_group=4, topk_group=2,
        hidden_size=256, moe_intermediate_size=384, num_hidden_layers=5, vocab_size=320,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    path = tmp_path / "big-experts"
    write_checkpoint(path, config, lambda n, shape: random_tensor(n, shape, rng), tokenizer=False)
    expert_bytes = 4 * 64 * 3 * 256 * 384 * 4  # 4 MoE layers: 302 MB

    def peak(budget: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, str(path), budget],
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        return int(out.stdout.strip().splitlines()[-1])

    resident, streamed = peak("-"), peak("10%")  # 6 of 64 slots
    print(f"peak RSS: resident {resident / 1e6:.0f} MB, 10% budget {streamed / 1e6:.0f} MB")
    assert resident - streamed > 0.7 * expert_bytes


def test_v4_streams_its_experts_from_a_converted_checkpoint(tmp_path):
    """V4's MoE calls its experts itself (StreamedExperts as a SwitchGLU, with V4's clamped
    activation); a checkpoint in this project's names (stacked `ffn.switch_mlp`) streams."""
    import json

    from v4_checkpoints import build_v4, save_v4

    resident = mlx_deepseek.load_model(save_v4(build_v4("mixed", seed=0), tmp_path / "hf"))
    folder = tmp_path / "mlx"
    folder.mkdir()
    mx.save_safetensors(
        str(folder / "model.safetensors"), dict(tree_flatten(resident.parameters()))
    )
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    tokens = mx.array(np.random.RandomState(0).randint(0, 96, size=(1, 40)))
    want = np.array(resident(tokens))
    args = json.loads((folder / "config.json").read_text())
    for budget in ("100%", f"{100 * args['num_experts_per_tok'] / args['n_routed_experts']}%"):
        model = mlx_deepseek.load_model(folder, expert_cache=budget)
        store = expert_store(model)
        assert store is not None and len(store.layers) == len(model.layers)
        got = np.array(model(tokens))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), budget
        cache = model.make_cache()  # and decoding through its cache
        steps = [np.array(model(tokens[:, :30], cache=cache))]
        steps += [np.array(model(tokens[:, i : i + 1], cache=cache)) for i in range(30, 40)]
        assert np.abs(np.concatenate(steps, 1) - want).max() <= 1e-4 * np.abs(want).max()
    # kv_bits quantizes V4's compressed rows (tests/test_v4_kv_quantized.py); this tiny
    # V4's 24 non-RoPE channels are under MLX's smallest group: refused in one line
    with pytest.raises(DeepSeekError, match="head_dim - qk_rope_head_dim=24") as e:
        mlx_deepseek.load_model(folder, kv_bits=8)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--kv-bits", "5"], "--kv-bits 5: give 8 or 4"),
        (["--expert-cache", "0%"], "--expert-cache 0%: a percentage"),
        (["--expert-cache", "2 apples"], "--expert-cache '2 apples': give a size"),
    ],
)
def test_chat_generate_and_serve_check_the_memory_options_before_loading(option, message):
    from typer.testing import CliRunner

    from mlx_deepseek.cli import app

    missing = "./no/such/model"  # an option checked after loading would say "no such folder"
    errors = []
    for command in (["chat", missing], ["generate", missing, "-p", "hi"], ["serve", missing]):
        r = CliRunner().invoke(app, [*command, *option], input="")
        assert r.exit_code == 1 and isinstance(r.exception, DeepSeekError), r.output
        errors.append(str(r.exception))
    assert len(set(errors)) == 1 and errors[0].startswith(message) and "\n" not in errors[0]
