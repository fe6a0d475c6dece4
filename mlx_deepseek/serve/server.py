"""Running the app: the server's state from a loaded model, uvicorn in the foreground (the
CLI), or in a background thread on a free port (tests, benchmarks)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from ..formats import ChatFormat
from ..generation import wrap_tokenizer
from .app import make_app
from .chat import ChatAdapter
from .engine import Engine
from .state import DEFAULT_MAX_BODY, DEFAULT_MAX_TOKENS, ServerState


def make_state(
    model: Any,
    tokenizer: Any,
    fmt: ChatFormat,
    model_id: str,
    *,
    config: dict[str, Any] | None = None,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    engine_class: Callable[..., Engine] = Engine,
    **engine_options: Any,
) -> ServerState:
    """A ServerState with its engine started (see Engine for `engine_options`; `engine_class`
    builds it, e.g. rank 0's engine of a distributed run)."""
    tokenizer = wrap_tokenizer(tokenizer)
    engine = engine_class(model, **engine_options).start()
    return ServerState(
        engine=engine,
        tokenizer=tokenizer,
        adapter=ChatAdapter(tokenizer, fmt),
        model_id=model_id,
        config=dict(config or {}),
        api_key=api_key,
        max_body=max_body,
        default_max_tokens=default_max_tokens,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); OSError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(state: ServerState, log_level: str = "warning") -> uvicorn.Server:
    config = uvicorn.Config(
        make_app(state),
        log_level=log_level,
        access_log=log_level in ("info", "debug"),
        timeout_graceful_shutdown=2,
        lifespan="off",
    )
    return uvicorn.Server(config)


class BackgroundServer:
    """The app served by uvicorn in a thread on 127.0.0.1 and a free port; `url` is its root.
    Use as a context manager; closing also stops the engine."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1"):
        self.state = state
        self.sock = bind(host, 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn_server(state)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.engine.close()
        self.sock.close()
