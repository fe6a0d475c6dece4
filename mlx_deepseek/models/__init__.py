"""The model architectures, one module per family, and what they share.

- deepseek_v3.py: DeepSeek V2 / V2.5 / Coder-V2 / V3 / R1 / V3.1 (MLA + DeepSeekMoE, MTP)
- mla.py: Multi-head Latent Attention with the latent KV cache
- moe.py: DeepSeekMoE (routing, the MoE block, the SwiGLU MLP)
- config.py, rope.py, cache.py: the config fields, RoPE / YaRN, the model's cache

The model code is pure MLX maths: every operation with a faster back-end goes through
mlx_deepseek.ops, which picks the implementation.
"""
