"""Request bodies: pydantic models of the OpenAI and Ollama requests this server takes, and the
one error type every endpoint answers bad input with (HTTP 4xx, a JSON body naming the field).

Types are strict (a string where a number belongs is an error, not converted); unknown fields
are ignored, as OpenAI's own API does. Checks that need the model (context length, token ids
in the vocabulary, the model's name) are in app.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP = 16
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class RequestError(Exception):
    """Bad input: HTTP `status`, a message, and the offending field as a path (`messages[0]`)."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def field_path(loc: tuple) -> str:
    """pydantic's error location -> `messages[0].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body against `model`, or raise RequestError naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise RequestError(
                f"the body is not valid JSON ({err['msg']})", "body", code="invalid_json"
            ) from None
        path = field_path(err["loc"])
        if not path:
            raise RequestError(f"the body must be a JSON object: {err['msg']}", "body") from None
        got = err.get("input")
        shown = "" if err["type"] == "missing" else f" (got {_short(got)})"
        raise RequestError(f"{path}: {err['msg']}{shown}", path) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---- shared pieces -------------------------------------------------------------------------

Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(gt=0, le=1)]


def check_stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("give a string or a list of strings")
    if len(value) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    return [s for s in value if s]


# the sampling fields' types, shared by the OpenAI and Ollama requests
TopK = Annotated[int | None, Field(ge=0)]
MinP = Annotated[float | None, Field(ge=0, lt=1)]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]  # presence / frequency
Stop = Annotated[Any, AfterValidator(check_stop)]  # -> list[str]


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TOOL_NAME.match(v):
            raise ValueError("a function name is 1-64 letters, digits, _ . : or -")
        return v

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if "type" in v and v["type"] != "object":
            raise ValueError('a function\'s parameters are a JSON schema of "type": "object"')
        props = v.get("properties")
        if props is not None and not isinstance(props, dict):
            raise ValueError('"properties" must be an object mapping names to schemas')
        if isinstance(props, dict) and not all(isinstance(p, dict) for p in props.values()):
            raise ValueError("every property must be a JSON schema (an object)")
        req = v.get("required")
        if req is not None and not (isinstance(req, list) and all(isinstance(r, str) for r in req)):
            raise ValueError('"required" must be a list of property names')
        return v


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolCallFunction(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    thinking: str | None = None  # Ollama's name for the reasoning
    images: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str | None:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or "type" not in part:
                    raise ValueError('content parts are objects with a "type"')
                if part["type"] != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"content part of type {part['type']!r}: only text parts are supported "
                        "(this model reads text only)"
                    )
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("give a string or a list of text parts")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    thinking: bool | None = None
    enable_thinking: bool | None = None


class SamplingFields(_Strict):
    """The sampling fields the OpenAI endpoints share."""

    model: str | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: Annotated[float | None, Field(gt=0)] = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    seed: int | None = None
    stop: Stop = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v is None or v in ("none", "auto", "required"):
            return v
        if (
            isinstance(v, dict)
            and v.get("type") == "function"
            and isinstance(v.get("function"), dict)
            and isinstance(v["function"].get("name"), str)
        ):
            return v
        raise ValueError(
            'give "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        )

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type") not in (None, "text"):
            raise ValueError(f'type {v.get("type")!r} is not supported (only "text")')
        return v


class CompletionRequest(SamplingFields):
    prompt: Any
    max_tokens: Annotated[int | None, Field(ge=1)] = 16
    echo: bool = False
    logprobs: Annotated[int | None, Field(ge=0, le=5)] = None
    best_of: Annotated[int | None, Field(ge=1, le=1)] = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            if not v:
                raise ValueError("the prompt is empty")
            return v
        if isinstance(v, list) and v and all(type(t) is int for t in v):
            return v
        if isinstance(v, list) and len(v) > 1:
            raise ValueError("give one prompt per request (n and batches of prompts: 1)")
        raise ValueError("give a non-empty string or a list of token ids")


# ---- Ollama --------------------------------------------------------------------------------


class OllamaOptions(_Strict):
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    num_predict: int | None = None  # -1: unlimited (up to the context)
    repeat_penalty: Annotated[float | None, Field(gt=0)] = None
    repeat_last_n: Annotated[int | None, Field(ge=1)] = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    seed: int | None = None
    stop: Stop = Field(default=None, validate_default=True)
    num_ctx: int | None = None


class OllamaRequest(_Strict):
    model: str | None = None
    stream: bool = True
    options: OllamaOptions | None = None
    think: bool | None = None
    format: Any = None
    keep_alive: Any = None

    @field_validator("format")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if v not in (None, ""):
            raise ValueError("structured output (format) is not supported")
        return v


class OllamaChatRequest(OllamaRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[Tool] | None = None


class OllamaGenerateRequest(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[Any] | None = None


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    name: str | None = None
