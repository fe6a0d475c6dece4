"""The `mlx-deepseek` command line: one typer app; each command lives in its own module."""

from __future__ import annotations

import os
import sys

import typer

from .bench import bench_command
from .chat import chat
from .convert import convert_command
from .generate import generate
from .info import info_command
from .options import State
from .serve import serve

app = typer.Typer(
    name="mlx-deepseek",
    help="Run DeepSeek's MoE/MLA language models locally with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    State.debug = debug or os.environ.get("MLX_DEEPSEEK_DEBUG") == "1"


# Each command's body imports its heavy modules when it runs, so `--help` stays fast.
app.command("chat")(chat)
app.command("generate")(generate)
app.command("convert")(convert_command)
app.command("info")(info_command)
app.command("bench")(bench_command)
app.command("serve")(serve)


def main() -> None:
    """Console-script entry: user mistakes print one line and exit 1 (traceback with --debug)."""
    from ..errors import DeepSeekError

    try:
        rc = app(standalone_mode=False)
    except DeepSeekError as e:
        if State.debug or "--debug" in sys.argv:
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
    if isinstance(rc, int) and rc != 0:  # typer turns Ctrl-C into exit code 130
        if rc == 130:
            typer.secho("interrupted", err=True)
        sys.exit(rc)
