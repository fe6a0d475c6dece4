"""`mlx-deepseek serve [MODEL]`: the OpenAI- and Ollama-compatible HTTP server."""

from __future__ import annotations

import os

import typer

from .options import MODEL_HELP, DraftTokens, ExpertCache, KvBits, MaxTokens, Mtp, Parallel


def serve(
    model: str = typer.Argument("demo", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="MLX_DEEPSEEK_API_KEY",
        help="Require 'Authorization: Bearer KEY' on the API (also MLX_DEEPSEEK_API_KEY).",
    ),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together."),
    max_queue: int = typer.Option(
        64, "--max-queue", help="Requests that may wait for a slot; more get 503 + Retry-After."
    ),
    prefix_cache_mb: int = typer.Option(
        2048, "--prefix-cache-mb", help="Prefix cache size limit in MB (0: off)."
    ),
    prefill_step_size: int = typer.Option(
        512, "--prefill-step-size", help="Prompt tokens per prefill chunk."
    ),
    max_tokens: MaxTokens = 4096,
    max_body_mb: float = typer.Option(8.0, "--max-body-mb", help="Largest request body, MB."),
    mtp: Mtp = None,
    draft_tokens: DraftTokens = None,
    model_id: str | None = typer.Option(
        None, "--model-id", help="The model's name in the API (default: the checkpoint's)."
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level."),
    expert_cache: ExpertCache = None,
    kv_bits: KvBits = None,
    parallel: Parallel = None,
) -> None:
    """Serve a model over HTTP: OpenAI (/v1/...) and Ollama (/api/...) APIs and a chat page."""
    from ..errors import DeepSeekError
    from ..formats import read_model_config
    from ..loading import resolve_model_path
    from ..serve.server import bind, is_loopback, make_state, uvicorn_server
    from .generate import join_ranks, load_checkpoint
    from .options import check_memory_options

    for name, value, low in (
        ("--port", port, 0),
        ("--max-batch", max_batch, 1),
        ("--max-queue", max_queue, 0),
        ("--prefix-cache-mb", prefix_cache_mb, 0),
        ("--prefill-step-size", prefill_step_size, 1),
        ("--max-tokens", max_tokens, 1),
    ):
        if value < low:
            raise DeepSeekError(f"{name} {value}: must be at least {low}")
    if port > 65535:
        raise DeepSeekError(f"--port {port}: must be at most 65535")
    if max_body_mb <= 0:
        raise DeepSeekError(f"--max-body-mb {max_body_mb}: must be > 0")
    check_memory_options(expert_cache, kv_bits)
    world = join_ranks(parallel)
    engine_options = dict(
        max_batch=max_batch,
        max_queue=max_queue,
        prefix_cache_bytes=prefix_cache_mb << 20,
        prefill_step_size=prefill_step_size,
        mtp=mtp,
        draft_tokens=draft_tokens,
    )
    if world is not None and not world.leader:  # rank 0 serves; this rank runs its steps
        from ..serve.distributed import FollowerEngine

        m, _, _, _ = load_checkpoint(
            model, parallel=parallel, expert_cache=expert_cache, kv_bits=kv_bits
        )
        FollowerEngine(m, world=world, **engine_options).run()
        return
    try:
        sock = bind(host, port)
    except OSError as e:
        raise DeepSeekError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port or --host"
        ) from None
    if not is_loopback(host):
        typer.secho(
            f"warning: listening on {host}: other machines can reach this server"
            + ("" if api_key else "; set --api-key to require a key"),
            err=True,
            fg=typer.colors.YELLOW,
        )
    m, tokenizer, fmt, name = load_checkpoint(
        model, parallel=parallel, expert_cache=expert_cache, kv_bits=kv_bits
    )
    config = read_model_config(resolve_model_path(model))
    if world is not None:
        from functools import partial

        from ..serve.distributed import LeaderEngine

        engine_options["engine_class"] = partial(LeaderEngine, world=world)
    state = make_state(
        m,
        tokenizer,
        fmt,
        model_id or name,
        config=config,
        api_key=api_key or None,
        max_body=int(max_body_mb * (1 << 20)),
        default_max_tokens=max_tokens,
        **engine_options,
    )
    shown = f"[{host}]" if ":" in host else host
    typer.secho(
        f"serving {state.model_id} on http://{shown}:{sock.getsockname()[1]}  "
        f"(OpenAI: /v1, Ollama: /api, chat page: /; pid {os.getpid()})",
        err=True,
    )
    server = uvicorn_server(state, log_level)
    try:
        server.run(sockets=[sock])
    finally:
        state.engine.close()
        sock.close()
