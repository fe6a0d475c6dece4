"""The real chat REPL driven through a pseudo-terminal: typing, slash commands, Ctrl-C.

The chat runs as its own process (the console entry point) on a pty, so readline, rich's
terminal output and SIGINT from the terminal's Ctrl-C behave as for a user.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

import pytest
from tiny_chat import tiny_checkpoint, tokenizer_only

ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>])")
STATS = re.compile(r"prefill (\d+) tok \((\d+) cached\).*?generated (\d+) tok.*?context (\d+)/")


class Terminal:
    """A child process on a pty, with expect-style reading of its (ANSI-stripped) output."""

    def __init__(self, argv: list[str], cols: int = 200, rows: int = 50):
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
        env.pop("NO_COLOR", None)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            os.execvpe(argv[0], argv, env)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.raw = b""
        self.pos = 0  # expect() searches the clean text from here
        self.status: int | None = None

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r", "")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            raise EOFError
        self.raw += data
        return True

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output:\n{self.text}")
            try:
                self._read(min(left, 0.2))
            except EOFError:
                raise AssertionError(f"exited before {pattern!r}; output:\n{self.text}") from None

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def line(self, text: str) -> None:
        self.send(text + "\r")

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._read(0.1)
            except EOFError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        raise AssertionError(f"the chat did not exit; output:\n{self.text}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


@pytest.fixture
def chat():
    path = tiny_checkpoint()
    argv = [sys.executable, "-c", "from mlx_deepseek.cli import main; main()", "chat", str(path)]
    term = Terminal(argv + ["--temp", "0", "--max-tokens", "12"])
    yield term
    term.close()
    if os.environ.get("MLX_DEEPSEEK_SHOW_TRANSCRIPT"):
        print("\n----- transcript -----\n" + term.text)


def stats(term: Terminal) -> tuple[int, int, int, int]:
    """(prefilled, cached before the turn, generated, in the cache after) of the last answer."""
    m = term.expect(STATS.pattern)
    term.expect(">>> ")
    return tuple(int(g) for g in m.groups())


def test_multi_turn_commands_and_ctrl_c_in_a_real_terminal(chat):
    tok = tokenizer_only()
    chat.expect(r"mlx-deepseek chat · tiny-deepseek-v3 · v3 format", timeout=120)
    chat.expect(">>> ")

    # turn 1: BOS <｜User｜> text <｜Assistant｜>
    chat.line("Hello there")
    p1, cached1, g1, ctx1 = stats(chat)
    assert cached1 == 0 and g1 == 12 and ctx1 == p1 + 11  # the 12th token was never fed
    turn1 = "<｜begin▁of▁sentence｜><｜User｜>Hello there<｜Assistant｜>"
    assert p1 == len(tok.encode(turn1, add_special_tokens=False))

    # slash commands, an unknown one, and a two-line message (backslash continues it)
    chat.line("/temp 0")
    chat.expect("temperature = 0.0")
    chat.line("/frobnicate")
    chat.expect("unknown command /frobnicate; /help lists the commands")
    chat.line("Tell me\\")
    chat.expect(r"\.\.\. ")
    chat.line("a story")
    p2, cached2, g2, ctx2 = stats(chat)
    # turn 1 stopped at max tokens: its last token was never fed, so it comes with turn 2
    new2 = "<｜end▁of▁sentence｜><｜User｜>Tell me\na story<｜Assistant｜>"
    assert cached2 == ctx1
    assert p2 == 1 + len(tok.encode(new2, add_special_tokens=False))

    # a long answer, stopped with Ctrl-C in the middle
    chat.line("/max_tokens 1500")
    chat.expect("max_tokens = 1500")
    chat.line("Go on")
    chat.expect(r"(?s)Go on\n.{20}", timeout=60)  # the answer is streaming
    time.sleep(0.3)
    chat.send("\x03")
    chat.expect(r"\[interrupted: the answer so far is kept\]")
    p3, cached3, g3, ctx3 = stats(chat)
    assert 0 < g3 < 1500  # stopped part way
    assert ctx3 == cached3 + p3 + g3  # the partial answer is in the cache

    # the next turn prefills only the new tokens: the partial answer stayed in the cache
    chat.line("/max_tokens 12")
    chat.expect("max_tokens = 12")
    chat.line("Thanks")
    p4, cached4, g4, ctx4 = stats(chat)
    assert cached4 == ctx3
    new4 = "<｜end▁of▁sentence｜><｜User｜>Thanks<｜Assistant｜>"
    assert p4 == len(tok.encode(new4, add_special_tokens=False))

    chat.line("/stats")
    chat.expect(r"turns 4 · prefilled \d+ tok")
    chat.expect(">>> ")
    # Ctrl-C at the prompt warns, a second one exits cleanly. (Pause first, as a person
    # would: CPython's readline misses a SIGINT that lands between printing the prompt and
    # starting to wait for keys.)
    time.sleep(0.5)
    chat.send("\x03")
    chat.expect(r"Ctrl-C again or Ctrl-D to exit")
    time.sleep(0.5)
    chat.send("\x03")
    assert chat.wait() == 0
