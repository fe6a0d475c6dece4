"""The ranks of a distributed run: MLX's group started with a deadline, the liveness watch,
rank 0's values shared with the others, and how a rank ends.

Every rank runs the same command (mlx.launch starts it everywhere) and the same generation
loop on the same logits; what only rank 0 has (the prompt, the user's input, requests, the
plan) it shares with `share`. The other ranks print nothing (their stdout and stderr go to
/dev/null unless --debug) and ignore Ctrl-C: rank 0 decides, and a rank that ends tells the
others (liveness.Watch), so one line reports a failure wherever it happened.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import DeepSeekError
from .liveness import Watch

ENV_CONNECT = "MLX_DEEPSEEK_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 20.0
_LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES", "OMPI_COMM_WORLD_SIZE")
_ADDRESS_BYTES = 128
LAUNCH_HINT = (
    "start every rank with mlx.launch, e.g. `mlx.launch -n 2 -- mlx-deepseek ...` on one "
    "machine or `mlx.launch --hostfile hosts.json -- mlx-deepseek ...` across Macs"
)


class DistributedError(DeepSeekError):
    """The ranks cannot start or agree (not launched, unreachable, different commands)."""


def launched() -> bool:
    """Whether this process was started as a rank (mlx.launch / mpirun set these)."""
    return any(os.environ.get(k) for k in _LAUNCH_ENV)


def ring_hosts() -> list[list[str]]:
    """The ring backend's hostfile: each rank's "ip:port" list (empty when there is none)."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return []
    try:
        with open(path) as f:
            hosts = json.load(f)
        return [[str(a) for a in h] for h in hosts]
    except (OSError, ValueError, TypeError):
        return []


@dataclass
class World:
    group: mx.distributed.Group
    rank: int
    size: int
    backend: str
    hosts: list[str]  # each rank's host, for messages
    watch: Watch

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # ---- rank 0's values on every rank -----------------------------------------------------

    def share(self, value: Any = None) -> Any:
        """Rank 0's JSON-able `value` on every rank (the others' argument is ignored)."""
        data = json.dumps(value).encode() if self.leader else b""
        n = _all_sum(np.array([len(data)], np.int32))[0]
        buf = np.zeros(-(-n // 4) * 4, np.uint8)
        if self.leader:
            buf[: len(data)] = np.frombuffer(data, np.uint8)
        got = _all_sum(buf.view(np.int32)).astype(np.int32).view(np.uint8)
        return json.loads(got[:n].tobytes().decode())

    def flag(self, value: bool) -> bool:
        """Rank 0's boolean on every rank (one small all_sum)."""
        mine = 1 if self.leader and value else 0
        return bool(_all_sum(np.array([mine], np.int32))[0])

    def gather(self, value: int) -> list[int]:
        """Every rank's integer, in rank order."""
        x = mx.distributed.all_gather(mx.array([value], mx.int64), stream=mx.cpu)
        return [int(v) for v in x.tolist()]

    def seed(self) -> int:
        """Seed MLX's generator the same on every rank (rank 0 draws the seed): unseeded
        sampling must draw the same tokens everywhere."""
        value = self.share(secrets.randbits(31) if self.leader else None)
        mx.random.seed(value)
        return value

    # ---- ending ----------------------------------------------------------------------------

    def end(self, code: int, message: str = "", reported: bool = True) -> None:
        """This rank is exiting: tell the others (once). A rank other than 0 with an error
        first waits a moment for rank 0's notice: the same error on every rank (a bad option)
        is then reported once, by rank 0, and this rank ends quietly on its notice."""
        if not self.leader and code != 0 and not reported:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self.watch.peers[0].gone is None:
                time.sleep(0.05)
        if self.watch.claim_exit():
            self.watch.bye(code, message, reported)

    def peer_lost(self, error: BaseException) -> None:
        """A collective failed: name the rank that went and end every rank (no return)."""
        self.watch.peer_lost(error)


def _all_sum(x: np.ndarray) -> np.ndarray:
    out = mx.distributed.all_sum(mx.array(x), stream=mx.cpu)
    return np.array(out)


def is_peer_error(error: BaseException) -> bool:
    """Whether an exception is a collective failing because another rank went away."""
    text = str(error)
    return isinstance(error, RuntimeError) and text.startswith(("[ring]", "[jaccl]", "[mpi]"))


class _State:
    world: World | None = None


def current() -> World | None:
    """This process's World, once `start` ran."""
    return _State.world


def start(debug: bool = False) -> World:
    """Join the other ranks (within MLX_DEEPSEEK_CONNECT_TIMEOUT seconds), start the liveness
    watch, check every rank runs the same command, and quiet the ranks other than 0."""
    if _State.world is not None:
        return _State.world
    if not launched():
        raise DistributedError(f"--parallel needs several ranks: {LAUNCH_HINT}")
    hosts = ring_hosts()
    rank_env = os.environ.get("MLX_RANK", "?")
    group = _init_with_deadline(hosts, rank_env)
    rank, size = group.rank(), group.size()
    if size < 2:
        raise DistributedError(f"--parallel found 1 rank: {LAUNCH_HINT}")
    out_fd = os.dup(2)
    watch, names = _start_watch(group, rank, hosts, out_fd)
    backend = "ring" if hosts else ("jaccl" if os.environ.get("MLX_JACCL_COORDINATOR") else "mpi")
    world = World(group, rank, size, backend, names, watch)
    _State.world = world
    atexit.register(world.end, 0)
    if rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides; it tells us
        if not debug:
            _quiet()
    elif not os.isatty(2) and not debug:
        _drop_backend_noise(out_fd)
    return world


# Runs in a small watchdog process: mx.distributed.init holds the GIL while it waits for the
# other ranks, so no thread of this process could end the wait.
_WATCHDOG = """
import os, select, signal, sys
pid, limit, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], limit)[0]:
    os.write(2, (message + "\\n").encode())
    os.kill(pid, signal.SIGTERM)
"""


def _init_with_deadline(hosts: list[list[str]], rank: str) -> mx.distributed.Group:
    """mx.distributed.init, which waits for every rank for ever: a watchdog process ends this
    one with one line when the others do not answer in time."""
    try:
        limit = float(os.environ.get(ENV_CONNECT, "") or DEFAULT_CONNECT_TIMEOUT)
    except ValueError:
        limit = DEFAULT_CONNECT_TIMEOUT
    where = ", ".join(h[0].rsplit(":", 1)[0] for h in hosts) if hosts else "mlx.launch's hosts"
    message = (
        f"error: rank {rank}: could not reach every rank within {limit:.0f} s ({where}): check "
        "that each host is up and reachable on those ports and that mlx.launch started the "
        f"command there (set {ENV_CONNECT} to wait longer)"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(limit), message],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        return mx.distributed.init(strict=True)
    except Exception as e:
        raise DistributedError(
            f"MLX's distributed backend did not start ({e}): {LAUNCH_HINT}"
        ) from None
    finally:
        watchdog.stdin.close()  # the watchdog sees end of input and leaves
        watchdog.wait()


def _my_address(rank: int, hosts: list[list[str]]) -> str:
    """This rank's IP as the others reach it: its hostfile entry, else the interface that
    routes to the coordinator, else loopback."""
    if rank < len(hosts) and hosts[rank]:
        return hosts[rank][0].rsplit(":", 1)[0]
    coordinator = os.environ.get("MLX_JACCL_COORDINATOR", "").rsplit(":", 1)[0]
    if coordinator:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((coordinator, 9))
                return s.getsockname()[0]
        except OSError:
            pass
    return "127.0.0.1"


def _start_watch(
    group: mx.distributed.Group, rank: int, hosts: list[list[str]], out_fd: int
) -> tuple[Watch, list[str]]:
    """Bind this rank's UDP socket, exchange addresses, a session id and the command line."""
    ip = _my_address(rank, hosts)
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("", 0))
    session = secrets.token_hex(6)
    command = hashlib.sha256("\0".join(sys.argv[1:]).encode()).hexdigest()[:16]
    mine = json.dumps([ip, sock.getsockname()[1], session, command]).encode()
    if len(mine) > _ADDRESS_BYTES:
        raise DistributedError(f"rank {rank}: address {ip} is too long")
    buf = np.zeros(_ADDRESS_BYTES, np.uint8)
    buf[: len(mine)] = np.frombuffer(mine, np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(buf), stream=mx.cpu))
    rows = rows.reshape(group.size(), _ADDRESS_BYTES)
    entries = [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]
    names = [e[0] for e in entries]
    peers = {r: ((e[0], int(e[1])), e[0]) for r, e in enumerate(entries) if r != rank}
    watch = Watch(rank, sock, peers, entries[0][2], out_fd).start()
    other = next((r for r, e in enumerate(entries) if e[3] != entries[0][3]), None)
    if other is not None:
        raise DistributedError(
            f"rank {other} runs another command than rank 0: every rank must run the same "
            "mlx-deepseek command line (mlx.launch does)"
        )
    return watch, names


def _quiet() -> None:
    """Send this rank's stdout and stderr to /dev/null (rank 0 speaks for all)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


_NOISE = (b"[ring]", b"[jaccl]")


def _drop_backend_noise(out_fd: int) -> None:
    """Pass fd 2 through a filter that drops MLX's backend lines ("[ring] Socket 4 was closed
    by the peer", ten times over, when another rank goes away): the watch reports that in one
    line. Installed where stderr is not a terminal (mlx.launch pipes it); text that cannot
    start such a line is passed on at once."""
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        buf = b""
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            buf = _forward(buf + data, out_fd)
        if buf:
            os.write(out_fd, buf)

    thread = threading.Thread(target=pump, name="mlx-deepseek-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except Exception:
            pass
        # While this rank ends, the backend may still report the other ranks' sockets closing
        # (they end on its notice): its writes to fd 2 go nowhere from now on, Python's own
        # go to the real stderr.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # closes the pipe's last writer: the pump drains and stops
        os.close(devnull)
        thread.join(timeout=2)
        try:
            sys.stderr = os.fdopen(os.dup(out_fd), "w", buffering=1, errors="backslashreplace")
        except OSError:
            pass

    atexit.register(restore)


def _forward(buf: bytes, out_fd: int) -> bytes:
    """Write `buf` on but for whole noise lines; return what must wait (a possible start)."""
    out = []
    while buf:
        if buf.startswith(_NOISE) or any(n.startswith(buf) for n in _NOISE):
            end = buf.find(b"\n")
            if end < 0:
                break  # wait for the rest of the line
            if buf.startswith(_NOISE):
                buf = buf[end + 1 :]
                continue
        end = buf.find(b"\n")
        cut = len(buf) if end < 0 else end + 1
        out.append(buf[:cut])
        buf = buf[cut:]
    if out:
        os.write(out_fd, b"".join(out))
    return buf
