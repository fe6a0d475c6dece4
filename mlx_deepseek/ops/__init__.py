"""The named operations the models use, each with one signature and back-end implementations.

- sparse.py: DeepSeek V3.2's sparse attention (the lightning indexer's scores and top-k, and
  attention over the selected latent rows), plain MLX.
"""
