"""Split models on local ranks (MLX's ring backend over loopback, as CI runs it): the same
tokens as one process, each rank holding about 1/N of the weights, the bytes a decoded token
costs as the cost model says, and the CLI's commands with rank 0 speaking for all.

Tiny checkpoints in the real Hugging Face layout (per-expert tensors, kv_b_proj, V3's MTP
layer) are built with transformers; the CLI tests use the mlx-lm layout (stacked experts).
"""

import json
import re
import subprocess

import mlx.core as mx
import pytest
import ranks
from checkpoints import add_mtp_layer, build_hf_model, save_hf_checkpoint
from ranks import PROMPT, RANK_MAIN, TOKENS, check_step_bytes, run_cases, weight_bytes
from tiny_chat import tiny_checkpoint

from mlx_deepseek.decoding import StepOptions, decode_steps, make_cache
from mlx_deepseek.loading import load_config, load_model
from mlx_deepseek.sampling import SamplingSettings, make_sampler


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Raw Hugging Face checkpoints: V3 (noaux_tc, q LoRA, 4 heads, 5 layers + MTP) and V2
    (greedy routing, no q LoRA, 2 shared experts, 5 layers, 5 heads and D=80: the heads
    split unevenly on 2 and 3 ranks, as 128 heads do on 3)."""
    root = tmp_path_factory.mktemp("distributed")
    v3 = save_hf_checkpoint(build_hf_model("v3_noaux", seed=1, num_hidden_layers=5), root / "v3")
    add_mtp_layer(v3)
    v2 = build_hf_model(
        "v2_greedy", seed=2, num_hidden_layers=5, num_attention_heads=5, hidden_size=80
    )
    v2 = save_hf_checkpoint(v2, root / "v2")
    return {"v3": v3, "v2": v2}


def one_process(path, settings: SamplingSettings) -> list[int]:
    """The reference: one process's tokens."""
    model = load_model(path)
    if settings.seed is not None:
        mx.random.seed(settings.seed)
    opts = StepOptions(make_sampler(settings), [], max_tokens=TOKENS)
    cache = make_cache(model)
    return [s.token for s in decode_steps(model, mx.array(PROMPT), cache, opts)]


def check_split(models, n, tmp_path):
    """Every family x kind (and MTP drafting, and seeded sampling) on n ranks."""
    sampled = SamplingSettings(temperature=0.8, top_p=0.95, seed=11)
    cases = [
        ("v3", "pipeline", SamplingSettings(), False),
        ("v3", "pipeline", SamplingSettings(), True),  # MTP drafts on the last rank
        ("v3", "tensor", sampled, False),
        ("v2", "tensor", SamplingSettings(), False),
        ("v2", "pipeline", sampled, False),
    ]
    results = run_cases(models, cases, n, tmp_path)
    report = []
    for (fam, kind, settings, _), got in zip(cases, results, strict=True):
        assert got["kind"] == kind
        if kind == "tensor":  # every head on exactly one rank, however they divide
            spans = [re.search(r"heads (\d+)-(\d+)", d).groups() for d in got["plan"]]
            counts = [int(b) - int(a) + 1 for a, b in spans]
            heads = load_config(models[fam])["num_attention_heads"]
            assert sum(counts) == heads and max(counts) - min(counts) <= 1, got["plan"]
        assert got["tokens"] == one_process(models[fam], settings), (fam, kind)
        # each rank holds about 1/n of what one process loads (tiny models replicate
        # relatively more: norms, the router, the latent projections)
        total = weight_bytes(models[fam])
        shares = [b / total for b in got["weight_bytes"]]
        assert max(shares) < 1.4 / n, (fam, kind, shares)
        expected = check_step_bytes(models[fam], got, n, kind)
        report.append((fam, kind, [round(s, 3) for s in shares], expected, got["step_wire_bytes"]))
    print(json.dumps(report))


def test_two_ranks_give_one_process_tokens(models, tmp_path):
    check_split(models, 2, tmp_path)


@pytest.mark.slow
def test_three_ranks_give_one_process_tokens(models, tmp_path):
    """Uneven splits: 4 heads as 2 + 1 + 1 (V3), 5 as 2 + 2 + 1 (V2), 8 experts as 3 + 3 + 2,
    5 layers as ranges."""
    check_split(models, 3, tmp_path)


# ---- the CLI ---------------------------------------------------------------------------------


WIDE = {"COLUMNS": "1000"}  # no wrapping: transcripts compare line by line


def cli(*args, cwd, input=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ranks.PYTHON, RANK_MAIN, *args], cwd=cwd, input=input, capture_output=True, text=True,
        timeout=600, env={**ranks.os.environ, **WIDE},
    )  # fmt: skip


def without_timings(text: str) -> str:
    text = re.sub(r"[\d.]+ tok/s", "_ tok/s", text)
    return re.sub(r"peak [\d.]+ [MG]B", "peak _", text)


def test_generate_under_mlx_launch_prints_once(tmp_path):
    """mlx.launch starts both ranks; rank 0 prints one process's answer, rank 1 nothing. The
    bundled demo is 4-bit with an MTP layer: quantized tensors are cut on group boundaries
    (its one-group shared expert stays whole on rank 0), and MTP drafts across ranks."""
    args = ["generate", "demo", "-p", "Hello there", "-m", "10", "--temp", "0"]
    alone = cli(*args, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    port = ranks.free_ports(1)[0]
    launch = [ranks.PYTHON, "-c", "from mlx._distributed_utils.launch import main; main()"]
    launch += ["-n", "2", "--backend", "ring", "--starting-port", str(port), "--"]
    r = subprocess.run(
        [*launch, ranks.PYTHON, RANK_MAIN, *args, "--parallel", "tensor"], cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
        env={**ranks.os.environ, **WIDE, "MLX_DEEPSEEK_CONNECT_TIMEOUT": "120"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == alone.stdout  # rank 0's answer, once
    err = " ".join(r.stderr.split())  # the stats line may wrap
    assert "tensor parallel over 2 ranks: rank 0: heads 0-1, experts 0-3" in err
    assert re.search(r"MTP \d+% accepted", err)  # drafting ran (the rate is the model's)


@pytest.mark.slow
def test_chat_runs_on_rank_0_and_the_other_follows(tmp_path):
    """The same transcript as one process (greedy, then seeded sampling after /temp), and
    /save refused in one line: each rank holds part of the cache."""
    model = str(tiny_checkpoint())
    script = "Hello there\n/temp 0.7\n/save x\nTell me a story\n/reset\nHi\n/exit\n"
    args = ["chat", model, "-m", "6", "--temp", "0", "--seed", "3"]
    alone = cli(*args, cwd=tmp_path, input=script)
    assert alone.returncode == 0, alone.stderr
    out = ranks.start([ranks.PYTHON, RANK_MAIN, *args, "--parallel", "pipeline"], 2, tmp_path,
                      env=WIDE, stdin=script).wait(600)  # fmt: skip
    (rc0, out0, err0), (rc1, out1, err1) = out
    assert rc0 == 0 and rc1 == 0, err0 + err1
    refused = "error: /save is not available with --parallel: each rank holds part of the cache"
    turns, expected = out0.split(">>> "), alone.stdout.split(">>> ")
    assert len(turns) == len(expected) == 8
    for got, want in zip(turns, expected, strict=True):
        if "saved 2 messages" in want:
            assert got.strip() == refused
        else:
            assert without_timings(got) == without_timings(want)
    assert out1 == "" and err1 == ""
