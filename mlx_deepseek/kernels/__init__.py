"""Custom Metal kernels: the runtime (runtime.py) and one module per kernel family.

The sources live in the top-level metal_kernels/ folder (shipped as package data).
"""
