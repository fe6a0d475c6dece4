#!/usr/bin/env python3
"""The benchmark as a script (CI): the same as `mlx-deepseek bench`, with the same options.

python scripts/bench.py --json bench.json --plot bench.png
python scripts/bench.py --shape tiny-v2 --contexts 64 --prompt-tokens 16 --check
"""

import sys

from mlx_deepseek.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["bench"]
    main()
