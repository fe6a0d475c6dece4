"""mlx-deepseek: DeepSeek's MoE/MLA language models on Apple Silicon with MLX."""

from ._blas import preload_openblas

preload_openblas()  # must run before mlx.core is first imported

__version__ = "0.1.0"

from .loading import load, load_model  # noqa: E402

__all__ = ["load", "load_model", "__version__"]
