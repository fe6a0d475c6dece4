"""Ollama's API, so Ollama clients work unchanged: /api/chat, /api/generate (streamed as
newline-delimited JSON by default, or one object with "stream": false), /api/tags,
/api/show, /api/version. Reasoning goes in `thinking` (the `think` switch turns it on for
models that have one); tool calls in `message.tool_calls` with arguments as objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from .chat import Event
from .output import Done, pieces
from .protocol import (
    Message,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    OllamaShowRequest,
    RequestError,
)
from .state import (
    Prepared,
    ServerState,
    check_auth,
    check_model,
    gen_params,
    read_body,
    render_chat,
    submit,
    watched,
)


def routes(state: ServerState) -> list[Route]:
    async def chat(request: Request) -> Response:
        req = await read_body(state, request, OllamaChatRequest)
        check_model(state, req.model)
        text, prompt = render_chat(state, req.messages, req.tools, bool(req.think))
        return await _run(state, request, req, prompt, text, chat=True)

    async def generate(request: Request) -> Response:
        req = await read_body(state, request, OllamaGenerateRequest)
        check_model(state, req.model)
        if req.images:
            raise RequestError("this model reads text only: images are not supported", "images")
        if not req.prompt:  # Ollama: an empty prompt loads the model and returns at once
            return JSONResponse(
                _base(state) | {"response": "", "done": True, "done_reason": "load"}
            )
        if req.raw:
            text, prompt = req.prompt, state.encode(req.prompt)
        else:
            messages = [Message(role="user", content=req.prompt)]
            if req.system:
                messages.insert(0, Message(role="system", content=req.system))
            text, prompt = render_chat(state, messages, None, bool(req.think), "prompt")
        return await _run(state, request, req, prompt, text, chat=False)

    async def tags(request: Request) -> Response:
        check_auth(state, request)
        return JSONResponse({"models": [_model_entry(state)]})

    async def show(request: Request) -> Response:
        req = await read_body(state, request, OllamaShowRequest)
        check_model(state, req.model or req.name)
        return JSONResponse(_show(state))

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def ps(request: Request) -> Response:
        check_auth(state, request)
        return JSONResponse({"models": [_model_entry(state)]})

    return [
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
    ]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _base(state: ServerState) -> dict[str, Any]:
    return {"model": state.model_id, "created_at": _now()}


def _options(opts: OllamaOptions | None) -> tuple[dict[str, Any], int | None, list[str]]:
    o = opts or OllamaOptions()
    sampling = {
        "temperature": o.temperature,
        "top_p": o.top_p,
        "top_k": o.top_k,
        "min_p": o.min_p,
        "repetition_penalty": o.repeat_penalty,
        "seed": o.seed,
    }
    if o.repeat_last_n:
        sampling["repetition_context_size"] = o.repeat_last_n
    limit = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    return sampling, limit, o.stop


async def _run(
    state: ServerState,
    request: Request,
    req: Any,
    prompt: list[int],
    text: str,
    chat: bool,
) -> Response:
    sampling, limit, stops = _options(req.options)
    o = req.options or OllamaOptions()
    params = gen_params(
        state,
        prompt,
        max_tokens=limit,
        max_param="options.num_predict",
        prompt_param="messages" if chat else "prompt",
        sampling=sampling,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
    )
    parser = state.adapter.parser(text)
    handle = submit(state, Prepared(prompt, params, stops, parser, text))
    stream = watched(
        request, handle, pieces(handle, state.tokenizer, stops, parser, params.stop_ids)
    )
    started = time.perf_counter_ns()
    if req.stream:
        body = _ndjson(state, stream, chat, started)
        return StreamingResponse(body, media_type="application/x-ndjson")
    thinking, content, calls = [], [], []
    done: Done | None = None
    async for item in stream:
        if isinstance(item, Done):
            done = item
            break
        for e in item.events:
            _collect(e, thinking, content, calls)
    if done is None or done.finish_reason in ("error", "cancelled"):
        message = done.error if done and done.error else "the generation was interrupted"
        return JSONResponse({"error": message}, status_code=500)
    out = _base(state)
    if chat:
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if thinking:
            msg["thinking"] = "".join(thinking)
        if calls:
            msg["tool_calls"] = calls
        out["message"] = msg
    else:
        out["response"] = "".join(content)
        if thinking:
            out["thinking"] = "".join(thinking)
    out.update(_final(done, started))
    return JSONResponse(out)


def _call(e: Event) -> dict[str, Any]:
    try:
        args = json.loads(e.arguments or "{}")
    except json.JSONDecodeError:
        args = {}
    return {"function": {"name": e.name, "arguments": args}}


def _collect(e: Event, thinking: list, content: list, calls: list) -> None:
    if e.kind == "reasoning":
        thinking.append(e.text)
    elif e.kind == "content":
        content.append(e.text)
    else:
        calls.append(_call(e))


def _final(done: Done, started: int) -> dict[str, Any]:
    total = time.perf_counter_ns() - started
    reason = "stop" if done.finish_reason == "tool_calls" else done.finish_reason
    return {
        "done": True,
        "done_reason": reason,
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": done.usage.prompt_tokens,
        "eval_count": done.usage.completion_tokens,
    }


async def _ndjson(
    state: ServerState, stream: AsyncIterator, chat: bool, started: int
) -> AsyncIterator[str]:
    def line(obj: dict[str, Any]) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    async for item in stream:
        if isinstance(item, Done):
            if item.finish_reason in ("error", "cancelled"):
                yield line({"error": item.error or "the generation was interrupted"})
                return
            last = _base(state)
            if chat:
                last["message"] = {"role": "assistant", "content": ""}
            else:
                last["response"] = ""
            last.update(_final(item, started))
            yield line(last)
            return
        for e in item.events:
            out = _base(state)
            if chat:
                msg: dict[str, Any] = {"role": "assistant", "content": ""}
                if e.kind == "reasoning":
                    msg["thinking"] = e.text
                elif e.kind == "content":
                    msg["content"] = e.text
                else:
                    msg["tool_calls"] = [_call(e)]
                out["message"] = msg
            else:
                out["response"] = e.text if e.kind == "content" else ""
                if e.kind == "reasoning":
                    out["thinking"] = e.text
            out["done"] = False
            yield line(out)


def _details(state: ServerState) -> dict[str, Any]:
    q = state.config.get("quantization") or {}
    bits = q.get("bits")
    return {
        "parent_model": "",
        "format": "mlx",
        "family": state.config.get("model_type", "deepseek"),
        "families": [state.config.get("model_type", "deepseek")],
        "parameter_size": "",
        "quantization_level": f"Q{bits}" if bits else "",
    }


def _model_entry(state: ServerState) -> dict[str, Any]:
    return {
        "name": f"{state.model_id}:latest",
        "model": f"{state.model_id}:latest",
        "modified_at": datetime.fromtimestamp(state.created, timezone.utc).isoformat(),
        "size": 0,
        "digest": "",
        "details": _details(state),
    }


def _show(state: ServerState) -> dict[str, Any]:
    caps = ["completion"]
    if state.adapter.fmt.tool_format:
        caps.append("tools")
    if state.adapter.has_thinking_switch or state.adapter.fmt.family in ("r1", "v3.1"):
        caps.append("thinking")
    info = {
        f"{state.config.get('model_type', 'deepseek')}.context_length": state.context,
        "general.architecture": state.config.get("model_type", "deepseek"),
    }
    return {
        "modelfile": "",
        "parameters": "",
        "template": state.adapter.fmt.template,
        "details": _details(state),
        "model_info": info,
        "capabilities": caps,
    }
