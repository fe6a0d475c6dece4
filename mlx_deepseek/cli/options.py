"""Options that several commands share (one definition each), and the CLI's own state."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # the CLI imports MLX only when a command runs
    from ..sampling import SamplingSettings


class State:
    debug = False  # --debug or MLX_DEEPSEEK_DEBUG=1: show tracebacks


MODEL_HELP = (
    "Checkpoint folder, Hugging Face repo id, or 'demo' / 'demo-v4' (the bundled demo models)."
)

# The options `generate` and `chat` share (each command gives its own default value)
MaxTokens = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        "-m",
        help="Longest answer, in tokens. Default: 512 for generate, 4096 for chat, or the "
        "model's context if it is shorter.",
        show_default=False,
    ),
]
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
PrefillStepSize = Annotated[
    int, typer.Option("--prefill-step-size", help="Prompt tokens per prefill pass.")
]
DraftTokens = Annotated[
    int | None,
    typer.Option(
        "--draft-tokens",
        help="Tokens the MTP head drafts per step (1 is DeepSeek's; more apply it recursively). "
        "Default: 2 for a model with float weights on the CPU (the demo), else 1.",
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


class ParallelKind(str, Enum):
    pipeline = "pipeline"
    tensor = "tensor"
    auto = "auto"


Parallel = Annotated[
    ParallelKind | None,
    typer.Option(
        "--parallel",
        help="Split the model over the ranks that mlx.launch started (e.g. several Macs): "
        "pipeline (contiguous layer ranges sized by each rank's memory), tensor (attention heads "
        "and experts split, two reductions per layer) or auto (the cost model's choice).",
    ),
]


# How the checks of sampling settings name the options (the same words in chat and generate)
OPTION_NAMES = {
    "temperature": "--temp",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
}


@dataclass(frozen=True)
class SamplingOptions:
    """--temp, --top-p, --top-k, --min-p, --repetition-penalty and --seed as given (chat and
    generate); temp / top_p None: the model family's default, known once the model is loaded."""

    temp: float | None = None
    top_p: float | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None

    def settings(self, fmt: Any) -> SamplingSettings:
        """The SamplingSettings they ask for, the chat format's temperature / top_p where they
        are not given (greedy when fmt is None), validated in the options' words."""
        from ..sampling import SamplingSettings

        default_temp, default_top_p = (0.0, 1.0) if fmt is None else (fmt.temperature, fmt.top_p)
        return SamplingSettings(
            temperature=default_temp if self.temp is None else self.temp,
            top_p=default_top_p if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        ).validated(OPTION_NAMES)


def check_options(
    sampling: SamplingOptions,
    *,
    max_tokens: int | None,
    draft_tokens: int | None,
    prefill_step_size: int | None = None,
    expert_cache: str | None = None,
    kv_bits: int | None = None,
) -> None:
    """The checks `chat` and `generate` share, run before the model is loaded (a typo costs
    no loading time) and worded the same in both: `--top-p 2.0: must be in (0, 1] (1 = off)`."""
    from ..errors import ArgumentValueError

    check_memory_options(expert_cache, kv_bits)

    for option, value, low, high in (
        ("--max-tokens", max_tokens, 1, None),
        ("--draft-tokens", draft_tokens, 1, 8),
        ("--prefill-step-size", prefill_step_size, 1, None),
    ):
        if value is not None and (value < low or (high is not None and value > high)):
            rule = f"at least {low}" if high is None else f"from {low} to {high}"
            raise ArgumentValueError(f"{option} {value}: must be {rule}")
    # greedy stands in for the family's defaults (not known before loading; they are valid)
    sampling.settings(None)


def check_memory_options(expert_cache: str | None, kv_bits: int | None) -> None:
    """--expert-cache SIZE and --kv-bits checked before loading (chat, generate, serve)."""
    from ..errors import ArgumentValueError

    if kv_bits is not None and kv_bits not in (4, 8):
        raise ArgumentValueError(
            f"--kv-bits {kv_bits}: give 8 or 4 (or leave it out: full precision)"
        )
    if expert_cache is not None:
        from ..offload import parse_budget

        parse_budget(expert_cache)
