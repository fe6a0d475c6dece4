"""The "mlx-first" mode's child process (bench/modes.py starts it): its first line imported
mlx.core, then this module measures decode as the "cache" mode does and prints JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .harness import Settings as HarnessSettings
from .harness import _measure_decode, compute_dtype, new_result, resolve_defaults
from .runtimes import OURS, load_mlx_lm, load_ours


def child_main() -> None:
    """The child's side (its first line imported mlx.core): the job on stdin, JSON out."""
    job = json.loads(sys.stdin.read())
    import mlx_deepseek  # noqa: F401  (what a user's script does next)
    from mlx_deepseek import _blas

    settings = resolve_defaults(
        HarnessSettings(
            dtype=job["dtype"],
            contexts=job["contexts"],
            decode_tokens=job["tokens"],
            repeats=job["repeats"],
            prompt_tokens=0,
        )
    )
    dtype = compute_dtype(settings)
    runtimes = [load_ours(Path(job["checkpoints"][OURS]), dtype)]
    lm = job["checkpoints"].get("mlx-lm")
    if lm:
        runtimes.append(load_mlx_lm(Path(lm), dtype))
    res = {rt.name: new_result(rt) for rt in runtimes}

    def log(msg: str) -> None:
        print(f"  [mlx-first] {msg.strip()}", file=sys.stderr, flush=True)

    for ctx in settings.contexts:
        _measure_decode(settings, runtimes, res, ctx, log)
    decode = {n: r["decode_tok_s"] for n, r in res.items()}
    print(json.dumps({"blas": _blas.mlx_blas(), "decode_tok_s": decode}))
