"""`mlx-deepseek generate`: one prompt in, the answer streamed to stdout.

Reasoning (R1, V3.1 thinking) goes to stderr, dimmed, so that stdout holds only the answer;
a stats line follows on stderr. Heavy imports happen inside the command (fast --help).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from ..errors import ArgumentValueError, DeepSeekError
from .options import (
    MODEL_HELP,
    DraftTokens,
    ExpertCache,
    KvBits,
    MaxTokens,
    MinP,
    Mtp,
    Parallel,
    RepetitionPenalty,
    SamplingOptions,
    Seed,
    State,
    System,
    Temp,
    TopK,
    TopP,
    check_memory_options,
    check_options,
)


def mtp_stats(acceptance_rate: float | None, tokens_per_step: float | None) -> str:
    """' · MTP 85% accepted, 1.85 tok/step' or ''."""
    if acceptance_rate is None:
        return ""
    return f" · MTP {acceptance_rate:.0%} accepted, {tokens_per_step:.2f} tok/step"


def join_ranks(parallel: str | None) -> Any:
    """The ranks of a --parallel run (distributed.World), or None without --parallel (and
    for `auto` in a process that mlx.launch did not start: one process runs alone)."""
    parallel = getattr(parallel, "value", parallel)
    if parallel is None:
        return None
    from ..distributed import launched, start

    if parallel == "auto" and not launched():
        return None
    return start(debug=State.debug)


def load_checkpoint(
    model: str,
    quiet: bool = False,
    parallel: str | None = None,
    expert_cache: str | None = None,
    kv_bits: int | None = None,
) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, chat format, display name) for a folder, repo id or `demo`; with
    --parallel (after join_ranks), this rank's part of the model; expert_cache / kv_bits:
    --expert-cache and --kv-bits (checked before loading)."""
    from rich.console import Console

    from ..formats import chat_format, read_model_config
    from ..loading import load, load_tokenizer, resolve_model_path

    check_memory_options(expert_cache, kv_bits)
    path = resolve_model_path(model)
    name = model if not Path(model).expanduser().exists() else path.resolve().name
    console = Console(stderr=True)
    options = dict(expert_cache=expert_cache, kv_bits=kv_bits)
    world = _world() if parallel else None
    if world is not None:
        if expert_cache is not None or kv_bits is not None:
            raise ArgumentValueError(
                "--parallel: streamed experts (--expert-cache) and a quantized cache "
                "(--kv-bits) are not split across ranks yet: drop them or --parallel"
            )
        m = _load_part(path, getattr(parallel, "value", parallel), world, console, quiet)
        tokenizer = load_tokenizer(path)
    elif quiet or not console.is_terminal:
        m, tokenizer = load(path, **options)
    else:
        with console.status(f"loading {name} ...", spinner="dots"):
            m, tokenizer = load(path, **options)
    config = read_model_config(path)
    return m, tokenizer, chat_format(tokenizer, config, name), name


def _world() -> Any:
    from ..distributed import current

    return current()


def _load_part(path: Path, parallel: str, world: Any, console: Any, quiet: bool) -> Any:
    """This rank's part; rank 0 says how the model is split (unless quiet)."""
    from ..distributed import load_part

    loaded = load_part(path, parallel, world)
    world.seed()  # unseeded sampling draws the same tokens on every rank
    held = world.gather(loaded.weight_bytes)
    if world.leader and not quiet:
        plan = loaded.plan
        parts = [f"rank {r}: {plan.describe(r)} ({_size(held[r])})" for r in range(plan.size)]
        console.print(
            f"{plan.kind} parallel over {plan.size} ranks: " + "; ".join(parts),
            style="dim",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return loaded.model


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _not_utf8(where: str, data: bytes, e: UnicodeDecodeError) -> DeepSeekError:
    return DeepSeekError(
        f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): convert "
        "it first, e.g. iconv -f latin1 -t utf-8"
    )


def argv_text(value: str, option: str) -> str:
    """An option's value as text: argv bytes that are not UTF-8 arrive as lone surrogates
    (Python's surrogateescape), which no tokenizer can encode: one line instead."""
    data = os.fsencode(value)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(f"the {option} argument", data, e) from None


def read_prompt(prompt: str | None) -> str:
    """--prompt's text, or stdin's when --prompt is absent or '-' (must be UTF-8, not empty)."""
    if prompt is not None and prompt != "-":
        text = argv_text(prompt, "--prompt")
        if not text.strip():
            raise DeepSeekError("the prompt given with --prompt is empty: give some text")
        return text
    if prompt is None and sys.stdin.isatty():
        raise DeepSeekError("no prompt: give --prompt TEXT, or pipe the prompt on stdin")
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8("stdin", data, e) from None
    text = text.rstrip("\r\n")
    if not text.strip():
        raise DeepSeekError("the prompt on stdin is empty: give some text")
    return text


class _Answer:
    """The answer on stdout, without the blank lines it may start with: `$(mlx-deepseek
    generate ...)` gets the answer itself."""

    def __init__(self) -> None:
        from ..chat.repl import LeadingBlankLines

        self.lines = LeadingBlankLines()

    @property
    def started(self) -> bool:
        return self.lines.started

    def write(self, text: str) -> None:
        text = self.lines.feed(text)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def end(self) -> None:
        if self.started:
            sys.stdout.write("\n")
            sys.stdout.flush()


def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str | None = typer.Option(
        None, "--prompt", "-p", help="The prompt; omit it or give '-' to read stdin."
    ),
    max_tokens: MaxTokens = None,
    temp: Temp = None,
    top_p: TopP = None,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    system: System = None,
    stop: list[str] | None = typer.Option(  # noqa: B008
        None, "--stop", help="Stop at this string (repeatable); it is not printed."
    ),
    think: bool = typer.Option(
        False, "--think", help="Thinking mode (models with a switch: V3.1)."
    ),
    raw: bool = typer.Option(
        False, "--raw", help="Send the prompt as is, without the chat template."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No stats line, no spinner."),
    mtp: Mtp = None,
    draft_tokens: DraftTokens = None,
    expert_cache: ExpertCache = None,
    kv_bits: KvBits = None,
    parallel: Parallel = None,
) -> None:
    """Generate an answer to one prompt (stdout: the answer; stderr: reasoning and stats)."""
    # text first (no MLX import needed), then the options; all before loading the model (with
    # --parallel the ranks join first, and only rank 0 reads the prompt)
    stop = [argv_text(s, "--stop") for s in stop or ()]
    system = argv_text(system, "--system") if system is not None else None
    world = join_ranks(parallel)
    text = read_prompt(prompt) if world is None or world.leader else None
    sampling = SamplingOptions(temp, top_p, top_k, min_p, repetition_penalty, seed)
    check_options(
        sampling,
        max_tokens=max_tokens,
        draft_tokens=draft_tokens,
        expert_cache=expert_cache,
        kv_bits=kv_bits,
    )
    from rich.console import Console

    from ..chat.repl import format_memory
    from ..chat.session import ReasoningSplitter, no_thinking_switch
    from ..decoding import context_length
    from ..formats import starts_in_reasoning
    from ..generation import stream_generate
    from ..speculative import Drafting

    if world is not None:
        text = world.share(text)  # only rank 0 reads stdin
    m, tokenizer, fmt, _ = load_checkpoint(model, quiet, parallel, expert_cache, kv_bits)
    if think and not fmt.has_thinking_switch:
        raise no_thinking_switch(fmt, "--think")
    if max_tokens is None:
        max_tokens = min(512, context_length(m) or 512)
    if raw:
        prompt_text = text
        tokens: Any = text
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        prompt_text = fmt.render(tokenizer, messages, True, think)
        tokens = tokenizer.encode(prompt_text, add_special_tokens=False)
    splitter = ReasoningSplitter(starts_in_reasoning(prompt_text), detect=True)
    err = Console(stderr=True, highlight=False)
    answer = _Answer()
    last = None
    for last in stream_generate(
        m,
        tokenizer,
        tokens,
        max_tokens,
        sampling=sampling.settings(fmt),
        drafting=Drafting(mtp, draft_tokens),
        stop=stop or None,
    ):
        chunks = splitter.feed(last.text) + (splitter.flush() if last.finish_reason else [])
        for chunk in chunks:
            if chunk.kind == "reasoning":
                err.print(chunk.text, style="dim italic", end="", markup=False, soft_wrap=True)
            else:
                if splitter.reasoning and not answer.started and chunk.text.strip():
                    err.print()  # end the reasoning's line before the answer starts
                answer.write(chunk.text)
    if splitter.reasoning and not answer.started:
        err.print()
    answer.end()
    if last is not None and not quiet:
        err.print(
            f"prompt {last.prompt_tokens} tok {last.prompt_tps:.1f} tok/s · generated "
            f"{last.generation_tokens} tok {last.generation_tps:.1f} tok/s · peak "
            f"{format_memory(last.peak_memory)} · {last.finish_reason}"
            + mtp_stats(last.acceptance_rate, last.tokens_per_step)
            + (f" · {last.expert_cache.describe()}" if last.expert_cache else ""),
            style="dim",
            markup=False,
        )
