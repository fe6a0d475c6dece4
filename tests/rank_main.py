"""`mlx-deepseek` as a test rank runs it: the console entry point, without importing torch."""

import no_torch  # noqa: F401  (before anything imports transformers)

from mlx_deepseek.cli import main

if __name__ == "__main__":
    main()
