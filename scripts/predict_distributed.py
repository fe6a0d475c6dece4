"""Predict decode tok/s of DeepSeek-class models split over 2-8 Macs (mlx_deepseek.distributed.
costs): pipeline vs tensor parallel, over Thunderbolt 5 (RDMA with JACCL, or TCP with the
ring backend) and 10 GbE, next to the published cluster numbers the model is checked on.

    python scripts/predict_distributed.py                 # the README's table (markdown)
    python scripts/predict_distributed.py --machine m4-pro-64 --bits 4 --json

Each cell is the faster split's tok/s (P = pipeline, T = tensor); "-" where the weights do
not fit the machines' usable memory (75% of RAM). Bytes per token are what each rank sends
for one decoded token (bf16 activations), per split.
"""

from __future__ import annotations

import argparse
import json

from mlx_deepseek.distributed.costs import LINKS, MACHINES, SHAPES, predict, step_bytes

PUBLISHED = [
    # (what, shape, bits, machine, ranks, kind, link, published tok/s, source)
    ("V3 4-bit, 1 M3 Ultra", "v3", 4, "m3-ultra-512", 1, "pipeline", "tb5-rdma", 20.2,
     "llama.cpp / mlx-lm (the fit anchor)"),
    ("V3 4-bit, 8 M4 Pro minis", "v3", 4, "m4-pro-64", 8, "pipeline", "tb5-tcp", 5.4, "exo"),
    ("V3.1 8-bit, 4 M3 Ultras, TB5 RDMA", "v3", 8, "m3-ultra-512", 4, "tensor", "tb5-rdma", 25.0,
     "exo (tensor parallel)"),
]  # fmt: skip


def best(shape, bits, machine, n, link):
    """(tok/s, kind) of the faster split that fits, or None."""
    options = []
    for kind in ("pipeline", "tensor"):
        p = predict(SHAPES[shape], bits, MACHINES[machine], n, kind, LINKS[link])
        if p.fits:
            options.append((p.tokens_per_s, kind))
    return max(options) if options else None


def table(bits: int, machine: str, sizes: list[int]) -> list[str]:
    links = ["tb5-rdma", "tb5-tcp", "10gbe"]
    head = "| model | " + " | ".join(f"{n} Macs: {' / '.join(links)}" for n in sizes) + " |"
    rows = [head, "|" + "---|" * (len(sizes) + 1)]
    for key, shape in SHAPES.items():
        cells = []
        for n in sizes:
            parts = []
            for link in links:
                b = best(key, bits, machine, n, link)
                parts.append("-" if b is None else f"{b[0]:.1f} {b[1][0].upper()}")
            cells.append(" / ".join(parts))
        rows.append(f"| {shape.name} | " + " | ".join(cells) + " |")
    return rows


def traffic(sizes: list[int]) -> list[str]:
    rows = ["| model | " + " | ".join(f"{n} ranks: pipeline / tensor" for n in sizes) + " |"]
    rows.append("|" + "---|" * (len(sizes) + 1))
    for shape in SHAPES.values():
        cells = []
        for n in sizes:
            p, t = (max(step_bytes(shape, n, k)) / 1e3 for k in ("pipeline", "tensor"))
            cells.append(f"{p:.0f} KB / {t:.0f} KB")
        rows.append(f"| {shape.name} | " + " | ".join(cells) + " |")
    return rows


def published() -> list[str]:
    rows = ["| setup | published tok/s | predicted | source |", "|---|---|---|---|"]
    for what, shape, bits, machine, n, kind, link, value, source in PUBLISHED:
        p = predict(SHAPES[shape], bits, MACHINES[machine], n, kind, LINKS[link])
        rows.append(f"| {what} | {value} | {p.tokens_per_s:.1f} ({kind}) | {source} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--machine", default="m3-ultra-512", choices=sorted(MACHINES))
    parser.add_argument("--ranks", default="2,4,8", help="comma-separated cluster sizes")
    parser.add_argument("--json", action="store_true", help="every prediction as JSON")
    args = parser.parse_args()
    sizes = [int(n) for n in args.ranks.split(",")]
    if args.json:
        out = []
        for key, shape in SHAPES.items():
            for n in sizes:
                for link in LINKS:
                    for kind in ("pipeline", "tensor"):
                        p = predict(shape, args.bits, MACHINES[args.machine], n, kind, LINKS[link])
                        row = {"model": key, "ranks": n, "link": link, "kind": kind}
                        row["tokens_per_s"] = round(p.tokens_per_s, 2)
                        row["fits"], row["rank_gb"] = p.fits, round(p.rank_bytes / 1e9, 1)
                        row["bytes_per_token"] = max(step_bytes(shape, n, kind))
                        out.append(row)
        print(json.dumps(out, indent=1))
        return
    machine = MACHINES[args.machine].name
    print(f"Predicted decode tok/s, {args.bits}-bit, {machine} each (P pipeline, T tensor):\n")
    print("\n".join(table(args.bits, args.machine, sizes)))
    print("\nBytes each rank sends per decoded token (bf16):\n")
    print("\n".join(traffic(sizes)))
    print("\nAgainst published numbers:\n")
    print("\n".join(published()))


if __name__ == "__main__":
    main()
