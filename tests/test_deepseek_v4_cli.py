"""`mlx-deepseek generate` and `chat` on a tiny DeepSeek V4 checkpoint in DeepSeek's own
layout (FP8 linears, FP4 experts, a real tokenizer, no chat template: the V4 encoder renders
the prompt), and `--think` / `/think` switching the mode: with thinking on, the prompt opens
`<think>` and the reply is reasoning (the tiny model never writes `</think>`); off, it is the
answer."""

import pytest
import torch
from tiny_chat import build_tokenizer, vocab_size
from typer.testing import CliRunner
from v4_checkpoints import build_v4, save_v4, write_official

import mlx_deepseek
from mlx_deepseek.cli import app
from mlx_deepseek.formats import chat_format
from mlx_deepseek.models.v4_config import CSA, HCA

runner = CliRunner()


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4-cli")
    build_tokenizer(root / "official")
    vocab = vocab_size(root / "official")
    hf = build_v4(
        "mixed", seed=21, vocab_size=vocab, moe_intermediate_size=32,
        compress_rates={CSA: 4, HCA: 128},
    )  # fmt: skip
    with torch.no_grad():  # greedy never stops early nor opens / closes thinking itself
        for token in (1, vocab - 2, vocab - 1):
            hf.lm_head.weight[token] = 0.0
    write_official(save_v4(hf, root / "src"), root / "official", quantize=True)
    return root / "official"


def _prompt(path, thinking: bool) -> str:
    model, tok = mlx_deepseek.load(path)
    fmt = chat_format(tok, {"model_type": "deepseek_v4"})
    return fmt.render(tok, [{"role": "user", "content": "Why?"}], True, thinking)


def test_v4_prompt_ends_by_the_mode(v4_dir):
    assert _prompt(v4_dir, True).endswith("<｜Assistant｜><think>")
    assert _prompt(v4_dir, False).endswith("<｜Assistant｜></think>")


def test_generate_runs_v4_and_think_sends_the_reply_to_reasoning(v4_dir):
    off = runner.invoke(app, ["generate", str(v4_dir), "-p", "Why?", "-m", "6", "--temp", "0"])
    assert off.exit_code == 0, off.output
    model, tok = mlx_deepseek.load(v4_dir)
    expected = mlx_deepseek.generate(model, tok, _prompt(v4_dir, False), max_tokens=6)
    assert off.stdout == expected.lstrip("\n") + "\n" and expected.strip()
    assert "generated 6 tok" in off.stderr
    on = runner.invoke(
        app, ["generate", str(v4_dir), "-p", "Why?", "-m", "6", "--temp", "0", "--think"]
    )
    assert on.exit_code == 0, on.output
    reasoning = mlx_deepseek.generate(model, tok, _prompt(v4_dir, True), max_tokens=6)
    assert on.stdout == ""  # all of it reasoning: on stderr, stdout keeps the answer only
    assert on.stderr.startswith(reasoning.strip()[:3]) and "generated 6 tok" in on.stderr


def test_chat_runs_v4_and_think_switches_the_mode(v4_dir):
    script = ["Hello", "/think on", "Hello again", "/think off", "And again", "/stats", "/exit"]
    r = runner.invoke(
        app, ["chat", str(v4_dir), "--temp", "0", "-m", "4"], input="\n".join(script) + "\n"
    )
    assert r.exit_code == 0, r.output
    out = r.output
    banner = out.split(">>>", 1)[0]
    assert "v4 format" in banner and "thinking off" in banner  # V4 has the switch; off first
    turns = out.split(">>> thinking o")  # the "thinking on" / "thinking off" replies
    assert len(turns) == 3, out
    assert "thinking: " not in turns[0]  # off: the reply is the answer
    assert turns[1].startswith("n\n") and "thinking: " in turns[1]  # on: shown as reasoning
    assert turns[2].startswith("ff\n") and "thinking: " not in turns[2]
    assert out.count("generated 4 tok") == 4 and "turns 3 · prefilled" in out  # + /stats
