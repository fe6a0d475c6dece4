"""Registers every `mlx-deepseek` subcommand on the shared typer app.

Each command's body lives in the module named for it and is imported inside the command,
so `mlx-deepseek --help` stays fast.
"""
