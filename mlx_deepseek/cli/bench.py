"""`mlx-deepseek bench`: the typer command (heavy imports happen inside it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..bench.models import DEFAULT_CACHE, SHAPES


def _ints(text: str, option: str) -> list[int]:
    from mlx_deepseek.errors import DeepSeekError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise DeepSeekError(f"{option} {text!r}: give positive integers separated by commas")
    return values


def _shape_names(given: list[str]) -> list[str]:
    from mlx_deepseek.errors import DeepSeekError

    names = [n.strip() for g in given for n in g.split(",") if n.strip()]
    for n in names:
        if n not in SHAPES:
            raise DeepSeekError(f"--shape {n!r}: choose from {', '.join(SHAPES)}")
    return names


def _modes(text: str) -> list[str]:
    from mlx_deepseek.bench.modes import MODES
    from mlx_deepseek.errors import DeepSeekError

    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in MODES]
    if bad or not names:
        raise DeepSeekError(f"--modes {text!r}: choose from {', '.join(MODES)}, comma-separated")
    return names


def _check_v4_options(names: list[str], decode_tokens: int | None, profile: bool,
                      kernels: bool) -> None:  # fmt: skip
    """What a V4 shape cannot do: decode more tokens per repeat than its cache rolls back
    exactly, --profile / --kernels (they time V2/V3's module tree)."""
    from mlx_deepseek.errors import DeepSeekError
    from mlx_deepseek.models.v4_cache import MAX_ROLLBACK

    v4 = [n for n in names if SHAPES[n]().family == "v4"]
    if not v4:
        return
    if decode_tokens is not None and decode_tokens > MAX_ROLLBACK:
        raise DeepSeekError(
            f"--decode-tokens {decode_tokens}: a V4 shape ({v4[0]}) decodes at most "
            f"{MAX_ROLLBACK} tokens per repeat (its cache rolls back that far); give fewer"
        )
    if profile or kernels:
        flag = "--profile" if profile else "--kernels"
        raise DeepSeekError(f"{flag} does not take a V4 shape ({v4[0]}): leave it out of --shape")


def bench_command(
    shape: Annotated[
        list[str] | None,
        typer.Option(
            "--shape",
            "-s",
            help=f"Synthetic model(s): {', '.join(SHAPES)} (repeat or comma-separate). "
            "Default: v2-lite and v3, unless --model is given.",
        ),
    ] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option(
            "--model",
            help="A real checkpoint folder to measure as well (mlx-lm is compared when it can "
            "load it).",
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the full result as JSON here.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Write a PNG of decode tok/s vs context (needs the plot extra)."
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Compute dtype for BOTH runtimes (default: float32 on CPU, bfloat16 on GPU)."
        ),  # fmt: skip
    ] = None,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(
            help="Prefill prompt length; 0 skips prefill. (default: 512 on a GPU, 8 on CPU)"
        ),
    ] = None,
    contexts: Annotated[str, typer.Option(help="Decode contexts.")] = "128,2048,8192",
    prefill_contexts: Annotated[
        str,
        typer.Option(
            help="Also time a prefill of --prompt-tokens tokens on a cache already holding "
            "this many positions (comma-separated; a long prompt's chunk at that depth)."
        ),
    ] = "",
    decode_tokens: Annotated[
        int | None,
        typer.Option(help="Timed decode steps per repeat. (default: 16 on a GPU, 1 on CPU)"),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(help="Repeats of each measurement. (default: 5 on a GPU, 4 on CPU)"),
    ] = None,
    bits: Annotated[int, typer.Option(help="Quantization bits of the synthetic models.")] = 4,
    group_size: Annotated[int, typer.Option(help="Quantization group size.")] = 64,
    cache_dir: Annotated[
        Path, typer.Option(help="Where the synthetic checkpoints are written once.")
    ] = DEFAULT_CACHE,
    bandwidth_gb: Annotated[
        float, typer.Option(help="Size of the array summed to measure read bandwidth.")
    ] = 2.0,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile", help="Also time each part of a decode step (attention, MLP, head)."
        ),
    ] = False,
    modes: Annotated[
        str | None,
        typer.Option(
            help="How each context is reached, comma-separated: cache (random values), "
            "prefill (real prefill), mlx-first (cache, in a process that imported mlx.core "
            "first). Default: all three for the attn shape, cache for the others."
        ),
    ] = None,
    mtp_draft_tokens: Annotated[
        int,
        typer.Option(help="Drafts per step for the MTP rows (models with an MTP layer; 0: none)."),
    ] = 1,
    note: Annotated[
        str | None, typer.Option(help="A line saved with the result (e.g. 'machine shared').")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Exit 1 if a target is missed: decode >= mlx-lm at every context in every "
            "mode, KV cache, prefill speed and peak memory (for CI).",
        ),
    ] = False,
    kernels: Annotated[
        bool,
        typer.Option(
            "--kernels",
            help="Instead: mlx-deepseek alone, its Metal kernels on vs off: decode tok/s, each "
            "layer's time and the GB/s of weights read (needs Metal for the 'on' side).",
        ),
    ] = False,
) -> None:
    """Benchmark mlx-deepseek against mlx-lm on the same models, in one run."""
    from rich.console import Console

    from mlx_deepseek.errors import DeepSeekError

    from ..bench.harness import Settings, run
    from ..bench.report import check_chart_support, print_report, write_chart, write_json

    if (repeats or 1) < 1 or (decode_tokens or 1) < 1 or (prompt_tokens or 0) < 0:
        raise DeepSeekError("--repeats and --decode-tokens must be >= 1 and --prompt-tokens >= 0")
    mode_list = _modes(modes) if modes else None
    if not 0 <= mtp_draft_tokens <= 8:
        raise DeepSeekError(f"--mtp-draft-tokens {mtp_draft_tokens}: give 0 (none) to 8")
    if kernels and (plot or check or profile):
        raise DeepSeekError("--kernels does not take --plot, --check or --profile")
    if plot:
        check_chart_support()
    models = list(model or [])
    for p in models:
        if not p.expanduser().is_dir():
            raise DeepSeekError(f"--model {p}: no such folder")
    names = _shape_names(shape) if shape else ([] if models else ["v2-lite", "v3"])
    _check_v4_options(names, decode_tokens, profile, kernels)
    if kernels:
        _kernel_bench(names, models, dtype, contexts, decode_tokens, repeats, bits, group_size,
                      cache_dir, json_path, note)  # fmt: skip
        return
    settings = Settings(
        shapes=names,
        models=[p.expanduser() for p in models],
        dtype=dtype,
        prompt_tokens=prompt_tokens,
        contexts=_ints(contexts, "--contexts"),
        prefill_contexts=_ints(prefill_contexts, "--prefill-contexts") if prefill_contexts else [],
        decode_tokens=decode_tokens,
        repeats=repeats,
        bits=bits,
        group_size=group_size,
        cache_dir=cache_dir,
        bandwidth_gb=bandwidth_gb,
        profile=profile,
        modes=mode_list,
        mtp_draft_tokens=mtp_draft_tokens,
    )
    # wide enough for the tables when the output is a file or a CI log
    console = Console() if sys.stdout.isatty() else Console(width=140)
    err = Console(stderr=True)
    result = run(settings, log=lambda msg: err.print(f"[dim]{msg}[/]"))
    if note:
        result["settings"]["note"] = note
    print_report(result, console)
    if json_path:
        write_json(result, json_path)
        console.print(f"wrote {json_path}")
    if plot:
        write_chart(result, plot)
        console.print(f"wrote {plot}")
    if check:
        from ..bench.harness import missed_targets

        missed = missed_targets(result)
        if missed:
            raise DeepSeekError("targets missed: " + "; ".join(missed))


def _kernel_bench(
    names, models, dtype, contexts, decode_tokens, repeats, bits, group_size, cache_dir, json_path,
    note,
) -> None:  # fmt: skip
    """`bench --kernels` (kernel_bench.py)."""
    import mlx.core as mx
    from rich.console import Console

    from ..bench import kernel_bench
    from ..bench.report import write_json

    gpu = mx.default_device() == mx.gpu
    settings = kernel_bench.KernelSettings(
        shapes=names,
        models=[p.expanduser() for p in models],
        dtype=dtype,
        contexts=_ints(contexts, "--contexts"),
        decode_tokens=decode_tokens or (16 if gpu else 1),
        repeats=repeats or (5 if gpu else 3),
        bits=bits,
        group_size=group_size,
        cache_dir=cache_dir,
    )
    console = Console() if sys.stdout.isatty() else Console(width=140)
    err = Console(stderr=True)
    result = kernel_bench.run(settings, log=lambda msg: err.print(f"[dim]{msg}[/]"))
    if note:
        result["settings"]["note"] = note
    kernel_bench.print_report(result, console)
    if json_path:
        write_json(result, json_path)
        console.print(f"wrote {json_path}")
