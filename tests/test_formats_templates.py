"""Built-in chat formats vs transcriptions of DeepSeek's and Moonshot's real templates
(tests/real_templates.py), rendered by transformers' own renderer, character for
character; family detection from the template text; the checkpoint's own template
rendered by our sandbox exactly as transformers renders it."""

from __future__ import annotations

import copy
import json

import pytest
from real_templates import REAL
from tiny_chat import tokenizer_only
from transformers.utils.chat_template_utils import render_jinja_template

from mlx_deepseek.formats import BUILTIN_TEMPLATES, FAMILIES, ChatFormat, chat_format
from mlx_deepseek.formats.chat import _deep_sorted

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
SPECIALS = {"bos_token": BOS, "eos_token": EOS}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def call(k: int, name: str, args: dict) -> dict:
    return {
        "id": f"functions.{name}:{k}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
    }


C1, C2 = call(0, "get_weather", {"city": "Paris"}), call(1, "get_time", {"tz": "CET"})

# typed examples of every message kind; content None on tool-call turns as OpenAI sends it
CONVERSATIONS = {
    "plain": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "thinking aloud</think>Hello!"},
        {"role": "user", "content": "2+2?"},
    ],
    "several systems": [
        {"role": "system", "content": "S1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ],
    "reasoning_content": [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because.", "reasoning_content": "let me see"},
        {"role": "user", "content": "Sure?"},
    ],
    "one tool round": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [C1]},
        {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": C1["id"]},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks, and tomorrow?"},
    ],
    "two calls, ends with results": [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": [C1, C2]},
        {"role": "tool", "content": "sunny", "tool_call_id": C1["id"]},
        {"role": "tool", "content": "12:00", "tool_call_id": C2["id"]},
    ],
    "call with text": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [C1]},
        {"role": "tool", "content": "sunny", "tool_call_id": C1["id"]},
    ],
    "ends with assistant": [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
    ],
    "only system": [{"role": "system", "content": "S"}],
}
WITH_TOOLS = {"one tool round", "two calls, ends with results", "call with text"}


def real(name: str, messages, add_generation_prompt=True, tools=None, **kw) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=REAL[name],
        add_generation_prompt=add_generation_prompt,
        **SPECIALS,
        **kw,
    )
    return rendered[0]


def builtin(family: str, messages, add_generation_prompt=True, thinking=False, tools=None):
    fmt = ChatFormat(family, BUILTIN_TEMPLATES[family], "built-in", 0.5, 0.9, True)
    return fmt.render(tokenizer_only(), messages, add_generation_prompt, thinking, tools)


def no_none(messages):
    """R1-0528's template tests '</think>' in content, which fails on None: send ''."""
    out = copy.deepcopy(messages)
    for m in out:
        if m.get("content") is None:
            m["content"] = ""
    return out


# (built-in family, real template, conversations where they must agree)
ALL = set(CONVERSATIONS)
PLAIN = ALL - WITH_TOOLS
CASES = [
    ("v2", "V2-Chat", PLAIN),
    ("v2.5", "V2.5", PLAIN | {"two calls, ends with results"}),
    ("v3", "V3-0324", ALL),
    ("v3", "V3 (Dec 2024)", PLAIN),
    ("r1", "R1 (Feb 2025)", ALL),
    ("r1-0528", "R1-0528", ALL),
    ("v3.1", "V3.1 (later)", ALL),
    ("v3.1", "V3.1 (Aug 2025)", PLAIN - {"ends with assistant", "only system"}),
    ("kimi", "Kimi-K2-Instruct", ALL),
    ("kimi-thinking", "Kimi-K2-Thinking", ALL),
]


# V3 of Dec 2024 writes the Assistant marker with the generation prompt, V3-0324 (the
# built-in) after each user turn: the same text once the prompt asks for an answer.
RUNS = [(*c, gen) for c in CASES for gen in (True, False) if gen or c[1] != "V3 (Dec 2024)"]


@pytest.mark.parametrize(
    "family, name, convs, gen", RUNS, ids=[f"{r[0]}~{r[1]}-{r[3]}" for r in RUNS]
)
def test_builtin_equals_the_real_template(family, name, convs, gen):
    for key in sorted(convs):
        msgs = CONVERSATIONS[key]
        if family == "r1-0528":
            msgs = no_none(msgs)
        for thinking in (False, True) if family == "v3.1" else (False,):
            want = real(name, msgs, gen, thinking=thinking)
            got = builtin(family, msgs, gen, thinking)
            assert got == want, (key, thinking)


def test_kimi_tools_are_declared_sorted_and_compact_as_moonshot_renders_them():
    tools = [WEATHER]
    msgs = CONVERSATIONS["one tool round"]
    for family, name in (("kimi", "Kimi-K2-Instruct"), ("kimi-thinking", "Kimi-K2-Thinking")):
        want = real(name, msgs, tools=_deep_sorted(tools))
        assert builtin(family, msgs, tools=tools) == want
    head = builtin("kimi", msgs, tools=tools).split("<|im_end|>")[0]
    assert head == "<|im_system|>tool_declare<|im_middle|>" + json.dumps(
        _deep_sorted(tools), separators=(",", ":")
    )


def test_what_each_family_does_with_several_system_messages():
    msgs = CONVERSATIONS["several systems"]
    assert builtin("v2.5", msgs).startswith(f"{BOS}S2{U}")  # V2.5 keeps the last
    assert real("R1-Distill", msgs).startswith(f"{BOS}S2{U}")  # and so does R1-Distill
    for family in ("v3", "r1", "r1-0528", "v3.1"):
        assert builtin(family, msgs).startswith(f"{BOS}S1\n\nS2{U}")
    assert builtin("v2", msgs).startswith(f"{BOS}S1\n\nS2\n\nUser: ")


def test_r1_generation_prompts_by_release():
    msgs = [{"role": "user", "content": "q"}]
    assert real("R1 (Jan 2025)", msgs).endswith(f"{U}q{A}")
    assert real("R1-0528", msgs).endswith(f"{U}q{A}")
    assert real("R1 (Feb 2025)", msgs).endswith(f"{U}q{A}<think>\n")
    assert builtin("r1-0528", msgs).endswith(f"{U}q{A}")
    assert builtin("r1", msgs).endswith(f"{A}<think>\n")
    fmt = chat_format(tokenizer_only(REAL["R1 (Jan 2025)"]), {"model_type": "deepseek_v3"})
    assert fmt.render(tokenizer_only(), msgs) == f"{BOS}{U}q{A}"


def test_later_v31_template_ends_assistant_and_system_only_conversations():
    for key in ("ends with assistant", "only system"):
        msgs = CONVERSATIONS[key]
        early, later = real("V3.1 (Aug 2025)", msgs), real("V3.1 (later)", msgs)
        assert later == early + f"{A}</think>"  # the later template opens the next answer
        assert builtin("v3.1", msgs) == later
        assert builtin("v3.1", msgs, thinking=True) == early + f"{A}<think>"
    prefix = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "So", "prefix": True},
    ]
    assert builtin("v3.1", prefix, thinking=True) == f"{BOS}{U}u{A}<think>So{EOS}"
    assert builtin("v3.1", prefix, thinking=True) == real("V3.1 (later)", prefix, thinking=True)


def test_v25_closes_a_single_call_where_deepseeks_template_forgets_to():
    msgs = CONVERSATIONS["one tool round"]
    ours, theirs = builtin("v2.5", msgs), real("V2.5", msgs)
    close = "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
    assert close not in theirs and ours.count(close) == 1
    assert ours.replace(close, "", 1) == theirs


def test_v31_tools_prompt_is_the_model_cards_layout():
    """The layout DeepSeek's V3.1 model card documents (system, blank line, tools)."""
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q"}]
    text = builtin("v3.1", msgs, tools=[WEATHER])
    params = json.dumps(WEATHER["function"]["parameters"])
    assert text.startswith(
        f"{BOS}SYS\n\n## Tools\nYou have access to the following tools:\n\n"
        f"### get_weather\nDescription: Weather of a city\n\nParameters: {params}\n\n"
        "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>"
        "tool_call_arguments<｜tool▁call▁end｜>{additional_tool_calls}<｜tool▁calls▁end｜>\n\n"
    )
    assert text.endswith(f"chain them directly without separators or spaces{U}q{A}</think>")


@pytest.mark.parametrize(
    "name, family",
    [
        ("V2-Chat", "v2"),
        ("V2.5", "v2.5"),
        ("V3 (Dec 2024)", "v3"),
        ("V3-0324", "v3"),
        ("R1 (Jan 2025)", "r1"),
        ("R1 (Feb 2025)", "r1"),
        ("R1-0528", "r1-0528"),
        ("R1-Distill", "r1"),
        ("V3.1 (Aug 2025)", "v3.1"),
        ("V3.1 (later)", "v3.1"),
        ("Kimi-K2-Instruct", "kimi"),
        ("Kimi-K2-Thinking", "kimi-thinking"),
    ],
)
def test_family_comes_from_the_template_not_the_folder_name(name, family):
    tok = tokenizer_only(REAL[name])
    fmt = chat_format(tok, {"model_type": "deepseek_v3"}, "my-model")
    assert fmt.family == family and fmt.source == "checkpoint"
    assert (fmt.temperature, fmt.top_p) == (FAMILIES[family].temperature, FAMILIES[family].top_p)
    assert fmt.has_thinking_switch == (family == "v3.1")


def test_r1_in_a_folder_named_my_model_samples_like_r1():
    fmt = chat_format(
        tokenizer_only(REAL["R1 (Jan 2025)"]), {"model_type": "deepseek_v3"}, "my-model"
    )
    assert fmt.family == "r1" and fmt.temperature == 0.6


@pytest.mark.parametrize("name", sorted(REAL))
def test_the_checkpoints_template_renders_as_transformers_renders_it(name):
    tok = tokenizer_only(REAL[name])
    fmt = chat_format(tok, {"model_type": "deepseek_v3"})
    for key, msgs in CONVERSATIONS.items():
        msgs = no_none(msgs)  # transformers 5's apply_chat_template drops None fields
        want = tok._tokenizer.apply_chat_template(
            msgs,
            tokenize=False,
            add_generation_prompt=True,
            **({"thinking": False, "enable_thinking": False} if fmt.has_thinking_switch else {}),
        )
        assert fmt.render(tok, msgs) == want, key
