"""Options that several commands share (one definition each), and the CLI's own state."""

from __future__ import annotations

from typing import Annotated

import typer


class State:
    debug = False  # --debug or MLX_DEEPSEEK_DEBUG=1: show tracebacks


MODEL_HELP = "Checkpoint folder, Hugging Face repo id, or 'demo' (the bundled demo model)."

# The options `generate` and `chat` share (each command gives its own default value)
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-m", help="Longest answer, in tokens.")]
Temp = Annotated[
    float | None,
    typer.Option("--temp", help="Temperature (0 = greedy). Default: the model family's (R1: 0.6)."),
]
TopP = Annotated[
    float | None,
    typer.Option("--top-p", help="Nucleus sampling threshold in (0, 1]. Default: the family's."),
]
TopK = Annotated[
    int, typer.Option("--top-k", help="Sample among the K most likely tokens (0 = off).")
]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below min_p x the top one's.")]
RepetitionPenalty = Annotated[
    float | None,
    typer.Option("--repetition-penalty", help="Penalise the last 20 tokens (1 = off)."),
]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed (reproducible sampling).")]
System = Annotated[str | None, typer.Option("--system", help="A system prompt.")]
Mtp = Annotated[
    bool | None,
    typer.Option(
        "--mtp/--no-mtp",
        help="Draft tokens with the checkpoint's MTP head and verify them in one pass "
        "(self-speculative decoding; same output). Default: on when the checkpoint has an MTP "
        "layer.",
    ),
]
DraftTokens = Annotated[
    int,
    typer.Option(
        "--draft-tokens",
        help="Tokens the MTP head drafts per step (1 is DeepSeek's; more apply it recursively).",
    ),
]
ExpertCache = Annotated[
    str | None,
    typer.Option(
        "--expert-cache",
        metavar="SIZE",
        help="Keep at most SIZE of the routed experts in memory and read the others from the "
        "checkpoint's files when a token uses them (40GB, 512MiB, 25% of the experts, or auto: "
        "what fits). Default: all in memory.",
    ),
]
KvBits = Annotated[
    int | None,
    typer.Option(
        "--kv-bits",
        help="Quantize the latent KV cache (c_kv) to 8 or 4 bits: longer contexts in the same "
        "memory. Default: full precision.",
    ),
]
