"""Named operations the models call, one signature each, with back-end implementations.

- v4.py: DeepSeek V4's own operations (compressor pooling, sparse gather attention, the
  lightning indexer's scores and top-k, hyper-connection mixing, Sinkhorn), as plain MLX.
"""
