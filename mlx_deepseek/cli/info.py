"""`mlx-deepseek info MODEL`: what a checkpoint is and what running it costs, without loading it."""

from __future__ import annotations

import typer

ARCHITECTURES = {
    "deepseek_v2": "DeepSeek-V2: MLA + DeepSeekMoE",
    "deepseek_v3": "DeepSeek-V3: MLA + DeepSeekMoE",
    "deepseek_v32": "DeepSeek-V3.2: MLA with sparse attention (lightning indexer) + DeepSeekMoE",
    "deepseek": "DeepSeekMoE: multi-head attention + DeepSeekMoE",
}


def kv_cache_bytes_per_token(args, dtype_size: int = 2) -> dict[str, int]:
    """Per layer: what our cache holds per token ("latent": MLA's latent, plus V3.2's
    indexer key; DeepSeekMoE 16B's per-head K/V) vs an expanded per-head K/V cache."""
    latent = args.cache_values_per_token * dtype_size
    if args.model_type == "deepseek":
        return {"latent": latent, "expanded": latent}
    expanded = args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * dtype_size
    return {"latent": latent, "expanded": expanded}


def cache_line(args, kv: dict[str, int]) -> str:
    if args.model_type == "deepseek":
        return f"{kv['latent']} B per-head K/V ({args.kv_heads} heads of {args.head_dim})"
    what = "latent" if args.model_type != "deepseek_v32" else "latent + indexer key"
    return (
        f"{kv['latent']} B {what} vs {kv['expanded']} B expanded K/V "
        f"({kv['expanded'] / kv['latent']:.1f}x less)"
    )


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
    return "FP8 (convert it first)" if qc.get("quant_method") == "fp8" else "none"


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
    from ..models import model_args
    from ..weights import sanitize

    path = resolve_model_path(model)
    config = load_config(path)
    args = model_args(config, source=str(path / "config.json"))
    weights = sanitize(args, read_tensors(path))
    weight_bytes, cache_bytes = estimate_memory(args, weights, dtype=_dtype_of(weights))
    kv = kv_cache_bytes_per_token(args)

    table = Table(show_header=False, box=None)
    rows = [
        ("checkpoint", str(path)),
        ("model_type", args.label),
        ("architecture", ARCHITECTURES[args.model_type]),
        (
            "layers / hidden / heads",
            f"{args.num_hidden_layers} / {args.hidden_size} / {args.num_attention_heads}",
        ),
        (
            "experts (routed / shared / top-k)",
            f"{args.n_routed_experts} / {args.n_shared_experts} / {args.num_experts_per_tok}",
        ),
        ("routing", f"{args.topk_method} ({args.scoring_func})"),
        (
            "MTP layers in checkpoint",
            str(len({k.split(".")[1] for k in weights if k.startswith("mtp.")})),
        ),
        ("quantization", quantization_line(config)),
        ("weights", f"{weight_bytes / 1e9:.2f} GB"),
        ("KV cache, 4096 tokens", f"{cache_bytes / 1e6:.1f} MB"),
        ("KV cache per token per layer (bf16)", cache_line(args, kv)),
    ]
    if args.model_type == "deepseek_v32":
        rows.append(
            (
                "sparse attention",
                f"each token attends to at most {args.index_topk} positions, chosen by "
                f"{args.index_n_heads} indexer heads of {args.index_head_dim}",
            )
        )
    have = available_memory()
    if have:
        rows.append(("memory available", f"{have / 1e9:.1f} GB"))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    Console().print(table)


def _dtype_of(weights):
    import mlx.core as mx

    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float16
