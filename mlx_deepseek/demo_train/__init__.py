"""Training code for the bundled demo model (mlx_deepseek/demo/).

Run ``python -m mlx_deepseek.demo_train.train`` to reproduce it; see README.md here.
"""
