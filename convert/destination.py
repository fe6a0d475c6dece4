"""Where a conversion writes, and how it never damages anything on the way.

- Paths are compared as real paths (symlinks and `..` resolved): DST may not be, contain or
  lie inside SRC (or any file SRC's shards really are, e.g. Hugging Face cache blobs), so
  `--force` can never replace the source, however the two are spelled.
- DST's nearest existing ancestor must be a writable folder (not a regular file).
- Everything is written into a staging folder beside DST (`.NAME.partial-PID-HEX`, holding
  a marker file naming its process and host), renamed to DST only when complete, removed on
  any error, Ctrl-C, SIGTERM or SIGHUP. The rename and the cleanup run with those signals
  held back, so a second signal cannot leave half of either.
- A staging folder left by a conversion killed with SIGKILL is removed by the next
  conversion to the same DST, only when it is recognisably ours: our exact name pattern, a
  real folder owned by this user, our marker inside, naming this host and a process that no
  longer runs. Anything else with a similar name is left alone and reported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlx_deepseek.errors import DeepSeekError

MARKER = ".mlx-deepseek-staging"
HANDLED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)
_HELD = {signal.SIGINT, *HANDLED_SIGNALS}


class Interrupted(KeyboardInterrupt):
    """The conversion was stopped by a signal (SIGTERM, SIGHUP); `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted (as SIGINT raises KeyboardInterrupt), so the
    staging folder is cleaned up; signals someone set to be ignored (nohup) stay ignored.
    Only the main thread can install handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    for s in HANDLED_SIGNALS:
        if signal.getsignal(s) is signal.SIG_DFL:
            previous[s] = signal.signal(s, raise_interrupted)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back (delivered when this ends) around a step that must
    not stop half-way: the rename into place, the removal of the staging folder."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def real_path(path: str | os.PathLike) -> Path:
    """The absolute path with `~`, symlinks and `..` resolved (the path need not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_destination(dst: Path, force: bool) -> None:
    """Before any work: DST (a real path) must be creatable here, and must not exist
    (an empty folder is fine) unless --force."""
    if dst.parent == dst:
        raise DeepSeekError(f"-o {dst}: give a new folder to create, not the filesystem root")
    where = dst.parent
    while not (where.exists() or where.is_symlink()):
        where = where.parent
    if not where.is_dir():
        raise DeepSeekError(
            f"-o {dst}: {where} is a file, not a folder; choose another -o location"
        )
    if not os.access(where, os.W_OK | os.X_OK):
        raise DeepSeekError(
            f"-o {dst}: {where} is not writable (permission denied); choose another -o location"
        )
    if not (dst.exists() or dst.is_symlink()) or force:
        return
    if dst.is_dir() and not any(dst.iterdir()):
        return
    raise DeepSeekError(f"{dst} already exists: choose another -o, or pass --force to replace it")


def check_not_source(dst: Path, src: Path, files: Iterable[Path] = ()) -> None:
    """DST (a real path) must not be, contain or lie inside the source folder, nor be or
    contain any file the source reads (a cache snapshot's shards are symlinks to blobs)."""
    src_real = real_path(src)
    for p in (src_real, *map(real_path, files)):
        if dst == p:
            how = "is"
        elif dst in p.parents:
            how = "contains"
        elif p in dst.parents:
            how = "lies inside"
        else:
            continue
        raise DeepSeekError(
            f"-o {dst} {how} the source checkpoint {src_real}"
            + (f" (its file {p})" if p != src_real else "")
            + ": converting would overwrite it; choose an -o outside the source"
        )


class Staging:
    """A hidden folder beside `dst` that becomes `dst` on commit() and vanishes on failure.
    `notes` reports stale staging folders found beside it (removed, or left alone)."""

    def __init__(self, dst: Path, force: bool = False):
        self.dst = Path(dst)
        self.force = force
        self.path = (
            self.dst.parent / f".{self.dst.name}.partial-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.notes: list[str] = []

    def __enter__(self) -> Staging:
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            self.notes = remove_stale(self.dst)
            self.path.mkdir()
            marker = {"pid": os.getpid(), "host": socket.gethostname(), "dst": self.dst.name}
            (self.path / MARKER).write_text(json.dumps(marker))
        except OSError as e:
            shutil.rmtree(self.path, ignore_errors=True)
            raise _cannot_write(self.dst, e) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            with signals_held():
                shutil.rmtree(self.path, ignore_errors=True)
        return False

    def commit(self) -> None:
        check_destination(self.dst, self.force)
        with signals_held():
            (self.path / MARKER).unlink()
            old = None
            if self.dst.exists() or self.dst.is_symlink():
                old = self.dst.parent / f".{self.dst.name}.replaced-{secrets.token_hex(3)}"
                os.rename(self.dst, old)
            os.rename(self.path, self.dst)
            if old is not None:
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink()


def _cannot_write(dst: Path, e: OSError) -> DeepSeekError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DeepSeekError(f"-o {dst}: the disk is full; free some space or choose another -o")
    where = f" at {e.filename}" if e.filename else ""
    return DeepSeekError(
        f"-o {dst}: cannot create it ({e.strerror}{where}); choose a writable -o location"
    )


def _staging_pattern(dst: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(dst.name)}\.partial-(\d+)-[0-9a-f]{{6}}")


def remove_stale(dst: Path) -> list[str]:
    """Remove the staging folders that killed conversions to `dst` left (see the module
    docstring for what counts as ours); returns one note per folder found."""
    pattern = _staging_pattern(dst)
    notes = []
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return notes
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None or p == dst:
            continue
        why = _not_ours(p, int(m.group(1)))
        if why is None:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                notes.append(f"removed {p.name}, left by an interrupted conversion to {dst.name}")
                continue
            why = "it could not be removed"
        if why != "its conversion is still running":
            notes.append(f"left {p} alone: {why}; remove it yourself if it is not needed")
    return notes


def _not_ours(p: Path, pid: int) -> str | None:
    """Why `p` may not be removed, or None when it is a dead conversion's staging folder."""
    try:
        st = p.lstat()
        if not stat.S_ISDIR(st.st_mode):
            return "it is not a folder"
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            return "another user owns it"
        mst = (p / MARKER).lstat()
        if not stat.S_ISREG(mst.st_mode) or mst.st_size > 4096:
            return "it has no mlx-deepseek staging marker"
        marker = json.loads((p / MARKER).read_text())
    except (OSError, ValueError):
        return "it has no mlx-deepseek staging marker"
    if not isinstance(marker, dict) or marker.get("pid") != pid:
        return "its staging marker does not match its name"
    if marker.get("host") != socket.gethostname():
        return f"it was made on another machine ({marker.get('host')!r:.40})"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return "its conversion is still running"
