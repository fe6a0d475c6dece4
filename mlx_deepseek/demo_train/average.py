"""Weight averaging of two demo training runs that started from the same weights (a "model
soup"): the floating-point tensors of RUN_A and RUN_B (train.py's Hugging Face layout) mixed
as WEIGHT * A + (1 - WEIGHT) * B, every other tensor (V4's hash-routing table) required equal.

    python -m mlx_deepseek.demo_train.average RUN_A RUN_B --out OUT [--weight 0.5]

Two short fine-tunes of one start stay close enough that their mean is a model as good as
either, and it keeps some of what each learnt: demo-v4's stage 22 is the mean of stage 21
and stage 21p (stage 21 with `--phrase`), which copies short words that stage 21 drops
but misspells names in calls that stage 21 gets right (the demo_train README)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from mlx_deepseek.convert.destination import Staging, check_not_source, real_path
from mlx_deepseek.errors import ArgumentValueError, DeepSeekError

SKIP = {"checkpoint", "training_log.json"}  # a run's own state, not the model's


def _tensors(run: Path) -> dict[str, dict[str, mx.array]]:
    files = sorted(run.glob("*.safetensors"))
    if not files:
        raise ArgumentValueError(f"{run}: no *.safetensors; give a folder written by train.py")
    return {f.name: mx.load(str(f)) for f in files}


def average(a: Path, b: Path, out: Path, weight: float = 0.5) -> Path:
    """Write OUT: RUN_A's config and tokenizer with the weights mixed `weight` of A's. Raises
    DeepSeekError (one line; a ValueError where the runs are not the same model), writing
    nothing: OUT is staged beside itself and replaces an earlier OUT only when complete."""
    if not 0.0 <= weight <= 1.0:
        raise ArgumentValueError(f"--weight {weight}: give a share of RUN_A between 0 and 1")
    for run in (a, b):
        if not (run / "config.json").is_file():
            raise ArgumentValueError(f"{run}: no config.json; give a folder written by train.py")
    if json.loads((a / "config.json").read_text()) != json.loads((b / "config.json").read_text()):
        raise ArgumentValueError(
            f"{a} and {b} have different configs: only runs of one model average"
        )
    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys() or any(ta[f].keys() != tb[f].keys() for f in ta):
        raise ArgumentValueError(
            f"{a} and {b} hold different tensors: only runs of one model average"
        )
    mixed: dict[str, dict[str, mx.array]] = {}
    for f, tensors in ta.items():
        mixed[f] = {}
        for k, x in tensors.items():
            y = tb[f][k]
            if x.shape != y.shape or x.dtype != y.dtype:
                raise ArgumentValueError(
                    f"{k}: {x.shape} {x.dtype} in {a}, {y.shape} {y.dtype} in {b}"
                )
            if mx.issubdtype(x.dtype, mx.floating):
                m = weight * x.astype(mx.float32) + (1 - weight) * y.astype(mx.float32)
                mixed[f][k] = m.astype(x.dtype)
            elif not mx.array_equal(x, y).item():
                raise ArgumentValueError(
                    f"{k} ({x.dtype}) differs between {a} and {b}: not averageable"
                )
            else:
                mixed[f][k] = x
    out = real_path(out)
    for run in (a, b):
        check_not_source(out, run)
    with Staging(out, force=True) as stage:
        for p in a.iterdir():
            if p.is_file() and p.suffix != ".safetensors" and p.name not in SKIP:
                shutil.copy2(p, stage.path / p.name)
        for f, tensors in mixed.items():
            mx.save_safetensors(str(stage.path / f), tensors, metadata={"format": "pt"})
        runs = {"runs": [str(a), str(b)], "weight": weight}
        (stage.path / "average.json").write_text(json.dumps(runs, indent=1) + "\n")
        stage.commit()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder (HF layout)")
    p.add_argument("--weight", type=float, default=0.5, help="RUN_A's share (0 to 1)")
    args = p.parse_args(argv)
    try:
        out = average(args.run_a, args.run_b, args.out, args.weight)
    except DeepSeekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"averaged {args.run_a} ({args.weight:g}) and {args.run_b} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
