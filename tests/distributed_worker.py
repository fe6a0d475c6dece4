"""One rank of the distributed tests: run under mlx.launch (or tests/launch.py's local ranks).

argv[1]: a JSON spec {"runs": [{"checkpoint", "kind", "prompt": [ids], "max_tokens", "mtp",
"temperature", "seed"}], "out": path, "sleep_after_tokens": n (optional)}. For each run every
rank loads its part and decodes; rank 0 writes, per run: the tokens, every rank's loaded
weight bytes, and the bytes this rank sent for one more decode step (counted by comm.py and,
on Linux, by the kernel: /proc/self/io's wchar).
"""

from __future__ import annotations

import sys

sys.modules.setdefault(
    "torch", None
)  # a rank needs no torch (a test-only dependency): import faster

import json  # noqa: E402
import time
from pathlib import Path

import mlx.core as mx

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core's first use)
from mlx_deepseek import distributed
from mlx_deepseek.decoding import StepOptions, decode_steps, make_cache
from mlx_deepseek.sampling import SamplingSettings, make_sampler
from mlx_deepseek.speculative import MTPDecoder


def wchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def run_one(world, run: dict, slow_after: int | None) -> dict:
    loaded = distributed.load_part(run["checkpoint"], run["kind"], world)
    world.seed()
    model = loaded.model
    settings = SamplingSettings(temperature=run.get("temperature", 0.0), seed=run.get("seed"))
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
    before, w0 = distributed.TRAFFIC.snapshot()[0], wchar()
    mx.eval(model(last, cache=cache))
    sent, wire = distributed.TRAFFIC.snapshot()[0] - before, wchar() - w0
    return {
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
