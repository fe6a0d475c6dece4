"""One rank of the distributed tests: run under mlx.launch (or tests/ranks.py's local ranks).

argv[1]: a JSON spec {"runs": [{"checkpoint", "kind", "prompt": [ids], "max_tokens", "mtp",
"temperature", "seed"}], "out": path, "sleep_after_tokens": n (optional)}. For each run every
rank loads its part and decodes; rank 0 writes, per run: the tokens (and MTP's drafted /
accepted counts), every rank's loaded weight bytes, and the bytes this rank sent for one
more decode step: as comm.py counts them, and as the kernel counts them on the ring's TCP
sockets (Linux's TCP_INFO; -1 elsewhere).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import mlx.core as mx
import no_torch  # noqa: F401  (before anything imports transformers)

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core's first use)
from mlx_deepseek import distributed
from mlx_deepseek.decoding import StepOptions, decode_steps, make_cache
from mlx_deepseek.sampling import SamplingSettings, make_sampler
from mlx_deepseek.speculative import MTPDecoder


def tcp_bytes_sent() -> int:
    """Bytes this process has sent on its TCP sockets (the ring's), from the kernel's
    tcp_info (bytes_sent, Linux >= 4.19); -1 where that cannot be read."""
    total = 0
    try:
        fds = [int(f) for f in os.listdir("/proc/self/fd")]
    except OSError:
        return -1
    for fd in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
        except OSError:
            continue
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                if len(info) < 208:
                    return -1
                total += struct.unpack_from("<Q", info, 200)[0]  # tcpi_bytes_sent
        except OSError:
            pass
        finally:
            s.close()
    return total


def settled_tcp_bytes_sent() -> int:
    """tcp_bytes_sent once it stops moving: a collective can return on this rank while its
    own half is still being written by the backend's threads (seen under load: half an
    all_sum counted in the next step)."""
    last = tcp_bytes_sent()
    for _ in range(30):
        time.sleep(0.1)
        now = tcp_bytes_sent()
        if now == last:
            return now
        last = now
    return last


def run_one(world, run: dict, slow_after: int | None) -> dict:
    loaded = distributed.load_part(run["checkpoint"], run["kind"], world)
    world.seed()
    model = loaded.model
    settings = SamplingSettings(
        temperature=run.get("temperature", 0.0), top_p=run.get("top_p", 1.0), seed=run.get("seed")
    )
    if settings.seed is not None:
        mx.random.seed(settings.seed)
    opts = StepOptions(
        sampler=make_sampler(settings), logits_processors=[], max_tokens=run["max_tokens"]
    )
    cache = make_cache(model)
    steps = MTPDecoder(1, settings) if run.get("mtp") else decode_steps
    tokens = []
    for step in steps(model, mx.array(run["prompt"]), cache, opts):
        tokens.append(step.token)
        if slow_after is not None and len(tokens) >= slow_after:
            time.sleep(0.5)  # a long generation, for the failure tests
    # one more decode step, measured
    last = mx.array([[tokens[-1]]])
    mx.eval(model(last, cache=cache))
    before, w0 = distributed.TRAFFIC.snapshot()[0], settled_tcp_bytes_sent()
    mx.eval(model(last, cache=cache))
    sent, wire = distributed.TRAFFIC.snapshot()[0] - before, settled_tcp_bytes_sent() - w0
    stats = getattr(steps, "stats", None)
    return {
        "drafted": stats.drafted if stats else 0,  # MTP drafts, and how many were accepted
        "accepted": stats.accepted if stats else 0,
        "kind": loaded.plan.kind,
        "plan": [loaded.plan.describe(r) for r in range(world.size)],
        "tokens": tokens,
        "weight_bytes": world.gather(loaded.weight_bytes),
        "step_bytes": world.gather(sent),
        "step_wire_bytes": world.gather(wire),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    world = distributed.start(debug=bool(spec.get("debug")))
    results = [run_one(world, run, spec.get("slow_after")) for run in spec["runs"]]
    if world.leader:
        Path(spec["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
