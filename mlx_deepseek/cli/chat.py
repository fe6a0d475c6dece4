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
    Parallel,
    PrefillStepSize,
    RepetitionPenalty,
    SamplingOptions,
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
    draft_tokens: DraftTokens = None,
    expert_cache: ExpertCache = None,
    kv_bits: KvBits = None,
    parallel: Parallel = None,
) -> None:
    """Chat with a model in the terminal (streams answers; /help lists the commands)."""
    from ..chat.repl import Repl
    from ..chat.session import ChatSession, no_thinking_switch
    from .generate import argv_text, join_ranks, load_checkpoint

    sampling = SamplingOptions(temp, top_p, top_k, min_p, repetition_penalty, seed)
    check_options(
        sampling,
        max_tokens=max_tokens,
        draft_tokens=draft_tokens,
        prefill_step_size=prefill_step_size,
        expert_cache=expert_cache,
        kv_bits=kv_bits,
    )
    system = argv_text(system, "--system") if system is not None else None
    world = join_ranks(parallel)
    m, tokenizer, fmt, name = load_checkpoint(
        model, parallel=parallel, expert_cache=expert_cache, kv_bits=kv_bits
    )
    if think and not fmt.has_thinking_switch:
        raise no_thinking_switch(fmt, "--think")
    session = ChatSession(
        m,
        tokenizer,
        fmt=fmt,
        name=name,
        system=system,
        settings=sampling.settings(fmt),
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
