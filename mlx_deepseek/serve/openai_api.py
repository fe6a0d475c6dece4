"""OpenAI's /v1/chat/completions and /v1/completions, streamed as server-sent events or not.

DeepSeek's API semantics: reasoning comes apart in `reasoning_content` (message and stream
deltas), never inside `content`; tool calls come as `tool_calls` with JSON-text arguments;
usage counts the prompt tokens reused from the prefix cache in
`prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..generation import encode_prompt
from .chat import new_call_id
from .engine import Usage
from .output import Done, TokenLogprob, pieces
from .protocol import ChatRequest, CompletionRequest, RequestError
from .state import (
    Prepared,
    ServerState,
    check_model,
    check_token_ids,
    gen_params,
    logit_bias_ids,
    read_body,
    render_chat,
    submit,
    watched,
)


def routes(state: ServerState) -> list[Route]:
    async def chat(request: Request) -> Response:
        return await chat_completions(state, request)

    async def completions(request: Request) -> Response:
        return await text_completions(state, request)

    return [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


def usage_json(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def thinking_switch(req: ChatRequest) -> bool:
    kw = req.chat_template_kwargs
    if kw is None:
        return False
    for value in (kw.thinking, kw.enable_thinking):
        if value is not None:
            return value
    return False


def _sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def _logprob_json(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.bytes,
        "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in lp.top],
    }


def _error_payload(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def _head(state: ServerState, rid: str, kind: str) -> dict[str, Any]:
    """The fields every response and stream chunk starts with; kind: its "object"."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": state.model_id}


def _failure(done: Done | None) -> JSONResponse | None:
    """A 500 response when the generation failed, was cancelled or never finished; else None."""
    if done is None or done.finish_reason in ("error", "cancelled"):
        message = done.error if done and done.error else "the generation was interrupted"
        return JSONResponse(_error_payload(message), status_code=500)
    return None


def _stream_end(head: dict[str, Any], done: Done, last: str, include_usage: bool) -> list[str]:
    """A stream's last events: the error, or the `last` chunk, the usage chunk (when asked
    for) and [DONE]."""
    if done.finish_reason in ("error", "cancelled"):
        return [_sse(_error_payload(done.error or "the generation was interrupted"))]
    usage = {**head, "choices": [], "usage": usage_json(done.usage)}
    return [last, *([_sse(usage)] if include_usage else []), _sse("[DONE]")]


# ---- chat ----------------------------------------------------------------------------------


async def chat_completions(state: ServerState, request: Request) -> Response:
    req: ChatRequest = await read_body(state, request, ChatRequest)
    check_model(state, req.model)
    tools = None if req.tool_choice == "none" else req.tools
    text, prompt = render_chat(state, req.messages, tools, thinking_switch(req))
    max_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    params = gen_params(
        state,
        prompt,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        max_param=max_param,
        prompt_param="messages",
        sampling=_sampling(req),
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
        logit_bias=logit_bias_ids(state, req.logit_bias),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )
    prepared = Prepared(prompt, params, req.stop, state.adapter.parser(text), text)
    handle = submit(state, prepared)
    rid = "chatcmpl-" + uuid.uuid4().hex
    stream = pieces(handle, state.tokenizer, req.stop, prepared.parser, params.stop_ids)
    stream = watched(request, handle, stream)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _chat_stream(state, rid, stream, include_usage)
        return StreamingResponse(body, media_type="text/event-stream", headers=_NO_BUFFER)
    return await _chat_whole(state, rid, stream)


_NO_BUFFER = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sampling(req: Any) -> dict[str, Any]:
    return {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
    }


async def _chat_whole(state: ServerState, rid: str, stream: AsyncIterator) -> Response:
    reasoning, content, calls, logprobs = [], [], [], []
    done: Done | None = None
    async for item in stream:
        if isinstance(item, Done):
            done = item
            break
        if item.logprob is not None:
            logprobs.append(_logprob_json(item.logprob))
        for e in item.events:
            if e.kind == "reasoning":
                reasoning.append(e.text)
            elif e.kind == "content":
                content.append(e.text)
            else:
                calls.append(
                    {
                        "id": e.id or new_call_id(),
                        "type": "function",
                        "function": {"name": e.name, "arguments": e.arguments},
                    }
                )
    if (failed := _failure(done)) is not None:
        return failed
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": logprobs} if logprobs else None,
        "finish_reason": done.finish_reason,
    }
    head = _head(state, rid, "chat.completion")
    return JSONResponse({**head, "choices": [choice], "usage": usage_json(done.usage)})


async def _chat_stream(
    state: ServerState, rid: str, stream: AsyncIterator, include_usage: bool
) -> AsyncIterator[str]:
    head = _head(state, rid, "chat.completion.chunk")

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    n_calls = 0
    async for item in stream:
        if isinstance(item, Done):
            for event in _stream_end(head, item, chunk({}, item.finish_reason), include_usage):
                yield event
            return
        lp = {"content": [_logprob_json(item.logprob)]} if item.logprob is not None else None
        if not item.events and lp is not None:
            yield chunk({"content": ""}, logprobs=lp)
        for e in item.events:
            if e.kind == "tool_call":
                call = {
                    "index": n_calls,
                    "id": e.id or new_call_id(),
                    "type": "function",
                    "function": {"name": e.name, "arguments": e.arguments},
                }
                n_calls += 1
                yield chunk({"tool_calls": [call]}, logprobs=lp)
            elif e.text:
                key = "reasoning_content" if e.kind == "reasoning" else "content"
                yield chunk({key: e.text}, logprobs=lp)
            lp = None


# ---- completions ---------------------------------------------------------------------------


async def text_completions(state: ServerState, request: Request) -> Response:
    req: CompletionRequest = await read_body(state, request, CompletionRequest)
    check_model(state, req.model)
    if isinstance(req.prompt, str):
        with state.tokenizer_lock:  # raw text: BOS added unless present
            prompt = encode_prompt(state.tokenizer, req.prompt)
        prompt_text = req.prompt
    else:
        check_token_ids(state, req.prompt, "prompt")
        prompt = list(req.prompt)
        prompt_text = state.tokenizer.decode(prompt) if req.echo else ""
    if not prompt:
        raise RequestError("prompt: the prompt is empty", "prompt")
    params = gen_params(
        state,
        prompt,
        max_tokens=req.max_tokens,
        max_param="max_tokens",
        prompt_param="prompt",
        sampling=_sampling(req),
        logprobs=req.logprobs is not None,
        top_logprobs=req.logprobs or 0,
        logit_bias=logit_bias_ids(state, req.logit_bias),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )
    handle = submit(state, Prepared(prompt, params, req.stop, None))
    rid = "cmpl-" + uuid.uuid4().hex
    stream = watched(
        request, handle, pieces(handle, state.tokenizer, req.stop, None, params.stop_ids)
    )
    echo = prompt_text if req.echo else ""
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _completion_stream(state, rid, stream, echo, include_usage)
        return StreamingResponse(body, media_type="text/event-stream", headers=_NO_BUFFER)
    text, lps, done = [echo], [], None
    async for item in stream:
        if isinstance(item, Done):
            done = item
            break
        text.extend(e.text for e in item.events)
        if item.logprob is not None:
            lps.append(item.logprob)
    if (failed := _failure(done)) is not None:
        return failed
    choice = {
        "index": 0,
        "text": "".join(text),
        "logprobs": _completion_logprobs(lps) if req.logprobs is not None else None,
        "finish_reason": done.finish_reason,
    }
    head = _head(state, rid, "text_completion")
    return JSONResponse({**head, "choices": [choice], "usage": usage_json(done.usage)})


def _completion_logprobs(lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t: v for t, v, _ in lp.top} for lp in lps],
        "text_offset": offsets,
    }


async def _completion_stream(
    state: ServerState, rid: str, stream: AsyncIterator, echo: str, include_usage: bool
) -> AsyncIterator[str]:
    head = _head(state, rid, "text_completion")

    def chunk(text: str, finish: str | None = None, lp: Any = None) -> str:
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    if echo:
        yield chunk(echo)
    async for item in stream:
        if isinstance(item, Done):
            for event in _stream_end(head, item, chunk("", item.finish_reason), include_usage):
                yield event
            return
        text = "".join(e.text for e in item.events)
        lp = _completion_logprobs([item.logprob]) if item.logprob is not None else None
        if text or lp:
            yield chunk(text, lp=lp)
