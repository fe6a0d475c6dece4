"""DeepSeek V3.2 / V4 encoders vs transcriptions of DeepSeek's own encoders
(tests/real_encoders.py) on typed conversations of every message kind, thinking on and
off; families picked by model_type; tool calls rendered by the encoder parse back."""

from __future__ import annotations

import copy
import json

import pytest
import real_encoders as real

from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.formats import chat_format

BOS, EOS = real.BOS, real.EOS
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def call(i, name, args):
    return {
        "id": f"c{i}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


C1, C2 = call(1, "get_weather", {"city": "Paris", "days": 2}), call(2, "get_time", {"tz": ["CET"]})
CONVS = {
    "single": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "turns": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
        {"role": "user", "content": "u3"},
    ],
    "tools pending": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "weather and time?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "need tools",
            "tool_calls": [C1, C2],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "tool", "content": "noon", "tool_call_id": "c2"},
    ],
    "tools answered": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "r", "tool_calls": [C1]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "got it"},
        {"role": "user", "content": "thanks"},
    ],
}


def with_tools_on_system(messages, tools):
    msgs = copy.deepcopy(messages)
    if msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": ""})
    msgs[0]["tools"] = tools
    return msgs


@pytest.mark.parametrize("family, oracle", [("v3.2", real.encode_v32), ("v4", real.encode_v4)])
@pytest.mark.parametrize("key", sorted(CONVS))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("tools", [None, [TOOL]])
def test_encoder_equals_deepseeks(family, oracle, key, thinking, tools):
    model_type = {"v3.2": "deepseek_v32", "v4": "deepseek_v4"}[family]
    fmt = chat_format(None, {"model_type": model_type})
    assert (fmt.family, fmt.source, fmt.template) == (family, f"encoder {family}", None)
    msgs = CONVS[key]
    want = oracle(
        with_tools_on_system(msgs, tools) if tools else msgs, "thinking" if thinking else "chat"
    )
    assert fmt.render(None, msgs, thinking=thinking, tools=tools) == want


def test_v32_readme_example():
    """The example in DeepSeek-V3.2's README (thinking mode, history reasoning dropped)."""
    msgs = [
        {"role": "user", "content": "hello"},
        {
            "role": "assistant",
            "content": "Hello! I am DeepSeek.",
            "reasoning_content": "thinking...",
        },
        {"role": "user", "content": "1+1=?"},
    ]
    fmt = chat_format(None, {"model_type": "deepseek_v32"})
    assert fmt.render(None, msgs, thinking=True) == (
        f"{BOS}<｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.{EOS}"
        "<｜User｜>1+1=?<｜Assistant｜><think>"
    )


def test_v4_thinking_switch_and_results_in_the_user_turn():
    fmt = chat_format(None, {"model_type": "deepseek_v4"})
    assert fmt.has_thinking_switch and (fmt.temperature, fmt.top_p) == (1.0, 1.0)
    q = [{"role": "user", "content": "q"}]
    assert fmt.render(None, q, thinking=True) == f"{BOS}<｜User｜>q<｜Assistant｜><think>"
    assert fmt.render(None, q) == f"{BOS}<｜User｜>q<｜Assistant｜></think>"
    # results come back in the order of the calls, as <tool_result> blocks of one user turn
    msgs = CONVS["tools pending"][:3] + CONVS["tools pending"][3:][::-1]
    text = fmt.render(None, msgs)
    assert text.endswith(
        "<｜User｜><tool_result>sunny</tool_result>\n\n<tool_result>noon</tool_result>"
        "<｜Assistant｜></think>"
    )


def test_tool_calls_rendered_by_the_encoders_parse_back():
    for model_type in ("deepseek_v32", "deepseek_v4"):
        fmt = chat_format(None, {"model_type": model_type})
        turn = [{"role": "user", "content": "q"}]
        prompt = fmt.render(None, turn, thinking=True)
        full = fmt.render(
            None, turn + [CONVS["tools pending"][2]], add_generation_prompt=False, thinking=True
        )
        answer = full[len(prompt) :].removesuffix(EOS)
        parser = fmt.output_parser(starts_in_reasoning=True)
        events = parser.feed(answer) + parser.finish()
        calls = [(e.name, json.loads(e.arguments)) for e in events if e.kind == "tool_call"]
        assert calls == [
            ("get_weather", {"city": "Paris", "days": 2}),
            ("get_time", {"tz": ["CET"]}),
        ]
        assert parser.reasoning == "need tools" and parser.content == ""


def test_a_tool_result_without_a_call_is_one_line():
    fmt = chat_format(None, {"model_type": "deepseek_v32"})
    with pytest.raises(DeepSeekError, match=r"messages\[1\]: a tool result without"):
        fmt.render(None, [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}])


@pytest.mark.parametrize("model_type", ["kimi_k2", "kimi_k25"])
def test_kimi_model_types_get_kimi_formats(model_type):
    fmt = chat_format(None, {"model_type": model_type})
    assert fmt.family.startswith("kimi") and fmt.source.startswith("built-in kimi")
    text = fmt.render(None, [{"role": "user", "content": "hi"}])
    assert text.endswith(
        "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
