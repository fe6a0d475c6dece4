"""`mlx-deepseek info MODEL`: what a checkpoint is and what running it costs, without loading it."""

from __future__ import annotations

import typer

ARCHITECTURES = {
    "deepseek_v2": "DeepSeek-V2: MLA + DeepSeekMoE",
    "deepseek_v3": "DeepSeek-V3: MLA + DeepSeekMoE",
    "deepseek_v32": "DeepSeek-V3.2: MLA with sparse attention (lightning indexer) + DeepSeekMoE",
    "deepseek_v4": "DeepSeek-V4: shared-KV MQA (window, compressed, sparse) + DeepSeekMoE",
    "deepseek": "DeepSeekMoE: multi-head attention + DeepSeekMoE",
}


def kv_cache_bytes_per_token(args, dtype_size: int = 2) -> dict[str, int]:
    """Per layer: what our cache holds per token ("latent": MLA's latent, plus V3.2's
    indexer key; DeepSeekMoE 16B's per-head K/V) vs an expanded per-head K/V cache."""
    latent = args.kv_values_per_layer * dtype_size
    if args.model_type == "deepseek":
        return {"latent": latent, "expanded": latent}
    expanded = args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * dtype_size
    return {"latent": latent, "expanded": expanded}


def quantization_line(config: dict) -> str:
    from ..compressed_tensors import packed_format

    quant = config.get("quantization")
    if quant:
        return f"{quant.get('bits', 4)}-bit, group {quant.get('group_size', 64)}"
    packed = packed_format(config)
    if packed:
        return (
            f"{packed.bits}-bit, group {packed.group_size} (compressed-tensors, symmetric; "
            "read as MLX affine without requantizing)"
        )
    qc = config.get("quantization_config") or {}
    return "FP8 blocks (quantization_config)" if qc.get("quant_method") == "fp8" else "none"


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

    table = Table(show_header=False, box=None)
    rows = [
        ("checkpoint", str(path)),
        ("model_type", getattr(args, "label", args.model_type)),
        ("architecture", ARCHITECTURES[args.model_type]),
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
        ("quantization", quantization_line(config)),
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
    if args.model_type == "deepseek_v4":
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
    if args.model_type == "deepseek":
        line = f"{kv['latent']} B per-head K/V ({args.kv_heads} heads of {args.head_dim})"
        return [("KV cache per token per layer (bf16)", line)]
    what = "latent + indexer key" if args.model_type == "deepseek_v32" else "latent"
    rows = [
        (
            "KV cache per token per layer (bf16)",
            f"{kv['latent']} B {what} vs {kv['expanded']} B expanded K/V "
            f"({kv['expanded'] / kv['latent']:.1f}x less)",
        )
    ]
    if args.model_type == "deepseek_v32":
        rows.append(
            (
                "sparse attention",
                f"each token attends to at most {args.index_topk} positions, chosen by "
                f"{args.index_n_heads} indexer heads of {args.index_head_dim}",
            )
        )
    return rows


def _dtype_of(weights):
    import mlx.core as mx

    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float16
