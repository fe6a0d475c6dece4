"""Helpers for the bench's tests: one `mlx-deepseek bench` CLI run, checked and read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from mlx_deepseek.cli import app


def quick(shape: str, contexts: list[int], prompt_tokens: int) -> list[str]:
    """Options for a short measured run: 2 decode tokens, 2 repeats at each context."""
    contexts_arg = ",".join(map(str, contexts))
    return ["--shape", shape, "--prompt-tokens", str(prompt_tokens), "--decode-tokens", "2",
            "--repeats", "2", "--contexts", contexts_arg, "--bandwidth-gb", "0.05"]  # fmt: skip


def run_bench(args: list[str], out: Path, cache_dir: Path) -> tuple[Any, dict[str, Any]]:
    """`mlx-deepseek bench ARGS --cache-dir CACHE_DIR --json OUT` in a wide terminal; it must
    exit 0: (the CLI result, the JSON it wrote)."""
    args = ["bench", *args, "--cache-dir", str(cache_dir), "--json", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())
