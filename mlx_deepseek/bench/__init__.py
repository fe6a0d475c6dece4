"""`mlx-deepseek bench`: mlx-deepseek and mlx-lm side by side, same models, one process.

models.py    synthetic DeepSeek checkpoints (V2-Lite-, V3-shaped), quantized by both tools
runtimes.py  loading each runtime, filling caches, prefill and decode steps
counting.py  MLX primitives per decoded token (the counting rule is in its docstring)
metrics.py   bytes read per token, the machine's read bandwidth, statistics
harness.py   the run: interleaved, repeated measurements and the derived ratios
report.py    the rich table, the JSON file, the PNG chart
cli.py       the typer command (also scripts/bench.py)
"""
