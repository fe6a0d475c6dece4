"""The streaming output parser: model text in, reasoning / content / tool-call events out.

    parser = fmt.output_parser(starts_in_reasoning=True)
    for piece in stream:                 # any chunking, down to one character
        for event in parser.feed(piece):
            ...                          # Event("reasoning" | "content" | "tool_call", ...)
    events = parser.finish()

- Reasoning is the text inside `<think>...</think>`: from the start when the prompt opened
  the block, or when the answer itself opens with `<think>` (R1-style fine-tunes).
- Tool calls are recognised in content AND in reasoning (V3.1 and V3.2 call tools while
  thinking); each call is one "tool_call" event with its name, a JSON-object `arguments`
  string and an id (the model's own for Kimi, else `call_<n>`).
- Markers split across chunks are held back until they are decided; text that cannot
  start a marker is released at once.
- Nothing raises: a call that does not parse (bad JSON, missing name, junk between calls,
  an unterminated block at `finish()`) comes back as content, verbatim.
- Whitespace just before a tool-call block is dropped (DSML writes "\\n\\n" there); at the
  end of the output it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from .families import THINK_END, THINK_START
from .toolcalls import FORMATS, ToolFormat


@dataclass
class Event:
    kind: str  # "reasoning", "content" or "tool_call"
    text: str = ""  # reasoning / content text
    name: str | None = None  # tool_call: the function's name
    arguments: str | None = None  # tool_call: a JSON object, as text
    id: str | None = None  # tool_call: the call's id


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class OutputParser:
    """Splits one answer's streamed text into Events (see the module docstring)."""

    def __init__(
        self,
        tool_format: str | ToolFormat | None = "v3",
        starts_in_reasoning: bool = False,
        detect_reasoning: bool = True,
        id_prefix: str = "call_",
    ):
        self.fmt = FORMATS[tool_format] if isinstance(tool_format, str) else tool_format
        self.in_reasoning = starts_in_reasoning
        # "start": the answer may still open a thinking block itself
        self.state = "text" if starts_in_reasoning or not detect_reasoning else "start"
        self.buffer = ""
        self.raw = ""  # the current tool section's text so far (returned if malformed)
        self.id_prefix = id_prefix
        self.calls = 0
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[Event] = []

    # ---- public --------------------------------------------------------------------------

    def feed(self, text: str) -> list[Event]:
        """Events decided by the text so far (the rest waits for more text or finish())."""
        out: list[Event] = []
        self.buffer += text
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[Event]:
        """The events of whatever is still held; the parser is then spent."""
        out: list[Event] = []
        while self._step(out, final=True):
            pass
        if self.state in ("section", "call"):  # an unterminated tool block: it was text
            self._emit(out, "text", self.raw + self.buffer)
        else:
            self._emit(out, "text", self.buffer)
        self.buffer, self.raw, self.state = "", "", "text"
        return out

    # ---- the state machine ---------------------------------------------------------------

    def _step(self, out: list[Event], final: bool) -> bool:
        """Consume what can be decided; True when it made progress and may go on."""
        if not self.buffer:
            return False
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(THINK_START):
                self.buffer = head[len(THINK_START) :]
                self.in_reasoning, self.state = True, "text"
                return True
            if THINK_START.startswith(head) and not final:
                return False  # could still be "<think>"
            self.state = "text"
            return True
        if self.state == "text":
            return self._text(out, final)
        if self.state == "section":
            return self._section(out, final)
        return self._call(out, final)

    def _text(self, out: list[Event], final: bool) -> bool:
        fmt = self.fmt
        markers = fmt.section_begin if fmt else ()
        if self.in_reasoning:
            markers = (*markers, THINK_END)
        i, marker = _find_first(self.buffer, markers)
        if marker is None:
            keep = 0 if final else _held(self.buffer, markers)
            head = self.buffer[: len(self.buffer) - keep]
            if not final:  # trailing whitespace may precede a tool block: hold it
                stripped = head.rstrip()
                keep += len(head) - len(stripped)
                head = stripped
            self._emit(out, "text", head)
            self.buffer = self.buffer[len(head) :]
            return False
        before = self.buffer[:i]
        self.buffer = self.buffer[i + len(marker) :]
        if marker == THINK_END:
            self._emit(out, "text", before)
            self.in_reasoning = False
        else:  # whitespace before a tool block is dropped, unless the block is not one
            text = before.rstrip()
            self._emit(out, "text", text)
            self.raw, self.state = before[len(text) :] + marker, "section"
        return True

    def _section(self, out: list[Event], final: bool) -> bool:
        fmt = self.fmt
        markers = (fmt.call_begin, *fmt.section_end)
        i, marker = _find_first(self.buffer, markers)
        if marker is None:
            if self.buffer.strip() and not self._could_be(self.buffer.lstrip(), markers):
                self._malformed(out, self.buffer)  # text that is no call: the block was text
                self.buffer = ""
            return False
        junk = self.buffer[:i]
        if junk.strip():
            self._malformed(out, junk)
            self.buffer = self.buffer[i:]
            return True
        self.raw += self.buffer[: i + len(marker)]
        self.buffer = self.buffer[i + len(marker) :]
        if marker == fmt.call_begin:
            self.state = "call"
        else:
            self.raw, self.state = "", "text"
        return True

    def _call(self, out: list[Event], final: bool) -> bool:
        i = self.buffer.find(self.fmt.call_end)
        if i < 0:
            return False
        body = self.buffer[:i]
        call = self.fmt.parse_call(body)
        raw = self.raw + body + self.fmt.call_end
        self.buffer = self.buffer[i + len(self.fmt.call_end) :]
        if call is None:  # the block so far goes back as text; what follows is text too
            self._malformed(out, raw[len(self.raw) :])
            return True
        call_id = call.id or f"{self.id_prefix}{self.calls}"
        event = Event("tool_call", name=call.name, arguments=call.arguments, id=call_id)
        self.calls += 1
        self.tool_calls.append(event)
        out.append(event)
        self.raw, self.state = "", "section"
        return True

    # ---- helpers -------------------------------------------------------------------------

    def _could_be(self, text: str, markers: tuple[str, ...]) -> bool:
        return any(m.startswith(text) for m in markers)

    def _malformed(self, out: list[Event], text: str) -> None:
        """The section so far and `text` were not a tool block: give them back as text."""
        self._emit(out, "text", self.raw + text)
        self.raw, self.state = "", "text"

    def _emit(self, out: list[Event], kind: str, text: str) -> None:
        if not text:
            return
        if kind == "text":
            kind = "reasoning" if self.in_reasoning else "content"
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.content += text
        if out and out[-1].kind == kind:
            out[-1].text += text
        else:
            out.append(Event(kind, text))


def _find_first(text: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    best, found = len(text) + 1, None
    for m in markers:
        i = text.find(m)
        if 0 <= i < best:
            best, found = i, m
    return (best, found) if found else (-1, None)
