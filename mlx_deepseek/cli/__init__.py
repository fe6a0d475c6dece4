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
    """Console-script entry: user mistakes print one line and exit 1 (traceback with --debug).

    In a distributed run (--parallel) a rank that ends tells the others; ranks other than 0
    print nothing (rank 0 reports for them), and a collective that fails because another rank
    went away ends every rank with one line naming it."""
    from ..errors import DeepSeekError

    try:
        rc = app(standalone_mode=False)
    except DeepSeekError as e:
        if _rank_ends(1, str(e)) and not State.debug:
            sys.exit(1)
        if State.debug or "--debug" in sys.argv:
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except KeyboardInterrupt:
        _rank_ends(130, "interrupted")
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors and the like
        import click

        _peer_lost(e)
        if isinstance(e, click.exceptions.Exit):
            _rank_ends(e.exit_code, "")
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            _rank_ends(e.exit_code, e.format_message())
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            _rank_ends(130, "interrupted")
            sys.exit(130)
        _rank_ends(1, f"{type(e).__name__}: {e}")
        raise
    if isinstance(rc, int) and rc != 0:  # typer turns Ctrl-C into exit code 130
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
