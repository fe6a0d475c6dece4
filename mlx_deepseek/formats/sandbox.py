"""Rendering untrusted Jinja chat templates: sandboxed, with a time, size and memory budget.

A checkpoint's `chat_template` is code from a stranger. It runs in Jinja's
ImmutableSandboxedEnvironment (as transformers renders it: no attribute escapes, no
mutation of the caller's data) with the same globals and filters transformers offers
(`raise_exception`, `strftime_now`, `tojson`, `namespace`, loop controls), plus limits the
sandbox lacks:

- time: a profile hook on the rendering thread stops a template that runs longer than
  `Limits.seconds` (a loop of 10**10 iterations is an error, not a hang);
- size: the output is produced in chunks and refused past `Limits.max_chars`; `+`, `*`
  and `**` are checked before they build a string, list or number beyond that size, and
  so are integer arguments of any call (`'a'.ljust(10**12)`);
- memory: the process's peak resident size may not grow by more than `Limits.max_rss_mb`
  while the template renders (the last guard for what the checks above cannot see).

Every failure is a `TemplateRenderError` (a CheckpointError) with one line.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.filters
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlx_deepseek.errors import CheckpointError


class TemplateRenderError(CheckpointError):
    """A chat template failed to compile or render, or went over a limit."""


@dataclass(frozen=True)
class Limits:
    seconds: float = 5.0  # wall time for one render
    max_chars: int = 32 * 1024 * 1024  # rendered text (a 1M-token prompt is ~4M chars)
    max_rss_mb: int = 2048  # growth of the process's peak resident memory while rendering


DEFAULT_LIMITS = Limits()
_CHECK_EVERY = 256  # profile events between clock reads


class _Stop(Exception):
    """Raised from inside the template to stop it (time or memory)."""


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False
) -> str:
    # transformers' tojson: no HTML escaping, json.dumps' options exposed
    if separators is not None:
        separators = tuple(separators)
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names (as transformers' does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


_WIDTH = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDTH.search(fmt):
        raise jinja2.exceptions.SecurityError("format width or precision too large")


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_format(value)
    return jinja2.filters.do_format(value, *args, **kwargs)


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with arithmetic and calls that cannot build giant objects."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.max_chars = max_chars
        self.filters["tojson"] = _tojson
        self.filters["format"] = _format_filter
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals["namespace"] = _Namespace

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        cap = self.max_chars
        if operator == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None and a + b > cap:
                raise jinja2.exceptions.SecurityError(f"'+' would build {a + b} items")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                size = _size(seq)
                if size is not None and isinstance(n, int) and size * n > cap:
                    raise jinja2.exceptions.SecurityError(f"'*' would build {size * n} items")
        elif operator == "%":  # printf-style formatting: a width can build a giant string
            _check_format(left)
        elif (
            operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float))
        ):
            if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > 4096:
                raise jinja2.exceptions.SecurityError("'**' result too large")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if getattr(__obj, "__name__", "") in ("format", "format_map"):
            # the sandbox hands out str.format wrapped (functools.update_wrapper): the
            # format string is the wrapped method's __self__
            bound = getattr(__obj, "__wrapped__", __obj)
            _check_format(getattr(bound, "__self__", None))
        for value in (*args, *kwargs.values()):
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and abs(value) > __self.max_chars
            ):
                raise jinja2.exceptions.SecurityError(f"call argument {value} is too large")
        return super().call(__context, __obj, *args, **kwargs)


@functools.lru_cache(maxsize=32)
def _compile(source: str, max_chars: int) -> jinja2.Template:
    return _Environment(max_chars).from_string(source)


def compile_template(source: str, limits: Limits = DEFAULT_LIMITS, what: str = "chat template"):
    """Compile once (cached); a syntax error is a TemplateRenderError naming its line."""
    if not isinstance(source, str):
        raise TemplateRenderError(f"{what}: expected text, got {type(source).__name__}")
    if len(source) > limits.max_chars:
        raise TemplateRenderError(f"{what}: {len(source)} characters is too long to be a template")
    try:
        return _compile(source, limits.max_chars)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateRenderError(f"{what}: syntax error on line {e.lineno}: {e.message}") from None
    except Exception as e:  # noqa: BLE001 (anything the parser raises is the template's fault)
        raise TemplateRenderError(f"{what}: cannot compile it ({type(e).__name__}: {e})") from None


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # pragma: no cover (Windows)
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def render(
    source: str,
    context: Mapping[str, Any],
    limits: Limits = DEFAULT_LIMITS,
    what: str = "chat template",
) -> str:
    """Render `source` with `context` in the sandbox, within `limits`."""
    template = compile_template(source, limits, what)
    deadline = time.monotonic() + limits.seconds
    rss_cap = _peak_rss_mb() + limits.max_rss_mb
    events = 0
    reason: list[str] = []

    def hook(frame: Any, event: str, arg: Any) -> None:
        nonlocal events
        events += 1
        if events % _CHECK_EVERY:
            return
        if time.monotonic() > deadline:
            reason.append(f"ran longer than {limits.seconds:g} s")
        elif events % (_CHECK_EVERY * 64) == 0 and _peak_rss_mb() > rss_cap:
            reason.append(f"used more than {limits.max_rss_mb} MB of memory")
        else:
            return
        sys.setprofile(None)
        raise _Stop

    parts: list[str] = []
    size = 0
    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > limits.max_chars:
                reason.append(f"wrote more than {limits.max_chars} characters")
                raise _Stop
            parts.append(chunk)
    except _Stop:
        raise TemplateRenderError(f"{what} stopped: it {reason[0]}") from None
    except RecursionError:
        raise TemplateRenderError(f"{what} failed: it recursed too deeply") from None
    except MemoryError:
        raise TemplateRenderError(f"{what} failed: out of memory") from None
    except jinja2.exceptions.TemplateError as e:
        raise TemplateRenderError(f"{what} failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 (a template can raise anything; report it in one line)
        raise TemplateRenderError(f"{what} failed: {type(e).__name__}: {e}") from None
    finally:
        sys.setprofile(previous)
    return "".join(parts)
