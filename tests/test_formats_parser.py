"""The streaming output parser on typed model outputs of every format: reasoning split from
content, tool calls (also inside reasoning) with valid JSON arguments, malformed calls
returned as content; the same events for every split of the text into two or three
chunks and for one character at a time."""

from __future__ import annotations

import json

import pytest

from mlx_deepseek.formats import OutputParser

TB, TE = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CB, CE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
D = "｜DSML｜"


def v3_call(name, args):
    return f"{CB}function{SEP}{name}\n```json\n{json.dumps(args)}\n```{CE}"


def v31_call(name, args):
    return f"{CB}{name}{SEP}{json.dumps(args)}{CE}"


def dsml(block, calls):
    invokes = []
    for name, params in calls:
        lines = [
            f'<{D}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else json.dumps(v)}</{D}parameter>"
            for k, v in params.items()
        ]
        invokes.append(f'<{D}invoke name="{name}">\n' + "\n".join(lines) + f"\n</{D}invoke>")
    return f"\n\n<{D}{block}>\n" + "\n".join(invokes) + f"\n</{D}{block}>"


def kimi(calls):
    body = "".join(
        f"<|tool_call_begin|>functions.{n}:{k}<|tool_call_argument_begin|>{json.dumps(a)}"
        "<|tool_call_end|>"
        for k, (n, a) in enumerate(calls)
    )
    return f"<|tool_calls_section_begin|>{body}<|tool_calls_section_end|>"


PARIS = {"city": "Paris", "days": 2}
NESTED = {"q": "x<y", "opts": {"deep": [1, 2, {"z": None}]}, "flag": True}

# (format, starts_in_reasoning, model output, expected (reasoning, content, calls))
CASES = {
    "r1 answer": (
        "v3",
        True,
        "Let me think.\n</think>\n\nThe answer is 4.",
        ("Let me think.\n", "\n\nThe answer is 4.", []),
    ),
    "v3 call": (
        "v3",
        False,
        f"Checking.{TB}{v3_call('get_weather', PARIS)}\n{v3_call('get_time', {})}{TE}",
        ("", "Checking.", [("get_weather", PARIS), ("get_time", {})]),
    ),
    "r1 call after reasoning": (
        "v3",
        True,
        f"need weather</think>{TB}{v3_call('get_weather', NESTED)}{TE}",
        ("need weather", "", [("get_weather", NESTED)]),
    ),
    "v3.1 call": (
        "v3.1",
        False,
        f"{TB}{v31_call('a', PARIS)}{v31_call('b', NESTED)}{TE}",
        ("", "", [("a", PARIS), ("b", NESTED)]),
    ),
    "v3.1 call inside reasoning": (
        "v3.1",
        True,
        f"I should look it up.{TB}{v31_call('search', {'q': 'mlx'})}{TE}",
        ("I should look it up.", "", [("search", {"q": "mlx"})]),
    ),
    "v3.2 dsml": (
        "dsml-v3.2",
        True,
        "plan</think>Sure." + dsml("function_calls", [("get_weather", PARIS), ("put", NESTED)]),
        ("plan", "Sure.", [("get_weather", PARIS), ("put", NESTED)]),
    ),
    "v4 dsml": (
        "dsml-v4",
        False,
        "On it." + dsml("tool_calls", [("lookup", {"ids": [1, 2], "name": "a b"})]),
        ("", "On it.", [("lookup", {"ids": [1, 2], "name": "a b"})]),
    ),
    "kimi": (
        "kimi",
        False,
        "<think>hmm</think>Calling." + kimi([("get_weather", PARIS), ("get_weather", NESTED)]),
        ("hmm", "Calling.", [("get_weather", PARIS), ("get_weather", NESTED)]),
    ),
    "malformed json is content": (
        "v3.1",
        False,
        f"ok {TB}{CB}f{SEP}{{not json}}{CE}{TE} done",
        ("", f"ok {TB}{CB}f{SEP}{{not json}}{CE}{TE} done", []),
    ),
    "junk in the section is content": (
        "v3",
        False,
        f"a{TB}hello there",
        ("", f"a{TB}hello there", []),
    ),
    "unterminated call is content": (
        "v3.1",
        False,
        f'x{TB}{CB}f{SEP}{{"a": 1',
        ("", f'x{TB}{CB}f{SEP}{{"a": 1', []),
    ),
    "bad dsml value is content": (
        "dsml-v3.2",
        False,
        f'<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="n" string="false">'
        f"oops</{D}parameter>\n</{D}invoke>\n</{D}function_calls>",
        (
            "",
            f'<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="n" string="false">'
            f"oops</{D}parameter>\n</{D}invoke>\n</{D}function_calls>",
            [],
        ),
    ),
    "no format: markup stays text": (None, False, f"a{TB}b", ("", f"a{TB}b", [])),
    "trailing whitespace kept": ("v3", False, "answer \n\n", ("", "answer \n\n", [])),
}


def run(fmt, in_reasoning, pieces):
    p = OutputParser(fmt, in_reasoning)
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    calls = [(e.name, json.loads(e.arguments), e.id) for e in events if e.kind == "tool_call"]
    assert (reasoning, content) == (p.reasoning, p.content)
    return reasoning, content, calls


def expected(case):
    reasoning, content, calls = case
    return reasoning, content, [(n, a) for n, a in calls]


@pytest.mark.parametrize("key", sorted(CASES))
def test_every_split_point_gives_the_same_events(key):
    fmt, in_reasoning, text, want = CASES[key]
    whole = run(fmt, in_reasoning, [text])
    assert (whole[0], whole[1], [(n, a) for n, a, _ in whole[2]]) == expected(want)
    for i in range(len(text) + 1):  # two chunks, every split
        assert run(fmt, in_reasoning, [text[:i], text[i:]]) == whole, i
    assert run(fmt, in_reasoning, list(text)) == whole  # one character at a time
    step = max(1, len(text) // 7)
    for i in range(0, len(text), step):  # three chunks
        for j in range(i, len(text), step):
            assert run(fmt, in_reasoning, [text[:i], text[i:j], text[j:]]) == whole


def test_ids_are_the_models_own_for_kimi_and_numbered_otherwise():
    _, _, calls = run("kimi", False, [kimi([("a", {}), ("b", {})])])
    assert [c[2] for c in calls] == ["functions.a:0", "functions.b:1"]
    text = f"{TB}{v31_call('a', {})}{v31_call('b', {})}{TE}"
    assert [c[2] for c in run("v3.1", False, [text])[2]] == ["call_0", "call_1"]


def test_an_answer_that_opens_with_think_is_reasoning():
    assert run("v3", False, ["  <thi", "nk>why</think>because"])[:2] == ("why", "because")
    assert run("v3", False, ["<th", "at is not a tag"])[:2] == ("", "<that is not a tag")


def test_dsml_string_false_values_are_json_and_string_true_values_are_text():
    text = dsml("function_calls", [("f", {"n": 3, "s": "3", "l": [1], "o": {"a": None}})])
    (_, _, [(name, args, _)]) = run("dsml-v3.2", False, [text])
    assert args == {"n": 3, "s": "3", "l": [1], "o": {"a": None}}
