"""mlx-deepseek: DeepSeek's MoE/MLA language models on Apple Silicon with MLX.

from mlx_deepseek import load, generate, stream_generate
model, tokenizer = load("demo")
print(generate(model, tokenizer, [{"role": "user", "content": "What is 23 + 45?"}]))
"""

from ._blas import preload_openblas

preload_openblas()  # must run before mlx.core is first imported

__version__ = "0.1.0"

# The public API loads lazily, so `mlx-deepseek --help` does not import MLX and transformers.
_API = {
    "load": "loading",
    "load_model": "loading",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationResponse": "generation",
    "SamplingSettings": "sampling",
    "Drafting": "speculative",
    "ModelArgs": "models.config",
    "Model": "models.deepseek_v3",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module = importlib.import_module(f".{_API[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
