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
    usage mistakes print the usage line and one line and exit 2.

    In a distributed run (--parallel) a rank that ends tells the others; ranks other than 0
    print nothing (rank 0 reports for them), and a collective that fails because another rank
    went away ends every rank with one line naming it."""
    from ..errors import DeepSeekError

    argv = sys.argv[1:]
    try:
        rc = app(args=argv, prog_name="mlx-deepseek", standalone_mode=False)
    except DeepSeekError as e:
        if _rank_ends(1, str(e)) and not State.debug:
            sys.exit(1)
        if State.debug or "--debug" in argv:
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):  # older typer turns Ctrl-C into Abort
        _rank_ends(130, "interrupted")
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except UsageError as e:
        if not _rank_ends(e.exit_code, e.format_message()):
            show_usage_error(e, typer.main.get_command(app), argv)
        sys.exit(e.exit_code)
    except ClickException as e:  # e.g. a file option that cannot be opened
        if not _rank_ends(e.exit_code, e.format_message()):
            typer.secho(f"error: {e.format_message()}", err=True, fg=typer.colors.RED)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        _rank_ends(e.exit_code, "")
        sys.exit(e.exit_code)
    except Exception as e:
        _peer_lost(e)  # a collective failed because another rank went away (no return)
        _rank_ends(1, f"{type(e).__name__}: {e}")
        raise
    if isinstance(rc, int) and rc != 0:  # typer 0.29 turns Ctrl-C into exit code 130
        _rank_ends(rc, "interrupted" if rc == 130 else "")
        if rc == 130:
            typer.secho("interrupted", err=True)
        sys.exit(rc)
    _rank_ends(0, "")


def _rank_ends(code: int, message: str) -> bool:
    """In a distributed run, tell the other ranks this one ends (rank 0 has printed or will
    print its reason; another rank's reason goes to rank 0, which prints it). True on a rank
    other than 0."""
    world = _world()
    if world is None:
        return False
    world.end(code, message, reported=world.leader)
    return not world.leader


def _peer_lost(error: BaseException) -> None:
    """A collective failed because another rank went away: name it, end every rank."""
    world = _world()
    if world is not None:
        from ..distributed import is_peer_error

        if is_peer_error(error):
            world.peer_lost(error)


def _world():
    """The distributed World when this process is a rank (without importing MLX otherwise)."""
    module = sys.modules.get("mlx_deepseek.distributed.world")
    return module.current() if module is not None else None
