"""Showing a benchmark result: a rich table per model, the JSON file, a PNG chart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .runtimes import MLX_LM, OURS


def _tok_s(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.3g} (±{s['spread_pct'] / 2:.0f}%)"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _gbps(r: dict[str, Any], ctx: str) -> str:
    return f"{r['effective_gbps'][ctx]:.2f} ({100 * r['bandwidth_fraction'][ctx]:.0f}%)"


def _target_cell(entry: dict[str, Any], name: str) -> str:
    for t in entry.get("targets", []):
        if t["name"] == name:
            mark = "[green]met[/]" if t["met"] else "[red]missed[/]"
            return f"{t['goal']} {mark}"
    return ""


def model_table(entry: dict[str, Any], result: dict[str, Any]) -> Table:
    rts = entry["runtimes"]
    names = [n for n in (OURS, MLX_LM) if n in rts]
    ratios = entry.get("ratios", {})
    table = Table(title=f"{entry['title']} ({entry['name']})", title_justify="left")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    if len(names) == 2:
        table.add_column("ours / mlx-lm", justify="right")
        table.add_column("target", justify="left")

    def row(label: str, cells: list[str], ratio: float | None = None, target: str = "") -> None:
        extra = [_ratio(ratio), target] if len(names) == 2 else []
        table.add_row(label, *cells, *extra)

    settings = result["settings"]
    if all("prefill_tok_s" in rts[n] for n in names):
        row(
            f"prefill tok/s (prompt {settings['prompt_tokens']})",
            [_tok_s(rts[n]["prefill_tok_s"]) for n in names],
            ratios.get("prefill"),
            _target_cell(entry, "prefill speed"),
        )
    for ctx in settings.get("prefill_contexts", []):
        ctx = str(ctx)
        got = [rts[n].get("prefill_tok_s_at", {}).get(ctx) for n in names]
        row(
            f"prefill tok/s of {settings['prompt_tokens']} tokens at {ctx}",
            [_tok_s(g) if g else "failed (see notes)" for g in got],
            ratios.get("prefill_at", {}).get(ctx),
        )
    for ctx in rts[names[0]]["decode_tok_s"]:
        row(
            f"decode tok/s at {ctx}",
            [_tok_s(rts[n]["decode_tok_s"][ctx]) for n in names],
            ratios.get("decode", {}).get(ctx),
            _target_cell(entry, f"decode at {ctx}"),
        )
    by_mode = [rts[n].get("decode_tok_s_by_mode", {}) for n in names]
    for mode in by_mode[0]:
        if mode == "cache" or not all(mode in m for m in by_mode):
            continue
        for ctx in by_mode[0][mode]:
            row(
                f"decode tok/s at {ctx} ({mode})",
                [_tok_s(m[mode].get(ctx)) for m in by_mode],
                ratios.get("decode_by_mode", {}).get(mode, {}).get(ctx),
                _target_cell(entry, f"decode at {ctx} ({mode})"),
            )
    if all("prefill" in rts[n]["peak_memory_bytes"] for n in names):
        row(
            "peak memory, prefill",
            [_bytes(rts[n]["peak_memory_bytes"]["prefill"]) for n in names],
            ratios.get("prefill_peak_memory"),
            _target_cell(entry, "prefill peak memory"),
        )
    for ctx in settings.get("prefill_contexts", []):
        peaks = [rts[n]["peak_memory_bytes"].get("prefill_at", {}).get(str(ctx)) for n in names]
        row(f"peak memory, prefill at {ctx}", [_bytes(p) for p in peaks])
    decode_peaks = rts[names[0]]["peak_memory_bytes"]["decode"]
    if decode_peaks:
        hi = max(decode_peaks, key=int)
        row(
            f"peak memory, decode at {hi}",
            [_bytes(rts[n]["peak_memory_bytes"]["decode"][hi]) for n in names],
        )
    _mtp_rows(rts.get(OURS, {}).get("mtp"), row, len(names))
    row("weights", [_bytes(rts[n]["weights_bytes"]) for n in names], ratios.get("weights_bytes"))
    if all("kv_bytes_per_token" in rts[n] for n in names):
        row(
            "KV cache bytes per token",
            [f"{rts[n]['kv_bytes_per_token']:,.0f}" for n in names],
            ratios.get("kv_bytes_per_token"),
            _target_cell(entry, "KV bytes per token"),
        )
    if all("primitives_per_token" in rts[n] for n in names):
        row(
            "primitives per token (Metal-equivalent)",
            [str(rts[n]["primitives_per_token"]["metal_equivalent"]["total"]) for n in names],
            ratios.get("primitives_per_token"),
            _target_cell(entry, "primitives per token (after the kernel issue)"),
        )
        ref = [rts[n]["primitives_per_token"].get("metal_equivalent_reference") for n in names]
        if any(ref):
            row(
                "primitives per token (Metal-equivalent, no custom kernels)",
                [str(r["total"]) if r else "-" for r in ref],
            )
        row(
            "primitives per token (as run here)",
            [str(rts[n]["primitives_per_token"]["this_backend"]["total"]) for n in names],
        )
    row(
        "weights read per token",
        [_bytes(rts[n]["weight_bytes_per_token"]["total"]) for n in names],
        ratios.get("weight_bytes_per_token"),
    )
    for ctx in rts[names[0]].get("bytes_read_per_token", {}):
        row(
            f"bytes read per token at {ctx} (weights + cache)",
            [_bytes(rts[n]["bytes_read_per_token"][ctx]) for n in names],
            ratios.get("bytes_read_per_token", {}).get(ctx),
        )
    read = result["bandwidth"]["read_gbps"]
    for ctx in rts[names[0]].get("effective_gbps", {}):
        row(
            f"effective GB/s at {ctx} (of {read:.1f})",
            [_gbps(rts[n], ctx) for n in names],
        )
    return table


def _mtp_rows(mtp: dict[str, Any] | None, row, columns: int) -> None:
    """MTP drafting (ours only): tok/s against plain decoding after a real prefill."""
    if not mtp:
        return
    pad = ["-"] * (columns - 1)
    k = mtp["draft_tokens"]
    head = f"MTP, {k} draft{'s' if k > 1 else ''}, at {mtp['prompt_tokens']}"
    row(f"{head}: plain decode tok/s", [_tok_s(mtp["plain_tok_s"]), *pad])
    for kind, label in (("own", "the head's own drafts"), ("perfect", "perfect drafts")):
        r = mtp[kind]
        row(
            f"{head}, {label}: tok/s (acceptance, tokens/step)",
            [f"{_tok_s(r['tok_s'])} ({r['acceptance']:.0%}, {r['tokens_per_step']:.2f})", *pad],
            r["speedup"],
        )


def profile_table(entry: dict[str, Any]) -> Table | None:
    rts = entry["runtimes"]
    names = [n for n in (OURS, MLX_LM) if "profile_ms" in rts.get(n, {})]
    if not names:
        return None
    contexts = sorted(rts[names[0]]["profile_ms"], key=int)
    table = Table(title="  where a decode step's time goes (ms per token)", title_justify="left")
    table.add_column("part")
    for ctx in contexts:
        for n in names:
            table.add_column(f"{n} @{ctx}", justify="right")
    for part in rts[names[0]]["profile_ms"][contexts[0]]:
        cells = [f"{rts[n]['profile_ms'][c][part]:.1f}" for c in contexts for n in names]
        table.add_row(part, *cells)
    return table


def v4_lines(entry: dict[str, Any]) -> list[str]:
    """A V4 entry's decode speed relative to its shortest context (its target) and its KV
    cache bytes per token next to V3's."""
    lines = []
    for ctx, r in entry.get("ratios", {}).get("decode_vs_shortest", {}).items():
        target = _target_cell(
            entry, f"decode at {ctx} vs {min(entry['ratios']['decode_vs_shortest'], key=int)}"
        )
        lines.append(f"  decode at {ctx} / at the shortest context: {r:.2f}x {target}".rstrip())
    kv = entry.get("kv_comparison")
    if kv:
        lines.append(
            f"  KV cache per token ({kv['dtype']}), whole models: V4-Flash "
            f"{kv['v4_flash_bytes_per_token']:,} B ({kv['v4_flash_values_per_token']:,} values, "
            f"+ {kv['v4_flash_window_bytes'] / 1e6:.1f} MB of bounded windows) vs V3 "
            f"{kv['v3_bytes_per_token']:,} B ({kv['v3_values_per_token']:,} values): "
            f"{kv['v3_over_v4']:.1f}x less; this synthetic model's layers: "
            f"{kv['synthetic_values_per_token']:,} values per token (as V3 layers: "
            f"{kv['synthetic_v3_values_per_token']:,})"
        )
    return lines


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    m, s = result["machine"], result["settings"]
    console.print(
        f"[bold]mlx-deepseek bench[/]  {m['platform']}, {m['cpu_count']} CPUs, MLX {m['mlx']} "
        f"({m['device']}), mlx-lm {m['mlx_lm']}"
    )
    if s.get("note"):
        console.print(f"note: {s['note']}")
    console.print(
        f"compute dtype {s['dtype']}; {s['quantization']['bits']}-bit affine, group "
        f"{s['quantization']['group_size']}; {s['repeats']} repeats x "
        f"{s['decode_tokens_per_repeat']} decode tokens; median (± half the min-max spread)"
    )
    console.print(f"long contexts: {s['cache_fill']}")
    if s.get("kernel_counting"):
        console.print(f"primitives per token (Metal-equivalent): {s['kernel_counting']}")
    ratio_note = next(
        (e["ratios"]["method"] for e in result["models"] if "method" in e.get("ratios", {})), None
    )
    if ratio_note:
        console.print(ratio_note)
    bw = result["bandwidth"]
    console.print(
        f"machine read bandwidth {bw['read_gbps']:.1f} GB/s ("
        + ", ".join(
            f"mlx {b['mlx_gbps']:.1f} / numpy {b['numpy_gbps']:.1f}" for b in bw["measurements"]
        )
        + f"; {bw['measurements'][0]['method']})"
    )
    for entry in result["models"]:
        console.print()
        console.print(model_table(entry, result))
        if entry.get("scaled"):
            console.print("  scaled from the real model: " + "; ".join(entry["scaled"]))
        by = entry.get("checkpoints", {}).get("quantized_by")
        if by:
            console.print("  quantized by: " + "; ".join(f"{k}: {v}" for k, v in by.items()))
        if entry.get("mlx_first_blas"):
            blas = {"openblas": "OpenBLAS", "other": "the reference BLAS"}
            name = blas.get(entry["mlx_first_blas"], "an unknown BLAS")
            console.print(f"  mlx-first mode: MLX's matmuls called {name} there")
        for line in v4_lines(entry):
            console.print(line)
        if entry.get("agreement"):
            console.print(
                "  last-token logits, ours vs mlx-lm: max relative difference "
                f"{entry['agreement']['last_logits_max_rel_diff']:.2e}"
            )
        profiled = profile_table(entry)
        if profiled is not None:
            console.print(profiled)
        for name, r in entry["runtimes"].items():
            for note in r.get("notes", []):
                console.print(f"  {name}: {note}")
        for note in entry.get("notes", []):
            console.print(f"  note: {note}")
    console.print(f"\ntotal {result['seconds']:.0f} s")


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write atomically: a complete file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def check_chart_support() -> None:
    """Fail before a long run, not after it, when matplotlib is missing."""
    from mlx_deepseek.errors import DeepSeekError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DeepSeekError("--plot needs matplotlib: pip install 'mlx-deepseek[plot]'") from None


def write_chart(result: dict[str, Any], path: Path) -> None:
    """Decode tok/s against context, both runtimes, one panel per model (needs matplotlib)."""
    check_chart_support()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, entry in zip(axes[0], models, strict=True):
        for name, r in entry["runtimes"].items():
            ctxs = sorted(r["decode_tok_s"], key=int)
            med = [r["decode_tok_s"][c]["median"] for c in ctxs]
            lo = [r["decode_tok_s"][c]["median"] - r["decode_tok_s"][c]["min"] for c in ctxs]
            hi = [r["decode_tok_s"][c]["max"] - r["decode_tok_s"][c]["median"] for c in ctxs]
            ax.errorbar([int(c) for c in ctxs], med, yerr=[lo, hi], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(c) for r in entry["runtimes"].values() for c in r["decode_tok_s"]})
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tok/s")
        ax.set_title(entry["title"])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"mlx-deepseek vs mlx-lm, {result['machine']['device']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
