"""Fuzz: hostile chat templates and broken tokenizer folders give one line, never a hang.

Generated cases (issue 13, group 4): templates that loop, recurse, blow up strings, lists
or numbers, escape the sandbox or fail to parse; tokenizer folders with damaged or partial
files, remote-code tokenizers, unknown chat_template_type / tool_parser_type names. Each
case asserts a one-line CheckpointError and a bounded time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tiny_chat import build_deepseek_tokenizer

from mlx_deepseek.errors import CheckpointError
from mlx_deepseek.formats import ChatFormat, Limits, TemplateRenderError
from mlx_deepseek.loading import load_tokenizer

LIMITS = Limits(seconds=0.5, max_chars=200_000)
BUDGET = 5.0  # seconds a case may take, limits included

HOSTILE = {
    "nested loop 10^10": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "range 10^10": "{% for i in range(10**10) %}x{% endfor %}",
    "string times huge": "{{ 'a' * 10**10 }}",
    "list times huge": "{{ ([1] * 10**9) | length }}",
    "huge power": "{% set n = 10 %}{{ n ** (n ** n) }}",
    "ljust huge": "{{ 'a'.ljust(10**12) }}",
    "center filter huge": "{{ 'a' | center(10**11) }}",
    "doubling concat": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "doubling tilde": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "output flood": "{% for i in range(100000) %}{% for j in range(100) %}0123456789{% endfor %}"
    "{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "mutual recursion": "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}"
    "{% endmacro %}{{ a(1) }}",
    "class escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "format filter huge": "{{ '%0999999999d' | format(1) }}",
    "str.format huge": "{{ '{:0999999999}'.format(1) }}",
    "namespace dunder": "{% set ns = namespace(_x=1) %}{{ ns._x }}",
    "mutate messages": "{% set _ = messages.append(1) %}x",
    "dict update": "{% set _ = messages[0].update({'role': 'x'}) %}x",
    "raise_exception": "{{ raise_exception('refused by the template') }}",
    "undefined attr": "{{ messages[0].nothing.deeper }}",
    "index error": "{{ messages[99]['content'] }}",
    "type error": "{{ messages + 1 }}",
    "zero division": "{{ 1 // 0 }}",
    "syntax: unclosed if": "{% if true %}x",
    "syntax: bad tag": "{% frobnicate %}",
    "syntax: bad expr": "{{ 1 + }}",
    "unknown filter": "{{ 'x' | no_such_filter }}",
    "import": "{% import 'os' as os %}{{ os }}",
    "include": "{% include '/etc/passwd' %}",
    "while-like loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in "
    "range(1000) %}{% endfor %}{% endfor %}{% endfor %}",
    "format huge": "{{ '%0999999999d' % 1 }}",
    "join huge": "{{ (range(100000) | list) * 100000 }}",
    "non-string template": 12345,
}

MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_one_line_and_quick(name):
    fmt = ChatFormat("v3", HOSTILE[name], "checkpoint", 0.3, 0.95, False, LIMITS)
    t0 = time.monotonic()
    with pytest.raises(TemplateRenderError) as e:
        fmt.render(None, MSGS)
    took = time.monotonic() - t0
    assert took < BUDGET, f"{name} took {took:.1f} s"
    line = str(e.value)
    assert line.startswith("chat template") and "\n" not in line and len(line) < 400
    assert MSGS == [{"role": "user", "content": "hi"}]  # the caller's data is untouched


# the sandbox holds: these render nothing of Python's internals (or are refused)
ESCAPES = {
    "globals": "{{ raise_exception.__globals__ }}",
    "code": "{{ namespace.__init__.__code__ }}",
    "builtins": "{{ self.__init__.__globals__.__builtins__ }}",
    "config": "{{ config }}{{ request }}{{ settings }}",
    "cycler": "{{ cycler.__init__.__globals__.os }}",
    "mro": "{{ messages.__class__.__base__ }}",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_sandbox_escapes_see_nothing(name):
    fmt = ChatFormat("v3", ESCAPES[name], "checkpoint", 0.3, 0.95, False, LIMITS)
    try:
        out = fmt.render(None, MSGS)
    except TemplateRenderError as e:
        assert "\n" not in str(e)
    else:
        assert not any(w in out for w in ("module", "function", "class", "code", "dict", "<"))


# ---- tokenizer folders ---------------------------------------------------------------------


def _truncate(name: str, keep: float):
    def damage(p: Path) -> None:
        data = (p / name).read_bytes()
        (p / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def _write(name: str, data: bytes | str):
    def damage(p: Path) -> None:
        raw = data.encode() if isinstance(data, str) else data
        (p / name).write_bytes(raw)

    return damage


def _config(**fields):
    def damage(p: Path) -> None:
        config = json.loads((p / "tokenizer_config.json").read_text())
        config.update(fields)
        (p / "tokenizer_config.json").write_text(json.dumps(config))

    return damage


def _remove(*names: str):
    def damage(p: Path) -> None:
        for n in names:
            (p / n).unlink()

    return damage


BROKEN = {
    **{
        f"tokenizer.json truncated to {k:.0%}": _truncate("tokenizer.json", k)
        for k in (0.0, 0.1, 0.5, 0.97)
    },
    **{
        f"tokenizer_config.json truncated to {k:.0%}": _truncate("tokenizer_config.json", k)
        for k in (0.2, 0.6)
    },
    "tokenizer.json not UTF-8": _write("tokenizer.json", b"\xff\xfe\x00garbage"),
    "tokenizer.json a list": _write("tokenizer.json", "[1, 2, 3]"),
    "tokenizer.json wrong model": _write("tokenizer.json", json.dumps({"model": {"type": "Nope"}})),
    "tokenizer_config.json a string": _write("tokenizer_config.json", '"hello"'),
    "tokenizer_config.json not UTF-8": _write("tokenizer_config.json", b"\xc3\x28{}"),
    "no tokenizer files": _remove("tokenizer.json", "tokenizer_config.json"),
    "remote code only": lambda p: (
        _remove("tokenizer.json")(p),
        _config(
            auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
            tokenizer_class="EvilTokenizer",
        )(p),
    ),
    "unknown chat_template_type": _config(chat_template_type="no_such_template"),
    "chat_template_type path": _config(chat_template_type="../../os"),
    "chat_template_type dotted": _config(chat_template_type="os.path"),
    "chat_template_type number": _config(chat_template_type=7),
    "unknown tool_parser_type": _config(tool_parser_type="no_such_parser"),
    "tool_parser_type path": _config(tool_parser_type="..evil"),
    "tiktoken.model empty": _write("tiktoken.model", ""),
    "tiktoken.model garbage": _write("tiktoken.model", "%%%% not a rank file\n"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_tokenizer_folder_is_one_line(tmp_path, name):
    build_deepseek_tokenizer(tmp_path)
    BROKEN[name](tmp_path)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert time.monotonic() - t0 < BUDGET
    line = str(e.value)
    assert "\n" not in line and str(tmp_path) in line, line
