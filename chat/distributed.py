"""The chat across ranks (--parallel): rank 0 runs the REPL, the other ranks follow.

Every rank runs the same Repl over its own ChatSession (the same conversation, the same
cache bookkeeping, the same generation loop on the same logits). Only rank 0 reads the
keyboard and prints: each input event (a line, end of input, Ctrl-C at the prompt) is shared
with the others, whose console writes to /dev/null; the per-token stop check shares rank 0's
Ctrl-C flag, so an answer stops at the same token on every rank. /save and /load are refused:
each rank holds only part of the cache.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

from mlx_deepseek.distributed import World, is_peer_error
from mlx_deepseek.errors import DeepSeekError

from .repl import Repl
from .session import ChatSession


class RankRepl(Repl):
    """A Repl on one rank of a distributed chat (see the module docstring)."""

    def __init__(self, session: ChatSession, world: World, debug: bool = False):
        self.world = world
        if world.leader:
            super().__init__(session, read_line=self._read_and_share, debug=debug)
        else:
            quiet = Console(file=open(os.devnull, "w"), highlight=False)
            super().__init__(session, console=quiet, read_line=self._read_shared, debug=debug)

    # ---- input: rank 0 reads, the others receive -------------------------------------------

    def _read_and_share(self, prompt: str) -> str:
        try:
            line = input(prompt)
        except EOFError:
            self.world.share(["eof"])
            raise
        except KeyboardInterrupt:
            self.world.share(["interrupt"])
            raise
        except UnicodeDecodeError:
            self.world.share(["undecodable"])
            raise
        self.world.share(["line", line])
        return line

    def _read_shared(self, prompt: str) -> str:
        event = self.world.share(None)
        if event[0] == "eof":
            raise EOFError
        if event[0] == "interrupt":
            raise KeyboardInterrupt
        if event[0] == "undecodable":
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "not UTF-8")
        return event[1]

    # ---- the same stop everywhere ------------------------------------------------------------

    def stop_requested(self) -> bool:
        return self.world.flag(self._stop)

    def answer(self, text: str) -> None:
        try:
            super().answer(text)
        except Exception as e:
            if is_peer_error(e):
                self.world.peer_lost(e)  # another rank went away: end all (no return)
            raise

    def command(self, line: str) -> Any:
        name = line.partition(" ")[0]
        if name in ("/save", "/load"):
            raise DeepSeekError(
                f"{name} is not available with --parallel: each rank holds part of the cache"
            )
        return super().command(line)
