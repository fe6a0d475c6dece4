"""Local ranks for the distributed tests: the processes mlx.launch would start on one machine
(the ring backend over loopback), started directly so that a test can time, kill or stop one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_hostfile(folder: Path, n: int) -> Path:
    """The ring backend's hostfile for n local ranks (what mlx.launch -n n writes)."""
    path = Path(folder) / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    return path


def rank_env(folder: Path, n: int, extra: dict[str, str] | None = None) -> list[dict[str, str]]:
    hostfile = write_hostfile(folder, n)
    base = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONUNBUFFERED": "1"}
    base.setdefault("MLX_DEEPSEEK_PEER_TIMEOUT", "20")  # a loaded CI machine starves threads
    base.setdefault("MLX_DEEPSEEK_CONNECT_TIMEOUT", "120")  # imports take a while there
    base.update(extra or {})
    return [{**base, "MLX_RANK": str(r)} for r in range(n)]


@dataclass
class Ranks:
    procs: list[subprocess.Popen]
    started: float

    def wait(self, timeout: float) -> list[tuple[int, str, str]]:
        """(exit code, stdout, stderr) of each rank; kills them all if they still run
        `timeout` seconds from now."""
        out = []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                if p.stdin is not None and p.stdin.closed:
                    p.stdin = None  # written and closed by start()
                stdout, stderr = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                stdout, stderr = p.communicate()
                raise AssertionError(f"ranks still running after {timeout} s:\n{stderr}") from None
            out.append((p.returncode, stdout, stderr))
        return out


def start(
    argv: list[str],
    n: int,
    folder: Path,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    rank_envs: dict[int, dict[str, str]] | None = None,
    only: list[int] | None = None,
) -> Ranks:
    """n local ranks running `argv` (each with MLX_RANK and a shared hostfile); `stdin` goes
    to rank 0 (the others get none: only rank 0 reads input); `rank_envs` adds variables to
    some ranks; `only` starts just those ranks (the others never come)."""
    procs = []
    for r, e in enumerate(rank_env(folder, n, env)):
        if only is not None and r not in only:
            continue
        e = {**e, **(rank_envs or {}).get(r, {})}
        feed = r == 0 and stdin is not None
        p = subprocess.Popen(
            argv,
            env=e,
            cwd=folder,
            stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if feed:
            p.stdin.write(stdin)
            p.stdin.close()
            p.stdin = None
        procs.append(p)
    return Ranks(procs, time.monotonic())


def read_until(proc: subprocess.Popen, needle: str, timeout: float, stderr: bool = False) -> str:
    """Read proc's stdout (or stderr) until `needle` shows, after at least one character (or
    fail after `timeout` s); what was read (communicate() then returns the rest)."""
    import select

    seen, deadline = "", time.monotonic() + timeout
    fd = (proc.stderr if stderr else proc.stdout).fileno()
    while needle not in seen or not seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {needle!r} from the rank in {timeout} s (got {seen!r})")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 4096).decode(errors="replace")
            if not chunk:
                raise AssertionError(f"the rank closed its output (got {seen!r})")
            seen += chunk
    return seen


# ---- the split-model runs of test_distributed.py and test_distributed_v4.py -------------------

PROMPT = [5, 17, 42, 9, 100, 3, 77]
TOKENS = 12
WORKER = str(ROOT / "tests" / "distributed_worker.py")
RANK_MAIN = str(ROOT / "tests" / "rank_main.py")  # the CLI under mlx.launch


def run_workers(n: int, runs: list[dict], tmp_path: Path, timeout: float = 900) -> list[dict]:
    """distributed_worker.py on n local ranks: each run's result (rank 0's report)."""
    spec = {"runs": runs, "out": str(tmp_path / "out.json")}
    out = start([PYTHON, WORKER, json.dumps(spec)], n, tmp_path).wait(timeout)
    for rc, _, err in out:
        assert rc == 0, err[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def run_cases(models: dict, cases: list[tuple], n: int, tmp_path: Path) -> list[dict]:
    """run_workers over (model name, split kind, SamplingSettings, mtp) cases: PROMPT, TOKENS
    tokens, the models' checkpoints by name."""
    runs = [
        {"checkpoint": str(models[name]), "kind": kind, "prompt": PROMPT, "max_tokens": TOKENS,
         "mtp": mtp, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
        for name, kind, s, mtp in cases
    ]  # fmt: skip
    return run_workers(n, runs, tmp_path)


def weight_bytes(path: Path) -> int:
    """The bytes of a checkpoint's weights as one process loads them."""
    from mlx.utils import tree_flatten

    from mlx_deepseek.loading import load_model

    return sum(v.nbytes for _, v in tree_flatten(load_model(path).parameters()))


def check_step_bytes(path: Path, got: dict, n: int, kind: str) -> list[int]:
    """A split run's bytes per decoded token (`got`, a worker's report) are what costs.py
    computes for the checkpoint (float32 here); on Linux the kernel's count of the ring's bytes
    is within 10% (+512) of them. Returns costs.py's bytes, per rank."""
    from mlx_deepseek.distributed import costs
    from mlx_deepseek.loading import load_config
    from mlx_deepseek.models import model_args

    args = model_args(load_config(path))
    expected = costs.step_bytes(costs.Shape.from_args(args), n, kind, itemsize=4)
    assert got["step_bytes"] == expected, (path.name, kind)
    wire = got["step_wire_bytes"]
    if sys.platform == "linux" and min(wire) >= 0:
        for counted, sent in zip(expected, wire, strict=True):
            assert abs(sent - counted) <= 0.1 * counted + 512, (path.name, kind, expected, wire)
    return expected
