"""The terminal chat: reads messages and slash commands, streams answers with rich.

Input is plain `input()` (with readline's line editing and history where available): a line
ending in a backslash continues on the next line, and a line holding only three double
quotes starts a paste block that ends at the next such line. Ctrl-C during an answer stops
it (INTERRUPT_HELP says what is kept); Ctrl-C twice at the prompt, Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.offload import expert_store

from .session import ChatSession, TurnStats
from .session_file import DEFAULT_NAME, SUFFIX

PROMPT = ">>> "
MORE = "... "
PASTE = '"""'

# C0/C1 control characters other than tab and newline: a model can emit them, and raw they
# would move the cursor or change the terminal's state.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\udc80-\udcff]")
NOT_UTF8 = "that input is not UTF-8 text (check your terminal's encoding); nothing was sent"

# What ChatSession.respond keeps when stopped (its _commit): an answer begun stays with the
# message it answers; a turn stopped while the model was still reasoning is dropped whole.
INTERRUPT_HELP = (
    "Ctrl-C during an answer stops it: the answer so far stays in the conversation. Stopped\n"
    "before the answer begins (the model still reading your message or thinking), the turn\n"
    "is dropped: neither your message nor its reasoning is kept."
)

HELP = """\
Commands:
  /help                 this list
  /reset                start a new conversation (keeps the system prompt and settings)
  /system [TEXT | -]    show, set or (with -) remove the system prompt
  /think [on | off]     show or switch the thinking mode (models with a switch: V3.1)
  /temp X               sampling temperature (0 = greedy)
  /top_p X              nucleus sampling threshold, in (0, 1]
  /top_k N              sample from the N most likely tokens (0 = off)
  /min_p X              drop tokens below X times the top token's probability (0 = off)
  /max_tokens N         longest answer, in tokens
  /save [FILE]          save the conversation and its cache (.safetensors is added to FILE
                        unless it ends so; default: {default})
  /load [FILE]          load a saved conversation (default: the same file)
  /stats                numbers for the last answer and the whole session
  /exit                 leave (also /quit, Ctrl-D, or Ctrl-C twice at the prompt)
Input: end a line with \\ to continue it; a line with only \"\"\" starts and ends a paste
block. Start a message with // to send a text that begins with /.
{interrupt}"""


def help_text() -> str:
    """/help's text; the default session file is named in full (the folder the chat runs in)."""
    return HELP.format(default=Path.cwd() / DEFAULT_NAME, interrupt=INTERRUPT_HELP)


class LeadingBlankLines:
    """Drops the blank lines a streamed answer starts with (after a reasoning block models
    write two newlines): `feed` returns what to show of each piece."""

    def __init__(self) -> None:
        self.pending = ""  # whitespace at the start, held back
        self.started = False

    def feed(self, text: str) -> str:
        if self.started:
            return text
        text = self.pending + text
        if not text.strip():
            self.pending = text
            return ""
        lead = len(text) - len(text.lstrip())
        self.started = True
        return text[text.rfind("\n", 0, lead) + 1 :]  # whole blank lines only


def printable(text: str) -> str:
    return _CONTROL.sub(lambda m: "" if m.group() == "\r" else "\ufffd", text)


def format_memory(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.0f} MB"


DEMO_BANNER = (
    "This is the bundled demo: a 1.2M-parameter model with DeepSeek-V3's architecture, trained "
    "for this repo (it adds, subtracts, counts, spells backwards, calls tools through the "
    "server; /think on shows its reasoning). For a real DeepSeek: "
    "mlx-deepseek chat mlx-community/DeepSeek-V2-Lite-Chat-4bit-mlx"
)
DEMO_V4_BANNER = (
    "This is the bundled V4 demo: the same data on DeepSeek-V4's architecture at a tiny size "
    "(sliding-window, compressed sparse and heavily compressed attention, hash routing, "
    "hyper-connections, MTP; DSML tool calls; /think on shows its reasoning)."
)


def stats_line(s: TurnStats) -> str:
    context = f"{s.context_tokens}" + (f"/{s.context_limit}" if s.context_limit else "")
    parts = [
        f"prefill {s.prompt_tokens} tok ({s.reused_tokens} cached) {s.prompt_tps:.1f} tok/s",
        f"generated {s.generation_tokens} tok {s.generation_tps:.1f} tok/s",
        f"context {context}",
        f"peak {format_memory(s.peak_memory)}",
    ]
    if s.acceptance_rate is not None:
        parts.append(f"MTP {s.acceptance_rate:.0%} accepted, {s.tokens_per_step:.2f} tok/step")
    if s.expert_cache is not None:
        parts.append(s.expert_cache.describe())
    if s.finish_reason == "length":
        parts.append("stopped at the token limit")
    return " · ".join(parts)


def memory_line(session: ChatSession) -> str:
    """The KV cache's precision and size, and the streamed experts since loading ('' when
    neither applies)."""
    parts = []
    bits = getattr(session.model, "kv_bits", None)
    if bits is not None:
        held = sum(c.nbytes for c in session.cache)
        parts.append(f"KV cache c_kv {bits}-bit, {format_memory(held / 1e9)} allocated")
    store = expert_store(session.model)
    if store is not None:
        total = store.snapshot()
        parts.append(
            f"{store.describe()}; since loading {total.hit_rate:.0%} hit, "
            f"{format_memory(total.bytes_read / 1e9)} read, {total.stall_seconds:.1f} s stalled"
        )
    return " · ".join(parts)


class Repl:
    """One interactive chat over a ChatSession (`run` returns the exit code)."""

    def __init__(
        self,
        session: ChatSession,
        console: Console | None = None,
        read_line: Callable[[str], str] = input,
        debug: bool = False,
    ):
        self.session = session
        self.console = console or Console(highlight=False)
        self.read_line = read_line
        self.debug = debug
        self._stop = False

    # ---- output ----------------------------------------------------------------------------

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def _write(self, text: str, style: str | None = None) -> None:
        self.console.print(
            printable(text), style=style, end="", markup=False, highlight=False, soft_wrap=True
        )

    def banner(self) -> None:
        s, fmt = self.session, self.session.fmt
        think = f", thinking {'on' if s.thinking else 'off'}" if fmt.has_thinking_switch else ""
        context = f" · context {s.context_limit} tokens" if s.context_limit else ""
        self.say(
            f"mlx-deepseek chat · {s.name or 'model'} · {fmt.family} format ({fmt.source})"
            f"{think}{context}",
            style="bold",
        )
        banner = {"demo": DEMO_BANNER, "demo-v4": DEMO_V4_BANNER}.get(s.name or "")
        if banner:
            self.say(banner, style="cyan")
        self.say(
            f"temperature {s.settings.temperature:g}, top_p {s.settings.top_p:g}, "
            f"max_tokens {s.max_tokens}. /help for commands; Ctrl-C stops an answer; "
            "Ctrl-D exits.",
            style="dim",
        )

    # ---- input -----------------------------------------------------------------------------

    def read_message(self) -> str:
        """One message: continuation lines (trailing backslash) and paste blocks joined."""
        line = self.read_line(PROMPT)
        if line.strip() == PASTE:
            lines = []
            while (line := self.read_line("")).strip() != PASTE:
                lines.append(line)
            return "\n".join(lines)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = self.read_line(MORE)
        lines.append(line)
        return "\n".join(lines)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        self.banner()
        armed = False  # a Ctrl-C at the prompt was pressed: a second one exits
        while True:
            try:
                text = self.read_message()
            except EOFError:
                self.say("")
                return 0
            except UnicodeDecodeError:
                self.say(f"error: {NOT_UTF8}", style="red")
                continue
            except KeyboardInterrupt:
                if armed:
                    self.say("")
                    return 0
                armed = True
                self.say("\n(Ctrl-C again or Ctrl-D to exit)", style="dim")
                continue
            armed = False
            if not text.strip():
                continue
            if _SURROGATE.search(text):  # undecodable bytes, kept by errors="surrogateescape"
                self.say(f"error: {NOT_UTF8}", style="red")
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    if self.command(text.strip()) == "exit":
                        return 0
                else:
                    self.answer(text[1:] if text.startswith("//") else text)
            except DeepSeekError as e:
                self.say(f"error: {e}", style="red")
            except Exception as e:  # keep the conversation alive on anything unexpected
                if self.debug:
                    raise
                self.say(f"error: {type(e).__name__}: {e}", style="red")

    def answer(self, text: str) -> None:
        """Stream one answer; Ctrl-C (SIGINT) stops it between tokens."""
        self._stop = False

        def on_sigint(signum: int, frame: Any) -> None:
            self._stop = True

        shown = False  # a prefill progress line is on screen
        start = time.monotonic()

        def progress(done: int, total: int) -> None:
            nonlocal shown
            # only for prefills long enough to wonder about (a pasted document)
            if done < total and self.console.is_terminal and time.monotonic() - start > 1.0:
                self.console.file.write(f"\r\x1b[2K[prefill {done}/{total} tokens]")
                self.console.file.flush()
                shown = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        kind = None
        reasoning_end = ""  # whitespace at the end of the reasoning so far, held back
        answer = LeadingBlankLines()
        try:
            for chunk in self.session.respond(text, stop=self.stop_requested, progress=progress):
                if shown:
                    self.console.file.write("\r\x1b[2K")
                    shown = False
                if chunk.kind != kind:
                    if chunk.kind == "reasoning":
                        self._write("thinking: ", "dim bold")
                    elif kind == "reasoning":
                        self._write("\n\n")  # one blank line between reasoning and answer
                    kind = chunk.kind
                if kind == "reasoning":
                    body = (reasoning_end + chunk.text).rstrip()
                    reasoning_end = (reasoning_end + chunk.text)[len(body) :]
                    self._write(body, "dim italic")
                else:
                    self._write(answer.feed(chunk.text))
        finally:
            signal.signal(signal.SIGINT, previous)
            if shown:
                self.console.file.write("\r\x1b[2K")
        self.say("")
        stats = self.session.last
        if stats is None:
            return
        if stats.finish_reason == "interrupted":
            kept = (
                "the answer so far is kept"
                if stats.kept
                else "before the answer began: your message and its reasoning are not kept"
            )
            self.say(f"[interrupted: {kept}]", style="yellow")
        self.say(stats_line(stats), style="dim")

    def stop_requested(self) -> bool:
        """Polled after every token and prefill chunk: whether Ctrl-C asked to stop."""
        return self._stop

    # ---- slash commands --------------------------------------------------------------------

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            self.say(help_text())
        elif name == "/reset":
            s.reset()
            self.say("new conversation", style="dim")
        elif name == "/system":
            if not arg:
                self.say(f"system prompt: {s.system!r}" if s.system else "no system prompt")
            else:
                s.set_system(None if arg == "-" else arg)
                self.say(
                    "system prompt removed" if arg == "-" else "system prompt set", style="dim"
                )
        elif name == "/think":
            if arg:
                if arg not in ("on", "off"):
                    raise DeepSeekError(f"/think {arg}: say /think on or /think off")
                s.set_thinking(arg == "on")
            elif not s.fmt.has_thinking_switch:
                s.set_thinking(True)  # raises the explanation
            self.say(f"thinking {'on' if s.thinking else 'off'}", style="dim")
        elif name in _SETTINGS:
            field, parse = _SETTINGS[name]
            if not arg:
                self.say(f"{field} = {getattr(s.settings, field)}")
                return None
            s.settings = s.settings.with_(**{field: _parse(name, arg, parse)})
            self.say(f"{field} = {getattr(s.settings, field)}", style="dim")
        elif name == "/max_tokens":
            if arg:
                n = _parse(name, arg, int)
                if n < 1:
                    raise DeepSeekError(f"/max_tokens {arg}: must be at least 1")
                s.max_tokens = n
            self.say(f"max_tokens = {s.max_tokens}", style="dim")
        elif name == "/save":
            path = s.save(arg or DEFAULT_NAME)
            added = f" ({SUFFIX} added to the name)" if arg and not arg.endswith(SUFFIX) else ""
            self.say(
                f"saved {len(s.messages)} messages and {len(s.tokens)} cached tokens to "
                f"{path}{added}"
            )
        elif name == "/load":
            path = s.load(arg or DEFAULT_NAME)
            self.say(
                f"loaded {len(s.messages)} messages ({len(s.tokens)} cached tokens) from {path}"
            )
        elif name == "/stats":
            self.show_stats()
        else:
            self.say(f"unknown command {name}; /help lists the commands", style="red")
        return None

    def show_stats(self) -> None:
        s = self.session
        st = s.settings
        self.say(
            f"turns {s.totals.turns} · prefilled {s.totals.prompt_tokens} tok · generated "
            f"{s.totals.generation_tokens} tok · cache {len(s.tokens)}"
            + (f"/{s.context_limit}" if s.context_limit else "")
            + " tokens"
        )
        self.say(
            f"temperature {st.temperature:g} · top_p {st.top_p:g} · top_k {st.top_k} · "
            f"min_p {st.min_p:g} · max_tokens {s.max_tokens}"
        )
        memory = memory_line(s)
        if memory:
            self.say(memory)
        if s.last is not None:
            self.say("last answer: " + stats_line(s.last))


def _parse(name: str, arg: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(arg)
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise DeepSeekError(f"{name} {arg}: not {kind}") from None


_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "/temp": ("temperature", float),
    "/top_p": ("top_p", float),
    "/top_k": ("top_k", int),
    "/min_p": ("min_p", float),
}
