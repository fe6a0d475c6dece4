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
from .usage import ClickException, Command, Group, UsageError, show_usage_error

app = typer.Typer(
    name="mlx-deepseek",
    help="Run DeepSeek's MoE/MLA language models locally with MLX.",
    cls=Group,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"mlx-deepseek {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version."
    ),
) -> None:
    State.debug = debug or os.environ.get("MLX_DEEPSEEK_DEBUG") == "1"


# Each command's body imports its heavy modules when it runs, so `--help` stays fast.
app.command("chat", cls=Command)(chat)
app.command("generate", cls=Command)(generate)
app.command("convert", cls=Command)(convert_command)
app.command("info", cls=Command)(info_command)
app.command("bench", cls=Command)(bench_command)
app.command("serve", cls=Command)(serve)


def main() -> None:
    """Console-script entry: user mistakes print one line and exit 1 (traceback with --debug);
    usage mistakes print the usage line and one line and exit 2."""
    from ..errors import DeepSeekError

    argv = sys.argv[1:]
    try:
        rc = app(args=argv, prog_name="mlx-deepseek", standalone_mode=False)
    except DeepSeekError as e:
        if State.debug or "--debug" in argv:
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):  # older typer turns Ctrl-C into Abort
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except UsageError as e:
        show_usage_error(e, typer.main.get_command(app), argv)
        sys.exit(e.exit_code)
    except ClickException as e:  # e.g. a file option that cannot be opened
        typer.secho(f"error: {e.format_message()}", err=True, fg=typer.colors.RED)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    if isinstance(rc, int) and rc != 0:  # typer 0.29 turns Ctrl-C into exit code 130
        if rc == 130:
            typer.secho("interrupted", err=True)
        sys.exit(rc)
