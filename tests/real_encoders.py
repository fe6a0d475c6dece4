# ruff: noqa: E501  (template text reads best unbroken)
"""Test data: transcriptions of DeepSeek's Python prompt encoders (DeepSeek-V3.2's
encoding/encoding_dsv32.py and DeepSeek-V4's encoding_dsv4.py), kept in their shape
(render_message(index, messages) per message, the same branch order and checks) and
written for these tests. mlx_deepseek.formats.dsml is written differently; the tests
compare the two character for character."""

from __future__ import annotations

import copy
import json

from mlx_deepseek.formats.dsml import _V4_TOOLS, _V32_TOOLS

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TS, TE, D = "<think>", "</think>", "｜DSML｜"


def _tools(template, tools):
    schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return template.format(d=D, ts=TS, te=TE, schemas=schemas)


def _params(arguments: str) -> str:
    out = []
    for k, v in json.loads(arguments).items():
        is_str = isinstance(v, str)
        value = v if is_str else json.dumps(v, ensure_ascii=False)
        out.append(
            f'<{D}parameter name="{k}" string="{"true" if is_str else "false"}">{value}</{D}parameter>'
        )
    return "\n".join(out)


def _calls(calls, block):
    items = [
        f'<{D}invoke name="{c["function"]["name"]}">\n{_params(c["function"]["arguments"])}\n</{D}invoke>'
        for c in calls
    ]
    return f"\n\n<{D}{block}>\n" + "\n".join(items) + f"\n</{D}{block}>"


def _last_user(messages):
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def v32_render_message(index, messages, mode):
    prompt, msg = "", messages[index]
    last = _last_user(messages)
    role, content = msg.get("role"), msg.get("content")
    if role == "system":
        prompt += content or ""
        if msg.get("tools"):
            prompt += "\n\n" + _tools(_V32_TOOLS, msg["tools"])
    elif role == "user":
        prompt += f"<｜User｜>{content}<｜Assistant｜>"
        prompt += TS if index == last and mode == "thinking" else TE
    elif role == "tool":
        prev = index - 1
        while prev >= 0 and messages[prev].get("role") == "tool":
            prev -= 1
        order = index - prev
        calls = messages[prev].get("tool_calls")
        assert calls and len(calls) >= order
        if order == 1:
            prompt += "\n\n<function_results>"
        prompt += f"\n<result>{content}</result>"
        if order == len(calls):
            prompt += "\n</function_results>"
            prompt += "\n\n" + (TS if index >= last and mode == "thinking" else TE)
    elif role == "assistant":
        calls = msg.get("tool_calls")
        tool_part = _calls(calls, "function_calls") if calls else ""
        think = ""
        if mode == "thinking" and index > last:
            think = (msg.get("reasoning_content") or "") + TE
        prompt += f"{think}{content or ''}{tool_part}{EOS}"
    return prompt


def encode_v32(messages, mode):
    full = copy.deepcopy(messages)
    if mode == "thinking":  # drop_thinking_messages
        last = _last_user(full)
        for i, m in enumerate(full):
            if m["role"] == "assistant" and i < last:
                m.pop("reasoning_content", None)
    return BOS + "".join(v32_render_message(i, full, mode) for i in range(len(full)))


def merge_tool_messages(messages):
    merged = []
    for msg in copy.deepcopy(messages):
        role = msg.get("role")
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1]:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            if merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1]:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append(
                    {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
                )
        else:
            merged.append(msg)
    return merged


def sort_tool_results(messages):
    order = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {tc["id"]: i for i, tc in enumerate(msg["tool_calls"]) if tc.get("id")}
        elif msg.get("role") == "user" and msg.get("content_blocks"):
            tools = [b for b in msg["content_blocks"] if b["type"] == "tool_result"]
            if len(tools) > 1 and order:
                ranked = iter(sorted(tools, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [
                    next(ranked) if b["type"] == "tool_result" else b for b in msg["content_blocks"]
                ]
    return messages


def v4_render_message(index, messages, mode, drop):
    prompt, msg = "", messages[index]
    last = _last_user(messages)
    role = msg.get("role")
    if role == "system":
        prompt += msg.get("content") or ""
        if msg.get("tools"):
            prompt += "\n\n" + _tools(_V4_TOOLS, msg["tools"])
    elif role == "user":
        prompt += "<｜User｜>"
        parts = []
        for b in msg.get("content_blocks") or []:
            parts.append(
                b["text"] if b["type"] == "text" else f"<tool_result>{b['content']}</tool_result>"
            )
        prompt += "\n\n".join(parts) if msg.get("content_blocks") else msg.get("content") or ""
    elif role == "assistant":
        calls = msg.get("tool_calls")
        tool_part = _calls(calls, "tool_calls") if calls else ""
        think = ""
        if mode == "thinking" and (not drop or index > last):
            think = (msg.get("reasoning_content") or "") + TE
        prompt += f"{think}{msg.get('content') or ''}{tool_part}{EOS}"
    if index + 1 < len(messages) and messages[index + 1].get("role") not in ("assistant",):
        return prompt
    if role == "user":
        prompt += "<｜Assistant｜>"
        if not drop and mode == "thinking":
            prompt += TS
        elif drop and mode == "thinking" and index >= last:
            prompt += TS
        else:
            prompt += TE
    return prompt


def encode_v4(messages, mode):
    messages = sort_tool_results(merge_tool_messages(messages))
    drop = not any(m.get("tools") for m in messages)
    return BOS + "".join(v4_render_message(i, messages, mode, drop) for i in range(len(messages)))
