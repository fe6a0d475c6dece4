"""The HTTP app: starlette routes over one Engine.

OpenAI endpoints live in openai_api.py, Ollama's in ollama_api.py, what they share in
state.py; here are the routes that need no model (/health, /v1/models, the page at /) and
the error handlers.
"""

from __future__ import annotations

import logging
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from . import ollama_api, openai_api
from .protocol import RequestError
from .state import ServerState, check_auth, check_model, error_response, model_card

log = logging.getLogger(__name__)


async def _request_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)  # type: ignore[arg-type]


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    what = {404: "no such endpoint", 405: "method not allowed"}.get(status, str(exc))
    message = f"{request.method} {request.url.path}: {what}"
    return error_response(RequestError(message, "url", status=status))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed")
    return error_response(
        RequestError(f"internal error: {type(exc).__name__}: {exc}", None, status=500)
    )


def make_app(state: ServerState) -> Starlette:
    async def health(request: Request) -> Response:
        alive = state.engine.alive
        body = {"status": "ok" if alive else "engine stopped", "model": state.model_id}
        body.update(state.engine.stats())
        return JSONResponse(body, status_code=200 if alive else 503)

    async def models(request: Request) -> Response:
        check_auth(state, request)
        return JSONResponse({"object": "list", "data": [model_card(state)]})

    async def one_model(request: Request) -> Response:
        check_auth(state, request)
        check_model(state, request.path_params["name"], "url")
        return JSONResponse(model_card(state))

    async def page(request: Request) -> Response:
        html = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", one_model),
        *openai_api.routes(state),
        *ollama_api.routes(state),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            RequestError: _request_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
