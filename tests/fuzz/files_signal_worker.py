"""Child process of the untrusted-files fuzz suite: one conversion per stdin line
{"id", "src", "dst", "signal"}, which sends itself `signal` after the 5th progress report
(mid-write, deterministically) and reports how the conversion ended.

A signal the converter does not handle kills this process: the parent sees which case.
"""

import json
import os
import signal
import sys

from mlx_deepseek.convert.pipeline import convert
from mlx_deepseek.convert.plan import Options


def run(case: dict) -> dict:
    signum = getattr(signal, case["signal"])
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 5:
            os.kill(os.getpid(), signum)

    try:
        convert(case["src"], case["dst"], Options(shard_size=100_000), on_progress=progress)
        result = {"finished": True}
    except KeyboardInterrupt as e:  # SIGINT's, and the converter's Interrupted
        result = {"type": type(e).__name__, "signum": getattr(e, "signum", None)}
    return {"progress_calls": len(calls), **result}


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for line in sys.stdin:
        case = json.loads(line)
        print(json.dumps({"id": case["id"], "started": True}), flush=True)
        print(json.dumps({"id": case["id"], **run(case)}), flush=True)


if __name__ == "__main__":
    main()
