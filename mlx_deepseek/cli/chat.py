"""`mlx-deepseek chat [MODEL]`: the interactive chat (heavy imports happen inside)."""

from __future__ import annotations

import sys

import typer

from .options import (
    MODEL_HELP,
    DraftTokens,
    ExpertCache,
    KvBits,
    MaxTokens,
    MinP,
    Mtp,
    RepetitionPenalty,
    Seed,
    State,
    System,
    Temp,
    TopK,
    TopP,
)


def chat(
    model: str = typer.Argument("demo", help=MODEL_HELP),
    temp: Temp = None,
    top_p: TopP = None,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    max_tokens: MaxTokens = 4096,
    system: System = None,
    think: bool = typer.Option(
        False, "--think", help="Start in thinking mode (models with a switch: V3.1)."
    ),
    prefill_step_size: int = typer.Option(
        2048, "--prefill-step-size", help="Prompt tokens per prefill pass."
    ),
    mtp: Mtp = None,
    draft_tokens: DraftTokens = 1,
    expert_cache: ExpertCache = None,
    kv_bits: KvBits = None,
) -> None:
    """Chat with a model in the terminal (streams answers; /help lists the commands)."""
    from ..chat.repl import Repl
    from ..chat.session import ChatSession
    from ..errors import DeepSeekError
    from ..sampling import SamplingSettings
    from .generate import load_checkpoint

    if max_tokens < 1:
        raise DeepSeekError(f"--max-tokens {max_tokens}: must be at least 1")
    m, tokenizer, fmt, name = load_checkpoint(model, False, expert_cache, kv_bits)
    settings = SamplingSettings(
        temperature=fmt.temperature if temp is None else temp,
        top_p=fmt.top_p if top_p is None else top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    ).validated()
    session = ChatSession(
        m,
        tokenizer,
        fmt=fmt,
        name=name,
        system=system,
        settings=settings,
        max_tokens=max_tokens,
        prefill_step_size=prefill_step_size,
        mtp=mtp,
        draft_tokens=draft_tokens,
    )
    if think:
        session.set_thinking(True)
    if hasattr(sys.stdin, "reconfigure"):  # a bad byte costs one message, not the session
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    code = Repl(session, debug=State.debug).run()
    raise typer.Exit(code)
