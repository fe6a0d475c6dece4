"""Registers every `mlx-deepseek` subcommand on the shared typer app.

Each command's body lives in the module named for it and is imported inside the command,
so `mlx-deepseek --help` stays fast.
"""

from .cli import app
from .convert.cli import convert_command  # light: typer only; the converter loads when it runs

app.command("convert")(convert_command)
from .cli_info import info_command  # noqa: E402

app.command("info")(info_command)
from .chat.cli import chat  # noqa: E402
from .cli_generate import generate  # noqa: E402

app.command("generate")(generate)
app.command("chat")(chat)
from .bench.cli import bench_command  # noqa: E402  (light: typer only)

app.command("bench")(bench_command)
