"""The command line's front door: usage mistakes through the installed console script (the
`mlx-deepseek` next to sys.executable: exit 2, typer's usage line and one error line, no
traceback), --version, flags shown as flags, one meaning per short option, the option checks
chat and generate share (same words, before any model is loaded), generate's prompt edge
cases, and what the hub errors say."""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from tiny_chat import tiny_checkpoint
from typer.testing import CliRunner

from mlx_deepseek import cli
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.loading import resolve_model_path

runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "mlx-deepseek"


def script(*args: str | bytes, input: bytes | None = None, env=None, timeout=300):
    """Run the installed console script (the one a user runs) and return the result."""
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT}: the console script is not installed (pip install -e .)")
    return subprocess.run(
        [str(SCRIPT), *args],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def lines(data: bytes) -> list[str]:
    return data.decode("utf-8", "replace").strip("\n").split("\n")


# ---- usage errors: exit 2, usage line + one error line -------------------------------------

USAGE_ERRORS = [
    ([], ["no command given", "chat, generate, convert, info, bench"]),
    (["--debug"], ["no command given"]),
    (["bogus"], ["'bogus'"]),
    (["generate", "demo", "-p"], ["'-p' requires an argument"]),
    (["generate", "demo", "--temp", "abc", "-p", "x"], ["--temp", "'abc'"]),
    (["generate", "demo", "-p", "x", "--quiet", "true"], ["--quiet is a flag", "'true'"]),
    (["chat", "demo", "--top-k", "1.5"], ["--top-k", "'1.5'"]),
    (["convert", "src", "-o", "dst", "--recipe", "nonsense"], ["--recipe", "'nonsense'"]),
    (["generate"], ["Missing argument"]),
    (["info", "demo", "extra"], ["extra"]),
]


@pytest.mark.parametrize("args, words", USAGE_ERRORS, ids=lambda v: " ".join(v) or "none")
def test_usage_errors_are_the_usage_line_and_one_error_line(args, words):
    r = script(*args)
    err = lines(r.stderr)
    assert r.returncode == 2, r.stderr
    assert r.stdout == b""
    assert len(err) == 2 and "Traceback" not in r.stderr.decode(), r.stderr
    command = next((a for a in args if a in _commands()), "")
    assert err[0].startswith(f"Usage: mlx-deepseek {command}".strip())
    assert err[1].startswith("error: ")
    for w in words:
        assert w in err[1]


def test_version():
    r = script("--version")
    assert r.returncode == 0 and r.stderr == b""
    assert r.stdout.decode().strip() == f"mlx-deepseek {importlib.metadata.version('mlx-deepseek')}"


# ---- help: flags as flags, one meaning per short option ------------------------------------


def _commands() -> dict[str, object]:
    root = typer.main.get_command(cli.app)
    return {"": root, **root.commands}


@pytest.mark.parametrize("name", list(_commands()))
def test_flags_show_no_value_placeholder(name):
    r = runner.invoke(cli.app, [*([name] if name else []), "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output and "BOOLEAN" not in r.output
    flags = [p for p in _commands()[name].params if getattr(p, "is_flag", False)]
    assert all(p.opts[0] in r.output for p in flags)


def test_each_short_option_means_one_thing_across_commands():
    meaning: dict[str, tuple[str, str]] = {}
    for name, command in _commands().items():
        for p in command.params:
            long = next((o for o in p.opts if o.startswith("--")), p.name)
            for short in (o for o in p.opts if re.fullmatch(r"-\w", o)):
                seen = meaning.setdefault(short, (long, name))
                assert seen[0] == long, f"{short}: {seen[0]} in {seen[1]} but {long} in {name}"
    assert meaning["-m"][0] == "--max-tokens"  # as mlx_lm's generate and chat


# ---- option checks: the same words in chat and generate, before loading ---------------------

BAD_OPTIONS = [
    (["-m", "0"], "--max-tokens 0: must be at least 1"),
    (["--temp", "-1"], "--temp -1.0: must be >= 0"),
    (["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    (["--top-k", "-3"], "--top-k -3: must be >= 0"),
    (["--min-p", "1"], "--min-p 1.0: must be in [0, 1)"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be > 0"),
    (["--seed", "-1"], "--seed -1: must be in [0, 2**64)"),
    (["--draft-tokens", "0"], "--draft-tokens 0: must be from 1 to 8"),
    (["--temp", "nan"], "--temp nan: must be >= 0"),
]


@pytest.mark.parametrize("option, message", BAD_OPTIONS, ids=lambda v: str(v))
def test_chat_and_generate_check_options_alike_before_loading(option, message):
    # the model does not exist: an option checked after loading would say "no such folder"
    missing = "./no/such/model"
    errors = []
    for command in (["chat", missing], ["generate", missing, "-p", "hi"]):
        r = runner.invoke(cli.app, [*command, *option], input="")
        assert isinstance(r.exception, DeepSeekError), r.output
        errors.append(str(r.exception))
    assert errors[0] == errors[1] and errors[0].startswith(message)


def test_think_without_a_switch_says_the_same_in_chat_and_generate():
    model = str(tiny_checkpoint())
    got = []
    for args in (["chat", model, "--think"], ["generate", model, "-p", "hi", "--think"]):
        r = runner.invoke(cli.app, args, input="")
        assert isinstance(r.exception, DeepSeekError), r.output
        got.append(str(r.exception))
    assert got[0] == got[1] and "no thinking switch" in got[0] and "still shown" in got[0]


# ---- generate's prompt ---------------------------------------------------------------------


def test_a_non_utf8_prompt_argument_is_the_same_clean_error_as_stdin():
    from_argv = script("generate", "demo", "-p", b"caf\xe9 au lait")
    from_stdin = script("generate", "demo", input=b"caf\xe9 au lait")
    for r in (from_argv, from_stdin):
        err = lines(r.stderr)
        assert r.returncode == 1 and len(err) == 1 and err[0].startswith("error: "), r.stderr
        assert "is not UTF-8 text (byte 0xe9 at offset 3): convert it first" in err[0]
    assert "--prompt" in lines(from_argv.stderr)[0]


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_an_empty_prompt_argument_is_refused_like_empty_stdin(prompt):
    from_argv = runner.invoke(cli.app, ["generate", "demo", "-p", prompt])
    from_stdin = runner.invoke(cli.app, ["generate", "demo"], input=prompt)
    for r in (from_argv, from_stdin):
        assert isinstance(r.exception, DeepSeekError) and r.exit_code == 1
        assert str(r.exception).endswith("is empty: give some text")


def test_the_answer_on_stdout_has_no_leading_blank_lines():
    # the demo (V3.1 format): with --think its reasoning goes to stderr, the answer alone to
    # stdout; without, it answers directly (23 + 45 is a held-out question)
    question = "What is 23 + 45?"
    for think in (["--think"], []):
        r = runner.invoke(
            cli.app, ["generate", "demo", "-p", question, "--temp", "0", "-q", *think]
        )
        assert r.exit_code == 0, r.output
        assert r.stdout == "23 + 45 = 68.\n"
        assert ("3 + 5 + 0 = 8" in r.stderr) == bool(think)


# ---- the hub -------------------------------------------------------------------------------


def test_offline_hub_error_names_hf_hub_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest
    with pytest.raises(DeepSeekError) as e:
        resolve_model_path("nobody-here/no-such-model-for-tests")
    assert "HF_HUB_OFFLINE is set" in str(e.value) and "cannot be reached" not in str(e.value)


def test_unreachable_hub_error_does_not_blame_hf_hub_offline(tmp_path):
    # a local port nothing listens on stands for a hub that cannot be reached
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(tmp_path / "hf"),
    }
    r = script("info", "nobody-here/no-such-model-for-tests", env=env)
    err = lines(r.stderr)
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert "not in the local Hugging Face cache and the hub cannot be reached" in err[0]
    assert "HF_HUB_OFFLINE" not in err[0]
