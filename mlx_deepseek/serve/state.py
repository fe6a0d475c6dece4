"""What the OpenAI and Ollama endpoints share: the server's state, reading and validating a
body (size limit, JSON, fields), the API key, turning a chat request into a prompt and engine
parameters, and the error responses. The routes are in app.py, openai_api.py, ollama_api.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import DeepSeekError
from ..sampling import SamplingSettings
from .chat import ChatAdapter, OutputParser, to_template_messages
from .engine import Engine, Handle, QueueFull
from .protocol import Message, RequestError, Tool, parse
from .sampler import GenParams

log = logging.getLogger("mlx_deepseek.serve")

DEFAULT_MAX_BODY = 8 << 20  # bytes
DEFAULT_MAX_TOKENS = 4096


@dataclass
class ServerState:
    """Everything the endpoints share (one model per server)."""

    engine: Engine
    tokenizer: Any  # mlx-lm TokenizerWrapper
    adapter: ChatAdapter
    model_id: str
    config: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    created: int = field(default_factory=lambda: int(time.time()))
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context(self) -> int | None:
        return self.engine.context

    @property
    def vocab_size(self) -> int:
        args = getattr(self.engine.model, "args", None)
        return int(getattr(args, "vocab_size", 0) or len(self.tokenizer.vocab))

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.eos_token_ids)

    def names(self) -> set[str]:
        """Model names a request may give (the id, and Ollama's `name:latest`)."""
        return {self.model_id, f"{self.model_id}:latest"}

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:  # a Rust tokenizer refuses concurrent use
            return list(self.tokenizer.encode(text, add_special_tokens=False))


# ---- reading requests ----------------------------------------------------------------------


def check_auth(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), state.api_key.encode()):
        raise RequestError(
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            "authorization",
            status=401,
            code="invalid_api_key",
        )


async def read_body(state: ServerState, request: Request, model: type[BaseModel]) -> Any:
    """The request's JSON body validated by `model` (auth and the size limit first)."""
    check_auth(state, request)
    length = request.headers.get("content-length")
    too_big = RequestError(
        f"the body is over {state.max_body} bytes: send a shorter request",
        "body",
        status=413,
        code="body_too_large",
    )
    if length is not None and length.isdigit() and int(length) > state.max_body:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body:
            raise too_big
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise RequestError("the body is empty: send a JSON object", "body")
    return parse(model, body)


def check_model(state: ServerState, name: str | None, param: str = "model") -> None:
    if name is None or name == "" or name in state.names():
        return
    raise RequestError(
        f"model {name!r} is not served here; this server serves {state.model_id!r} "
        "(GET /v1/models)",
        param,
        status=404,
        code="model_not_found",
    )


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.vocab_size
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise RequestError(
                f"{param}[{i}]: token id {t} is outside the vocabulary [0, {vocab})",
                f"{param}[{i}]",
            )


def logit_bias_ids(state: ServerState, bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(
                f'logit_bias: key {key!r} is not a token id (give ids as strings: {{"123": -100}})',
                f"logit_bias.{key}",
            ) from None
        if not 0 <= token < state.vocab_size:
            raise RequestError(
                f"logit_bias: token id {token} is outside the vocabulary [0, {state.vocab_size})",
                f"logit_bias.{key}",
            )
        out[token] = float(value)
    return out


# ---- from a request to the engine ----------------------------------------------------------


@dataclass
class Prepared:
    prompt: list[int]
    params: GenParams
    stops: list[str]
    parser: OutputParser | None
    prompt_text: str = ""


def render_chat(
    state: ServerState,
    messages: list[Message],
    tools: list[Tool] | None,
    thinking: bool,
    param: str = "messages",
) -> tuple[str, list[int]]:
    if all(m.role in ("system", "developer") for m in messages):
        raise RequestError(
            f"{param}: give at least one user message (only system messages were sent)", param
        )
    dicts = to_template_messages(messages)
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    text = state.adapter.render(dicts, thinking=thinking, tools=tool_dicts)
    return text, state.encode(text)


def gen_params(
    state: ServerState,
    prompt: list[int],
    *,
    max_tokens: int | None,
    max_param: str,
    prompt_param: str,
    sampling: dict[str, Any],
    logprobs: bool = False,
    top_logprobs: int = 0,
    logit_bias: dict[int, float] | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
) -> GenParams:
    """Engine parameters, checking the prompt and max_tokens against the context."""
    ctx = state.context
    if ctx is not None:
        if len(prompt) >= ctx:
            raise RequestError(
                f"{prompt_param}: the prompt is {len(prompt)} tokens but the model's context "
                f"holds {ctx}: shorten it",
                prompt_param,
                code="context_length_exceeded",
            )
        room = ctx - len(prompt)
        if max_tokens is not None and max_tokens > room:
            raise RequestError(
                f"{max_param}={max_tokens}: the prompt is {len(prompt)} tokens and the context "
                f"holds {ctx}, so at most {room} can be generated",
                max_param,
                code="context_length_exceeded",
            )
    fmt = state.adapter.fmt
    values = {k: v for k, v in sampling.items() if v is not None}
    values.setdefault("temperature", fmt.temperature)
    values.setdefault("top_p", fmt.top_p)
    try:
        settings = SamplingSettings(**values).validated()
    except DeepSeekError as e:
        name = str(e).split("=", 1)[0]
        raise RequestError(str(e), name) from None
    return GenParams(
        max_tokens=max_tokens or state.default_max_tokens,
        settings=settings,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        logit_bias=logit_bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        stop_ids=state.stop_ids,
    )


def submit(state: ServerState, prepared: Prepared) -> Handle:
    try:
        return state.engine.submit(prepared.prompt, prepared.params)
    except QueueFull as e:
        raise RequestError(
            str(e), None, status=503, code="server_busy", headers={"Retry-After": "2"}
        ) from None
    except DeepSeekError as e:
        raise RequestError(str(e), "messages") from None


async def watch_disconnect(request: Request, handle: Handle) -> None:
    """Cancel the request's generation when its client goes away (the slot is freed at the
    engine's next step)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                handle.cancel()
                return
    except (asyncio.CancelledError, RuntimeError):
        return


async def watched(request: Request, handle: Handle, it: AsyncIterator) -> AsyncIterator:
    """Iterate `it`, cancelling the generation if the client disconnects or stops reading."""
    watcher = asyncio.create_task(watch_disconnect(request, handle))
    try:
        async for item in it:
            yield item
    finally:
        handle.cancel()  # no-op when it finished; frees the slot when the client went away
        watcher.cancel()


# ---- errors and the routes that need no model ----------------------------------------------


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "mlx-deepseek",
        "context_length": state.context,
    }
