"""Liveness of the ranks: heartbeats and exit notices over UDP, beside MLX's collectives.

MLX's collectives have no timeouts. A rank whose host stops answering (cable out, machine
asleep, process stopped) leaves the others blocked in a send or an all_sum for ever, and a
rank that exits leaves them a socket error (or a hang, if they were not talking to it). So
each rank runs a watcher thread that

- sends a heartbeat datagram to every other rank every `interval` seconds and notes theirs;
- when a rank exits, it tells the others why (`bye`: exit code, message, already reported);
- when a rank is silent for `timeout` seconds, or says it failed, the lowest-numbered rank
  still alive prints ONE line naming it and tells the others to end quietly; every rank
  exits (os._exit: a thread blocked inside a collective cannot be unwound).

This carries no model data (that is MLX's ring / JACCL); it only decides when to give up.
Messages are text: `mdsk <session> hb <rank>` and `mdsk <session> bye <rank> <code>
<reported> <message>`; the session is a random id rank 0 chose, so stray datagrams of
another job are ignored.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

ENV_TIMEOUT = "MLX_DEEPSEEK_PEER_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
INTERVAL = 0.5
# after a collective fails, a rank waits this long for the failed rank to be named (its
# bye, or its heartbeats stopping) before reporting what it knows
IDENTIFY_WAIT = 3.0


def peer_timeout() -> float:
    value = os.environ.get(ENV_TIMEOUT, "").strip()
    try:
        return float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT


@dataclass
class _Peer:
    address: tuple[str, int]
    name: str
    last_seen: float = field(default_factory=time.monotonic)
    gone: tuple[int, bool, str] | None = None  # (exit code, reported, message) from its bye


class Watch:
    """This rank's watcher (see the module docstring). `fatal` and `bye` are thread-safe."""

    def __init__(
        self,
        rank: int,
        sock: socket.socket,
        peers: dict[int, tuple[tuple[str, int], str]],
        session: str,
        out_fd: int,
        timeout: float | None = None,
    ):
        self.rank = rank
        self.sock = sock
        self.session = session
        self.out_fd = out_fd  # the real stderr, whatever fd 2 became
        self.timeout = peer_timeout() if timeout is None else timeout
        self.peers = {r: _Peer(addr, name) for r, (addr, name) in peers.items()}
        self._lock = threading.Lock()
        self._exiting = False
        self._rank0_done_at: float | None = None
        self._pending: float | None = None  # since when a failure waits for its reporter
        self._thread = threading.Thread(target=self._run, name="mlx-deepseek-liveness")
        self._thread.daemon = True

    def start(self) -> Watch:
        self.sock.settimeout(INTERVAL / 2)
        self._thread.start()
        return self

    # ---- exits -----------------------------------------------------------------------------

    def claim_exit(self) -> bool:
        """Mark this process as exiting; False if it already was (someone else reports)."""
        with self._lock:
            if self._exiting:
                return False
            self._exiting = True
            return True

    def bye(self, code: int, message: str = "", reported: bool = True) -> None:
        """Tell every other rank that this one is exiting (`reported`: its reason has been
        printed already, so they should end quietly)."""
        text = " ".join(message.split())[:900]
        payload = f"mdsk {self.session} bye {self.rank} {code} {int(reported)} {text}".encode()
        for peer in self.peers.values():
            for _ in range(3):  # datagrams may drop; a bye is sent thrice
                try:
                    self.sock.sendto(payload, peer.address)
                except OSError:
                    pass

    def say(self, line: str) -> None:
        """Write one line to the real stderr."""
        try:
            os.write(self.out_fd, (line.rstrip("\n") + "\n").encode())
        except OSError:
            pass

    def fatal(self, line: str | None, code: int = 1) -> None:
        """Print `line` (None: nothing) and end every rank: this process exits now."""
        if not self.claim_exit():
            return
        if line:
            self.say(line)
        self.bye(code, line or "", reported=True)
        _flush_std()
        os._exit(code)

    def peer_lost(self, error: BaseException) -> None:
        """After a collective failed (a peer closed its connection): name the rank that went,
        from its bye or its silence, and end every rank. Does not return."""
        deadline = time.monotonic() + IDENTIFY_WAIT
        failed = None
        while time.monotonic() < deadline:
            failed = self._failed(2.5 * INTERVAL + 0.5)
            if failed is not None and self._reports(failed):
                break
            time.sleep(INTERVAL / 4)
        if failed is not None and self.peers[failed].gone is None:
            self.fatal(self._describe(failed, "went away (its connection closed)"))
        self.fatal(self._describe(failed, f"lost the connection to another rank ({error})"))

    # ---- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        next_beat = 0.0
        beat = f"mdsk {self.session} hb {self.rank}".encode()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                for peer in self.peers.values():
                    if peer.gone is None:
                        try:
                            self.sock.sendto(beat, peer.address)
                        except OSError:
                            pass
                next_beat = now + INTERVAL
            try:
                data, _ = self.sock.recvfrom(2048)
                self._receive(data.decode("utf-8", "replace"))
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                time.sleep(INTERVAL / 2)
            failed = self._failed(self.timeout)
            if failed is not None:
                self._pending = self._pending or time.monotonic()
                if self._reports(failed) or time.monotonic() - self._pending > IDENTIFY_WAIT:
                    self.fatal(self._describe(failed, ""))
            if self._rank0_done_at is not None and time.monotonic() > self._rank0_done_at:
                # rank 0 finished normally and this rank still runs: nothing is left to do
                self.fatal(None, 0)

    def _receive(self, text: str) -> None:
        parts = text.split(" ", 6)
        if len(parts) < 4 or parts[0] != "mdsk" or parts[1] != self.session:
            return
        try:
            rank = int(parts[3])
        except ValueError:
            return
        peer = self.peers.get(rank)
        if peer is None:
            return
        peer.last_seen = time.monotonic()
        if parts[2] != "bye" or len(parts) < 6 or peer.gone is not None:
            return
        try:
            code, reported = int(parts[4]), parts[5] == "1"
        except ValueError:
            return
        peer.gone = (code, reported, parts[6] if len(parts) > 6 else "")
        if code == 0:
            if rank == 0:
                self._rank0_done_at = time.monotonic() + 5.0
        elif reported:  # it printed why: end quietly, with its code
            self.fatal(None, code)

    def _failed(self, limit: float) -> int | None:
        """The lowest rank that said it failed, or has been silent for `limit` seconds (a rank
        that said it exited cleanly is not expected to beat)."""
        now = time.monotonic()
        for r in sorted(self.peers):
            p = self.peers[r]
            if p.gone is not None and p.gone[0] != 0:
                return r
            if p.gone is None and now - p.last_seen > limit:
                return r
        return None

    def _reports(self, failed: int) -> bool:
        """Whether this rank is the one to report `failed`: the lowest rank still beating."""
        now = time.monotonic()
        alive = [
            r
            for r, p in self.peers.items()
            if r != failed and p.gone is None and now - p.last_seen < 2.5 * INTERVAL + 0.5
        ]
        return not alive or min(alive) > self.rank

    def _describe(self, rank: int | None, why: str) -> str:
        me = f"rank {self.rank}: " if self.rank else ""
        if rank is None:
            return f"error: {me}{why}; ending every rank"
        peer = self.peers[rank]
        where = f"rank {rank} ({peer.name})"
        if peer.gone is not None:
            code, _, message = peer.gone
            if message:
                return f"error: {where}: {message}"
            return f"error: {me}{where} exited with code {code}; ending every rank"
        if why:
            return f"error: {me}{where} {why}; ending every rank"
        return (
            f"error: {me}{where} stopped responding (no heartbeat for "
            f"{time.monotonic() - peer.last_seen:.0f} s: it died, or its host cannot be "
            "reached); ending every rank"
        )


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
