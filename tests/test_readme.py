"""The README's first steps are true: the clone before `pip install .`, OpenBLAS as `.ci/run`
installs it, and the chat transcript is what the chat prints today (the same banner, answers,
blank lines and stats fields; only timings and memory differ)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from mlx_deepseek import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def test_install_clones_before_pip_install():
    steps = section("Install and run")
    code = steps[steps.index("```bash") : steps.index("```", steps.index("```bash") + 3)]
    assert "git clone" in code and code.index("git clone") < code.index("pip install .")
    assert "\ncd " in code  # into the clone, where `pip install .` finds pyproject.toml


def test_openblas_is_explained_and_installed_by_ci():
    steps = section("Install and run")
    ci = (ROOT / ".ci/run").read_text()
    package = re.search(r"need\+=\((libopenblas[\w-]*)\)", ci).group(1)
    assert "OpenBLAS" in steps and package in steps and ".ci/run" in steps
    assert "prefill" in steps  # what it speeds up


def _stats(text: str) -> str:
    """A stats record as one line, timings and memory replaced."""
    text = re.sub(r"\d+\.\d+ tok/s", "# tok/s", " ".join(text.split()))
    return re.sub(r"peak \d+ [MG]B", "peak # MB", text)


def _records(lines: list[str]) -> list[str]:
    """Lines, with each stats line and its wrapped rest joined (numbers change its width)."""
    out: list[str] = []
    stats = False
    for line in (line.rstrip() for line in lines):
        if line.startswith("prefill "):
            stats = True
            out.append(line)
        elif stats and not line.startswith(">>>"):
            out[-1] += " " + line
        else:
            stats = False
            out.append(line)
    return [_stats(r) if r.startswith("prefill ") else r for r in out]


def test_the_chat_transcript_is_what_the_chat_prints():
    block = re.search(r"```text\n\$ mlx-deepseek chat\n(.*?)```", README, re.S).group(1)
    shown = block.rstrip("\n").split("\n")
    questions = [line[4:] for line in shown if line.startswith(">>> ") and line[4:].strip()]
    # --seed only makes the run repeatable (these answers were the same for seeds 0-10); the
    # demo runs from float weights, as for a user (tests/conftest.py turns that off)
    r = CliRunner().invoke(
        cli.app, ["chat", "demo", "--seed", "0"], input="\n".join(questions) + "\n",
        env={"COLUMNS": "100", "MLX_DEEPSEEK_SMALL_FLOAT": "1"},
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    # a terminal echoes what is typed after each prompt
    typed = iter(questions)
    printed = re.sub(r">>> ", lambda m: f">>> {next(typed, '')}\n", r.output)
    printed_lines = [line.rstrip() for line in printed.rstrip("\n").split("\n")]
    printed_lines = [">>>" if line == ">>>" else line for line in printed_lines]
    assert _records(printed_lines) == _records(shown)
