"""`mlx-deepseek chat [MODEL]`: the interactive chat (heavy imports happen inside)."""

from __future__ import annotations

import sys

import typer

from .options import (
    MODEL_HELP,
    DraftTokens,
    MaxTokens,
    MinP,
    Mtp,
    Parallel,
    PrefillStepSize,
    RepetitionPenalty,
    Seed,
    State,
    System,
    Temp,
    TopK,
    TopP,
    check_options,
)


def chat(
    model: str = typer.Argument("demo", help=MODEL_HELP),
    temp: Temp = None,
    top_p: TopP = None,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    max_tokens: MaxTokens = None,
    system: System = None,
    think: bool = typer.Option(
        False, "--think", help="Start in thinking mode (models with a switch: V3.1)."
    ),
    prefill_step_size: PrefillStepSize = 2048,
    mtp: Mtp = None,
    draft_tokens: DraftTokens = 1,
    parallel: Parallel = None,
) -> None:
    """Chat with a model in the terminal (streams answers; /help lists the commands)."""
    from ..chat.repl import Repl
    from ..chat.session import ChatSession, no_thinking_switch
    from ..sampling import SamplingSettings
    from .generate import argv_text, join_ranks, load_checkpoint

    check_options(
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        draft_tokens=draft_tokens,
        prefill_step_size=prefill_step_size,
    )
    system = argv_text(system, "--system") if system is not None else None
    world = join_ranks(parallel)
    m, tokenizer, fmt, name = load_checkpoint(model, parallel=parallel)
    if think and not fmt.has_thinking_switch:
        raise no_thinking_switch(fmt, "--think")
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
    if world is not None and not world.leader:  # a follower: rank 0 reads the keyboard
        from ..chat.distributed import RankRepl

        raise typer.Exit(RankRepl(session, world, debug=State.debug).run())
    if hasattr(sys.stdin, "reconfigure"):  # a bad byte costs one message, not the session
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if world is not None:
        from ..chat.distributed import RankRepl

        raise typer.Exit(RankRepl(session, world, debug=State.debug).run())
    code = Repl(session, debug=State.debug).run()
    raise typer.Exit(code)
