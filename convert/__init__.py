"""`mlx-deepseek convert`: Hugging Face DeepSeek checkpoints (bf16 / FP8) -> MLX, streamed.

from mlx_deepseek.convert import Options, convert
convert("deepseek-ai/DeepSeek-V2-Lite-Chat", "v2-lite-4bit", Options(bits=4, recipe="mixed"))
"""

from typing import Any

__all__ = ["Options", "Summary", "convert"]


def __getattr__(name: str) -> Any:
    # lazy, so that registering the CLI command does not import the converter
    if name in ("convert", "Summary"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Options":
        from .plan import Options

        return Options
    raise AttributeError(name)
