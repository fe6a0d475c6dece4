"""Peak memory and throughput of `mlx-deepseek convert` on a synthetic multi-GB checkpoint.

Builds a DeepSeek-V3-layout bf16 checkpoint of a few GB (few, wide layers: one layer's
routed experts alone are larger than the memory the converter should need), converts it in
a subprocess, and prints the child's peak RSS next to the checkpoint size and GB/s. With
--family v4: a DeepSeek V4 checkpoint in DeepSeek's release layout (FP8 linears with ue8m0
block scales, FP4 routed experts), a few hundred MB.

    python scripts/bench_convert_memory.py [--family v3|v4] [--size large|small] [--dir DIR]
                                           [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from mlx_deepseek.convert.synthetic import source_shapes, write_checkpoint
from mlx_deepseek.convert.synthetic_v4 import write_release

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx)
from mlx_deepseek.models.tiny import convertible_config, release_config

SIZES = {
    # ~2.8 GB bf16: 4 layers (1 dense) + MTP; each MoE layer's 32 experts are 0.6 GB
    # (1.2 GB as float32), the dense MLP 0.1 GB, the embedding and head 0.13 GB each
    "large": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        moe_intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=16,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        kv_lora_rank=256,
        q_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
    "small": dict(
        vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512
    ),
}

# DeepSeek V4 in its release layout: real head_dim 512 / 64-d RoPE / hc 4; 3 layers (sliding,
# compressed sparse, heavily compressed) + an MTP module; each layer's 32 FP4 experts are
# 0.11 GB (0.81 GB as float32)
V4_SIZES = {
    "large": dict(
        vocab_size=16384,
        hidden_size=2048,
        moe_intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=16,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=512,
        o_groups=4,
        o_lora_rank=512,
        n_routed_experts=32,
        num_experts_per_tok=6,
        index_n_heads=16,
        index_head_dim=128,
        compress_ratios=[0, 4, 128, 4],
        num_hash_layers=1,
        num_nextn_predict_layers=1,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=512,
        moe_intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=128,
        qk_rope_head_dim=32,
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        index_n_heads=4,
        index_head_dim=64,
        compress_ratios=[4, 128],
        num_hash_layers=1,
    ),
}

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import mlx_deepseek
from mlx_deepseek.convert.pipeline import convert
from mlx_deepseek.convert.plan import Options
src, dst, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
imported = time.perf_counter() - t0
if opts is None:  # baseline: the same imports, no conversion
    import mlx.core as mx
    mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))
    s = None
else:
    s = convert(src, dst, Options(**opts))
try:  # VmHWM: this process's own peak (ru_maxrss on Linux also counts the pre-exec parent)
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
print(json.dumps({
    "maxrss": peak,
    "import_s": imported,
    "seconds": s.seconds if s else 0.0,
    "read": s.read_bytes if s else 0,
    "written": s.write_bytes if s else 0,
    "bpw": s.bits_per_weight if s else 0.0,
}))
"""


def run_child(src: Path, dst: Path, options: dict | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), json.dumps(options)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--family", choices=["v3", "v4"], default="v3")
    ap.add_argument("--size", choices=list(SIZES), default="large")
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument(
        "--src", type=Path, default=None, help="reuse a checkpoint kept by --keep (same --size)"
    )
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
    src = args.src or root / "src"
    try:
        if args.family == "v4":
            v4(src, root, args)
            return
        config = convertible_config("deepseek_v3", **SIZES[args.size])
        shapes = source_shapes(config)
        t = time.perf_counter()

        def weights(name, shape):
            import numpy as np

            rng = np.random.default_rng(zlib.crc32(name.encode()))
            return rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1])

        if not args.src:
            write_checkpoint(src, config, weights, fmt="bf16", shards=4, tokenizer=False)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        experts = [s for k, s in shapes.items() if ".layers.1.mlp.experts." in k]
        layer_experts = sum(math.prod(s) for s in experts) * 2
        biggest = max(math.prod(s) for s in shapes.values()) * 2
        built = time.perf_counter() - t
        print(f"checkpoint: {size / 1e9:.2f} GB bf16 in 4 shards (built in {built:.0f} s)")
        print(
            f"  one MoE layer's routed experts: {layer_experts / 1e9:.2f} GB bf16 "
            f"({2 * layer_experts / 1e9:.2f} GB as float32); largest tensor {biggest / 1e9:.2f} GB"
        )

        runs = {
            "4-bit uniform": dict(bits=4),
            "4-bit mixed": dict(bits=4, recipe="mixed"),
            "bf16 --no-quantize": dict(quantize=False),
        }
        measure(src, root, runs, size)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


def v4(src: Path, root: Path, args: argparse.Namespace) -> None:
    config = release_config(**V4_SIZES[args.size])
    t = time.perf_counter()
    if not args.src:
        write_release(src, config, shards=4, tokenizer=False)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    D, I, E = (config[k] for k in ("hidden_size", "moe_intermediate_size", "n_routed_experts"))
    experts = 3 * E * I * D
    print(
        f"checkpoint: {size / 1e9:.2f} GB (FP8 / FP4 / bf16) in 4 shards, built in "
        f"{time.perf_counter() - t:.0f} s; one layer's routed experts {experts * 17 / 32 / 1e9:.2f}"
        f" GB FP4 ({experts * 4 / 1e9:.2f} GB as float32)"
    )
    runs = {
        "native (mxfp8/mxfp4)": dict(recipe="native"),
        "4-bit uniform": dict(bits=4),
        "4-bit mixed": dict(bits=4, recipe="mixed"),
        "bf16 --no-quantize": dict(quantize=False),
    }
    measure(src, root, runs, size)


def measure(src: Path, root: Path, runs: dict[str, dict], size: int) -> None:
    """Convert src once per run (label -> convert Options) in a child process; print each
    one's peak RSS over the imports-only baseline, its speed and its output."""
    base = run_child(src, root / "unused", None)
    print(f"baseline (imports only): peak RSS {base['maxrss'] / 1e9:.2f} GB")
    for label, opts in runs.items():
        dst = root / "out"
        r = run_child(src, dst, opts)
        shutil.rmtree(dst)
        print(
            f"{label:>20}: peak RSS {r['maxrss'] / 1e9:.2f} GB "
            f"(+{(r['maxrss'] - base['maxrss']) / 1e9:.2f} GB over baseline) for a "
            f"{size / 1e9:.2f} GB checkpoint; {r['seconds']:.1f} s, "
            f"{r['read'] / r['seconds'] / 1e9:.2f} GB/s read, {r['written'] / 1e9:.2f} GB "
            f"written, {r['bpw']:.2f} bits/weight"
        )


if __name__ == "__main__":
    main()
