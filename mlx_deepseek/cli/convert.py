"""`mlx-deepseek convert`: the typer command (heavy imports happen inside it)."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class RecipeName(str, Enum):
    uniform = "uniform"
    mixed = "mixed"
    native = "native"


class DtypeName(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1000000' -> bytes."""
    from mlx_deepseek.errors import DeepSeekError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise DeepSeekError(f"--shard-size {text!r}: give a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def convert_command(
    src: Annotated[
        str, typer.Argument(help="Hugging Face checkpoint: a local folder or hub repo id.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to create (DST).")],
    bits: Annotated[int, typer.Option(help="Bits per quantized weight: 2, 3, 4, 5, 6 or 8.")] = 4,
    group_size: Annotated[int, typer.Option(help="Weights per scale/bias: 32, 64 or 128.")] = 64,
    recipe: Annotated[
        RecipeName,
        typer.Option(
            help="uniform: every linear layer at --bits. mixed: routed experts at --bits; "
            "attention, shared experts, dense layers, embeddings and lm_head at 6 bits (8 for "
            "--bits 5/6/8); router and norms unquantized. native (DeepSeek V4): every weight as "
            "released, nothing rounded: FP8 -> mxfp8, FP4 -> mxfp4, the rest unquantized. "
            "V4's FP4 routed experts are always kept as mxfp4, bit for bit."
        ),
    ] = RecipeName.uniform,
    dtype: Annotated[
        DtypeName | None,
        typer.Option(help="dtype of unquantized tensors and scales (default: the source's)."),
    ] = None,
    no_quantize: Annotated[
        bool, typer.Option("--no-quantize", help="Only convert the dtype.")
    ] = False,
    mtp: Annotated[
        bool,
        typer.Option("--mtp/--no-mtp", help="Keep the multi-token-prediction layer (V3, V4)."),
    ] = True,
    shard_size: Annotated[str, typer.Option(help="Largest output shard.")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    upload_repo: Annotated[
        str | None, typer.Option(help="Upload the result to this Hugging Face repo.")
    ] = None,
) -> None:
    """Convert a Hugging Face DeepSeek checkpoint (bf16, FP8, V4's FP8/FP4) into an MLX one."""
    from rich.console import Console
    from rich.filesize import decimal
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from ..convert.destination import Interrupted
    from ..convert.pipeline import convert, upload
    from ..convert.plan import Options

    options = Options(
        bits=bits,
        group_size=group_size,
        recipe=recipe.value,
        dtype=dtype.value if dtype else None,
        quantize=not no_quantize,
        mtp=mtp,
        shard_size=parse_size(shard_size),
    )
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]converting"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task("convert", total=None)

    started = []

    def on_plan(plan) -> None:  # the bar appears once the checkpoint has passed every check
        bar.update(task, total=plan.read_bytes)
        bar.start()
        started.append(True)

    try:
        summary = convert(
            src,
            output,
            options,
            force=force,
            on_plan=on_plan,
            on_progress=lambda n: bar.advance(task, n),
        )
    except Interrupted as e:  # SIGTERM / SIGHUP: cleaned up; exit as the signal asks
        console.print(f"interrupted by {e}: nothing was written")
        raise typer.Exit(128 + e.signum) from None
    finally:
        if started:
            bar.stop()
    for note in summary.notes:
        console.print(f"note: {note}")
    how = (
        "unquantized"
        if no_quantize
        else "native recipe: FP8 as mxfp8, FP4 as mxfp4"
        if recipe == RecipeName.native
        else f"{recipe.value} recipe, {bits}-bit experts, group size {group_size}"
    )
    console.print(
        f"[green]converted[/] {summary.src} -> {summary.dst}\n"
        f"  {how}: {summary.bits_per_weight:.2f} bits per weight, "
        f"{decimal(summary.write_bytes)} in {len(summary.files)} file(s) "
        f"(from {decimal(summary.read_bytes)})\n"
        f"  {summary.seconds:.1f} s, {decimal(int(summary.rate))}/s"
    )
    if upload_repo:
        console.print(f"uploaded: {upload(summary.dst, upload_repo)}")
