"""`mlx-deepseek info MODEL`: what a checkpoint is and what running it costs, without loading it."""

from __future__ import annotations

import typer


def kv_cache_bytes_per_token(args, dtype_size: int = 2) -> dict[str, int]:
    """Per layer: our latent cache vs an expanded per-head K/V cache (mlx-lm's V2 cache)."""
    latent = (args.kv_lora_rank + args.qk_rope_head_dim) * dtype_size
    expanded = args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * dtype_size
    return {"latent": latent, "expanded": expanded}


def info_command(
    model: str = typer.Argument(..., help="Local folder, Hugging Face repo id, or 'demo'."),
) -> None:
    """Show a checkpoint's architecture, size, memory need and KV-cache cost per token."""
    from rich.console import Console
    from rich.table import Table

    from ..loading import (
        available_memory,
        estimate_memory,
        load_config,
        read_tensors,
        resolve_model_path,
    )
    from ..models import model_args, sanitize_weights

    path = resolve_model_path(model)
    config = load_config(path)
    args = model_args(config, source=str(path / "config.json"))
    weights = sanitize_weights(args, read_tensors(path))
    weight_bytes, cache_bytes = estimate_memory(args, weights, dtype=_dtype_of(weights))
    quant = config.get("quantization")

    table = Table(show_header=False, box=None)
    rows = [
        ("checkpoint", str(path)),
        ("model_type", args.model_type),
        (
            "layers / hidden / heads",
            f"{args.num_hidden_layers} / {args.hidden_size} / {args.num_attention_heads}",
        ),
        (
            "experts (routed / shared / top-k)",
            f"{args.n_routed_experts} / {args.n_shared_experts} / {args.num_experts_per_tok}",
        ),
        ("routing", _routing(args)),
        (
            "MTP layers in checkpoint",
            str(len({k.split(".")[1] for k in weights if k.startswith("mtp.")})),
        ),
        ("quantization", f"{quant['bits']}-bit, group {quant['group_size']}" if quant else "none"),
        ("weights", f"{weight_bytes / 1e9:.2f} GB"),
        ("cache, 4096 tokens", f"{cache_bytes / 1e6:.1f} MB"),
        *_cache_rows(args),
    ]
    have = available_memory()
    if have:
        rows.append(("memory available", f"{have / 1e9:.1f} GB"))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    Console().print(table)


def _routing(args) -> str:
    if args.model_type == "deepseek_v4":
        hashed = sum(args.hash_layers)
        return f"{args.scoring_func}, hash-routed first layers: {hashed}"
    return f"{args.topk_method} ({args.scoring_func})"


def _cache_rows(args) -> list[tuple[str, str]]:
    """What the cache costs per token: V4's compressed rows next to its bounded windows, or
    MLA's latent next to an expanded K/V cache."""
    if hasattr(args, "cache_values_per_token"):
        from ..models.v4_config import CSA, HCA

        kinds = [args.layer_type(i) for i in range(args.num_hidden_layers)]
        values = args.cache_values_per_token()
        window = args.window_values()
        return [
            (
                "attention layers",
                f"{kinds.count(CSA)} compressed sparse (1/{args.compress_rates[CSA]}, top "
                f"{args.index_topk}), {kinds.count(HCA)} heavily compressed "
                f"(1/{args.compress_rates[HCA]}), window {args.sliding_window} in all",
            ),
            (
                "KV cache per token (bf16)",
                f"{2 * values:,} B ({values:,} values, all layers' compressed and indexer "
                f"rows) + the windows, bounded: {2 * window / 1e6:.1f} MB ({window:,} values)",
            ),
        ]
    kv = kv_cache_bytes_per_token(args)
    return [
        (
            "KV cache per token per layer (bf16)",
            f"{kv['latent']} B latent vs {kv['expanded']} B expanded K/V "
            f"({kv['expanded'] / kv['latent']:.1f}x less)",
        )
    ]


def _dtype_of(weights):
    import mlx.core as mx

    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float16
