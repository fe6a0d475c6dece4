"""Signalling a conversion mid-write, deterministically.

The child process stops itself (SIGSTOP) right after its first shard write, and the test
waits for that stop before it sends its signal. Polling for the first shard from the test
instead raced the conversion (0.1-0.2 s for the test checkpoints) on a busy CI machine: it
once finished before the signal came. The hook is a sitecustomize on the child's PYTHONPATH,
so it also runs the installed console script; it shadows any sitecustomize the system has,
in that child only.
"""

import os
import signal
import subprocess
from pathlib import Path

HOOK = Path(__file__).parent / "stop_after_first_write"  # its sitecustomize does the stop


def popen_stopping(cmd: list[str]) -> subprocess.Popen:
    """Start `cmd` (a conversion) so that it stops itself after its first shard write."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a shell's background jobs ignore SIGINT, and Python keeps an ignored SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_stopped_mid_write(proc: subprocess.Popen, workspace: Path) -> None:
    """Wait until the conversion has stopped itself; its staging folder then holds the
    first shard, and more are still to come."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # reports the stop; does not reap
    if not os.WIFSTOPPED(status):
        _, err = proc.communicate()
        raise AssertionError(f"the conversion ended before its first write ({status}): {err}")
    assert list(workspace.glob(".*.partial-*/model-00001-*")), "no shard was being written"
