"""One batched decode step of the serving engine (`PaddedBatch.forward`) on the V2-Lite
bench shape, 1 row vs 8 rows, with the CPU's dequantize-once-and-BLAS path (ops/cpu.py,
`matmul`: DEQUANT_MIN_TOKENS, 16 rows by default) lowered to 2 rows (so a decode step of 8
sequences dequantizes each dense weight once, and groups the routed experts) or not,
interleaved in one process so that the shared machine's load hits every variant alike.
Prints each variant's step time (median and min of the repeats) and the aggregate
tokens/s it implies.

    .venv/bin/python scripts/bench_batch_decode.py [--repeats 5] [--context 64]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--context", type=int, default=64, help="tokens in each row's cache")
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_deepseek import ops
    from mlx_deepseek.bench.models import prepare, v2_lite_shape
    from mlx_deepseek.decoding import make_cache
    from mlx_deepseek.loading import load
    from mlx_deepseek.ops import cpu
    from mlx_deepseek.serve.batch import PaddedBatch, prefill_chunk

    shape = v2_lite_shape()
    model, _ = load(prepare(shape).ours)
    print(f"V2-Lite bench shape ({'; '.join(shape.scaled)}), 4-bit")
    print(f"back-end {ops.backend.current()}")
    print(f"CPU streams: {cpu.threads()}")

    def batch_of(rows: int) -> PaddedBatch:
        caches = []
        for r in range(rows):
            c = make_cache(model)
            prefill_chunk(model, c, [(7 * r + 11 * i) % 16000 + 5 for i in range(args.context)])
            caches.append(c)
        b = PaddedBatch(model, len(caches[0]))
        b.add(caches)
        return b

    def step(b: PaddedBatch, rows: int) -> float:
        t0 = time.perf_counter()
        mx.eval(b.forward([5 + r for r in range(rows)]))
        return time.perf_counter() - t0

    variants = {"qmm per row": cpu.DEQUANT_MIN_TOKENS, "dequantize once": 2}
    times: dict[tuple[str, int], list[float]] = {(v, n): [] for v in variants for n in (1, 8)}
    batches = {n: batch_of(n) for n in (1, 8)}
    for threshold in variants.values():  # warm-up: compiles
        cpu.DEQUANT_MIN_TOKENS = threshold
        for n in (1, 8):
            step(batches[n], n)
    for _ in range(args.repeats):
        for name, threshold in variants.items():
            cpu.DEQUANT_MIN_TOKENS = threshold
            for n in (1, 8):
                times[(name, n)].append(step(batches[n], n))
    for name in variants:
        one, eight = times[(name, 1)], times[(name, 8)]
        r1, r8 = 1 / statistics.median(one), 8 / statistics.median(eight)
        print(
            f"{name:16s}: 1 row {statistics.median(one) * 1e3:7.1f} ms (min {min(one) * 1e3:.1f}),"
            f" 8 rows {statistics.median(eight) * 1e3:7.1f} ms (min {min(eight) * 1e3:.1f});"
            f" {r1:.2f} vs {r8:.2f} tok/s aggregate: {r8 / r1:.2f}x"
        )


if __name__ == "__main__":
    main()
