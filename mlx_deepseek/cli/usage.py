"""How the CLI shows usage mistakes and flags, the same on every typer version it allows.

Older typer raises click's own exceptions; typer 0.29 raises the copies it vendors as
`typer._click`. Both have a `UsageError` (exit code 2) with the context of the command that
failed, which gives typer's usage line; we print that line and one `error:` line.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer that vendors click (0.29)
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # older typer: click itself
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

__all__ = ["ClickException", "Command", "Group", "UsageError", "show_usage_error"]


class _FlagsWithoutValue:
    """Flags take no value, so their help shows none (typer 0.29 prints `<bool>` for them,
    --help included); an empty metavar is what every typer version shows as nothing."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class Command(_FlagsWithoutValue, TyperCommand):
    pass


class Group(_FlagsWithoutValue, TyperGroup):
    pass


def _context_for(root: Any, argv: list[str]) -> Any:
    """The context of the command argv names (for errors raised without one, such as a
    missing option value with older typer)."""
    ctx = root.context_class(root, info_name="mlx-deepseek")
    name = next((a for a in argv if not a.startswith("-")), None)
    sub = getattr(root, "commands", {}).get(name)
    return sub.context_class(sub, info_name=name, parent=ctx) if sub is not None else ctx


def _flag_before(ctx: Any, argv: list[str], extra: str) -> str | None:
    """The flag written just before an unexpected argument (`--quiet true`), if any."""
    i = argv.index(extra) if extra in argv else -1
    if i < 1:
        return None
    for p in getattr(ctx.command, "params", []):
        if getattr(p, "is_flag", False) and argv[i - 1] in (*p.opts, *p.secondary_opts):
            return argv[i - 1]
    return None


def _message(e: UsageError, ctx: Any, argv: list[str]) -> str:
    message = e.format_message().strip().rstrip(".")
    if not argv or message.startswith("Missing command"):
        commands = ", ".join(getattr(ctx.command, "commands", {}))
        return f"no command given: choose one of {commands}"
    extra = re.search(r"unexpected extra arguments?(?:\(s\))? \(([^()]*)\)$", message)
    if extra:
        flag = _flag_before(ctx, argv, extra.group(1).split(" ")[0])
        if flag:
            value = extra.group(1).split(" ")[0]
            return f"{flag} is a flag and takes no value (got {value!r}): write {flag} alone"
    param = getattr(e, "param", None)
    if param is not None:  # name the value given, when the message does not already
        for opt in getattr(param, "opts", []):
            if opt in argv[:-1]:
                value = argv[argv.index(opt) + 1]
                if repr(value) not in message:
                    message += f" (got {value!r})"
                break
    return message


def show_usage_error(e: UsageError, root: Any, argv: list[str]) -> None:
    """typer's usage line for the failing command, then one `error:` line, on stderr."""
    ctx = getattr(e, "ctx", None) or _context_for(root, argv)
    hint = f"{ctx.command_path} --help"
    print(ctx.get_usage(), file=sys.stderr)
    typer.secho(f"error: {_message(e, ctx, argv)} (see {hint})", err=True, fg=typer.colors.RED)
