"""`mlx-deepseek generate` and `mlx-deepseek chat` through typer's runner (and main()'s errors)."""

import io
import sys

import pytest
from tiny_chat import tiny_checkpoint, tiny_model
from typer.testing import CliRunner

from mlx_deepseek import cli
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.generation import generate

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir():
    return str(tiny_checkpoint())


def invoke(*args, input=None):
    return runner.invoke(cli.app, list(args), input=input)


def test_generate_prints_the_answer_on_stdout_and_stats_on_stderr(model_dir):
    r = invoke("generate", model_dir, "--prompt", "Hello there", "-m", "8", "--temp", "0")
    assert r.exit_code == 0, r.output
    model, tok = tiny_model()
    expected = generate(model, tok, [{"role": "user", "content": "Hello there"}], 8)
    assert r.stdout == expected + "\n"
    assert "generated 8 tok" in r.stderr and "length" in r.stderr


def test_generate_reads_stdin_and_applies_sampling_options(model_dir):
    args = ["generate", model_dir, "-m", "6", "--temp", "1.0", "--top-p", "0.9"]
    args += ["--top-k", "50", "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "4"]
    a = invoke(*args, "-q", input="Tell me a story\n")
    b = invoke(*args, "-q", "--prompt", "Tell me a story")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.stdout == b.stdout and a.stdout.strip()
    assert a.stderr == ""  # --quiet: no stats line


def test_generate_with_system_prompt_and_raw(model_dir):
    r = invoke("generate", model_dir, "-p", "Hi", "--system", "Be brief.", "-m", "3", "-q")
    assert r.exit_code == 0, r.output
    raw = invoke("generate", model_dir, "-p", "Hi", "--raw", "-m", "3", "-q", "--temp", "0")
    model, tok = tiny_model()
    assert raw.stdout == generate(model, tok, "Hi", 3) + "\n"


def test_non_utf8_stdin_is_one_clear_line(model_dir, monkeypatch, capsys):
    r = invoke("generate", model_dir, input=b"caf\xe9 au lait")
    assert isinstance(r.exception, DeepSeekError) and r.exit_code == 1
    assert "stdin is not UTF-8" in str(r.exception) and "0xe9 at offset 3" in str(r.exception)
    # the console entry point prints it as one line and exits 1
    monkeypatch.setattr(sys, "argv", ["mlx-deepseek", "generate", model_dir])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9")))
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: stdin is not UTF-8") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "./no/such/model", "-p", "x"], "no such folder"),
        (["generate", "{model}", "-p", "dragon " * 3000], "max_position_embeddings"),
        (["generate", "{model}", "-p", "x", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["generate", "{model}", "-p", "x", "-m", "0"], "--max-tokens 0: must be at least 1"),
        (["generate", "{model}", "-p", "x", "--think"], "no thinking switch"),
        (["chat", "./no/such/model"], "no such folder"),
    ],
)
def test_bad_input_is_a_clear_error(model_dir, args, message):
    r = invoke(*[a.replace("{model}", model_dir) for a in args], input="")
    assert isinstance(r.exception, DeepSeekError), r.output
    assert message in str(r.exception)


def test_chat_without_a_model_means_the_demo(monkeypatch, tmp_path):
    from mlx_deepseek import loading

    monkeypatch.setattr(loading, "demo_path", lambda name="demo": tmp_path / name)
    r = invoke("chat", input="")
    assert isinstance(r.exception, DeepSeekError) and "demo model" in str(r.exception)


def test_chat_session_through_the_runner(model_dir, tmp_path):
    script = "\n".join(
        [
            "Hello",
            "/help",
            "/bogus",
            "/top_p 2",
            "/top_k 5",
            "/system You are terse.",
            "/think on",
            "first line\\",
            "second line",
            '"""',
            "pasted line one",
            "",
            "pasted line three",
            '"""',
            f"/save {tmp_path / 's'}",
            "/reset",
            f"/load {tmp_path / 's'}",
            "/stats",
            "/exit",
        ]
    )
    r = invoke("chat", model_dir, "--temp", "0", "-m", "5", input=script + "\n")
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.count("prefill ") >= 3 and "generated 5 tok" in out
    assert "/think on" not in out.split("Commands:")[0]  # the banner came first
    assert "unknown command /bogus" in out
    assert "error: top_p=2.0: must be in (0, 1]" in out
    assert "top_k = 5" in out and "system prompt set" in out
    assert "has no thinking switch" in out and "still shown" in out
    assert "saved 6 messages" in out and "loaded 6 messages" in out
    assert "turns 3 · prefilled" in out
    assert (tmp_path / "s.safetensors").exists()


def test_chat_ctrl_d_exits_cleanly(model_dir):
    r = invoke("chat", model_dir, input="")
    assert r.exit_code == 0 and "mlx-deepseek chat" in r.output


def test_chat_shows_r1_reasoning_apart(tmp_path):
    path = tiny_checkpoint("tiny-deepseek-r1")
    r = invoke("chat", str(path), "-m", "6", "--temp", "0", input="Why?\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "r1 format (built-in r1)" in r.output and "top_p 0.95" in r.output
    assert "thinking: " in r.output  # the prompt opened <think>: the output is reasoning


def test_chat_survives_non_utf8_input(model_dir):
    r = invoke("chat", model_dir, "-m", "3", input=b"caf\xe9\nHello\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "error: that input is not UTF-8 text" in r.output
    assert "prefill " in r.output.split("not UTF-8")[1]  # the next message was answered


def test_generate_sends_r1_reasoning_to_stderr():
    path = str(tiny_checkpoint("tiny-deepseek-r1"))
    r = invoke("generate", path, "-p", "Why?", "-m", "5", "--temp", "0")
    assert r.exit_code == 0, r.output
    model, tok = tiny_model("tiny-deepseek-r1")
    prompt = [{"role": "user", "content": "Why?"}]
    reasoning = generate(model, tok, prompt, 5)  # the tiny model never writes </think>
    assert r.stdout == ""  # no answer yet: it was all reasoning (and no blank line)
    assert r.stderr.startswith(reasoning.strip()[:3]) and "generated 5 tok" in r.stderr
