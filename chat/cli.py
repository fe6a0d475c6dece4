"""`mlx-deepseek chat [MODEL]`: the interactive chat (heavy imports happen inside)."""

from __future__ import annotations

import sys

import typer

from mlx_deepseek.cli_generate import DRAFT_HELP, MODEL_HELP, MTP_HELP


def chat(
    model: str = typer.Argument("demo", help=MODEL_HELP),
    temp: float | None = typer.Option(
        None, "--temp", help="Temperature (0 = greedy). Default: the model family's (R1: 0.6)."
    ),
    top_p: float | None = typer.Option(
        None, "--top-p", help="Nucleus sampling threshold in (0, 1]. Default: the family's."
    ),
    top_k: int = typer.Option(
        0, "--top-k", help="Sample among the K most likely tokens (0 = off)."
    ),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top one's."),
    repetition_penalty: float | None = typer.Option(
        None, "--repetition-penalty", help="Penalise the last 20 tokens (1 = off)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (reproducible sampling)."),
    max_tokens: int = typer.Option(4096, "--max-tokens", "-m", help="Longest answer, in tokens."),
    system: str | None = typer.Option(None, "--system", help="A system prompt."),
    think: bool = typer.Option(
        False, "--think", help="Start in thinking mode (models with a switch: V3.1)."
    ),
    prefill_step_size: int = typer.Option(
        2048, "--prefill-step-size", help="Prompt tokens per prefill pass."
    ),
    mtp: bool | None = typer.Option(None, "--mtp/--no-mtp", help=MTP_HELP),
    draft_tokens: int = typer.Option(1, "--draft-tokens", help=DRAFT_HELP),
) -> None:
    """Chat with a model in the terminal (streams answers; /help lists the commands)."""
    from mlx_deepseek import cli
    from mlx_deepseek.cli_generate import load_checkpoint
    from mlx_deepseek.errors import DeepSeekError
    from mlx_deepseek.sampling import SamplingSettings

    from .repl import Repl
    from .session import ChatSession

    if max_tokens < 1:
        raise DeepSeekError(f"--max-tokens {max_tokens}: must be at least 1")
    m, tokenizer, fmt, name = load_checkpoint(model)
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
    code = Repl(session, debug=cli._debug).run()
    raise typer.Exit(code)
