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
    """A source checkpoint's quantization (one without MLX's `quantization` section)."""
    from ..models.compressed_tensors import packed_format

    packed = packed_format(config)
    if packed:
        return (
            f"{packed.bits}-bit, group {packed.group_size} (compressed-tensors, symmetric; "
            "read as MLX affine without requantizing)"
        )
    qc = config.get("quantization_config") or {}
    return "FP8 blocks (quantization_config)" if qc.get("quant_method") == "fp8" else "none"


def info_command(
    model: str = typer.Argument(..., help="Folder, Hugging Face repo id, 'demo' or 'demo-v4'."),
) -> None:
    """Show a checkpoint's architecture, size, memory need and KV-cache cost per token."""
    from rich.console import Console
    from rich.table import Table

    from ..loading import (
        available_memory,
        estimate_memory,
        format_bytes,
        mtp_layers_present,
        read_checkpoint,
        resolve_model_path,
        tensor_entries,
    )

    path = resolve_model_path(model)
    args, config, headers = read_checkpoint(path)  # headers only: no tensor is read
    tensors = {name: entry for name, (_, entry) in tensor_entries(path, headers).items()}
    weight_bytes, cache_bytes = estimate_memory(args, tensors, dtype=_dtype_of(tensors))
    quant = config.get("quantization")

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
            str(mtp_layers_present(args, tensors)),
        ),
        (
            "quantization",
            describe_quantization(quant, tensors) if quant else quantization_line(config),
        ),
        ("weights", format_bytes(weight_bytes)),
        ("cache, 4096 tokens", format_bytes(cache_bytes)),
        *_cache_rows(args),
    ]
    have = available_memory()
    if have:
        rows.append(("memory available", format_bytes(have)))
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


def _dtype_of(tensors):
    """The checkpoint's float dtype (what it would run in), as an MLX dtype."""
    import mlx.core as mx

    names = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}
    for entry in tensors.values():
        if entry.dtype in names:
            return names[entry.dtype]
    return mx.float16


# module path (layer numbers dropped) -> what it is, for the quantization line
_KINDS = (
    ("switch_mlp", "routed experts"),
    ("shared_experts", "shared experts"),
    ("self_attn", "attention"),
    ("eh_proj", "MTP projection"),
    ("embed_tokens", "embedding"),
    ("shared_head.head", "lm_head"),
    ("lm_head", "lm_head"),
    (".mlp.", "dense MLP"),
)


def module_kind(module: str) -> str:
    for key, kind in _KINDS:
        if key in module:
            return kind
    return module.rsplit(".", 1)[-1]


def describe_quantization(quant: dict, tensors) -> str:
    """Bits per kind of module, e.g. "group 64: routed experts 4-bit; attention, embedding,
    lm_head 6-bit" (a mixed recipe), from the section's default and per-module overrides."""
    bits_of: dict[str, set[int]] = {}
    groups = set()
    for name in tensors:
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        spec = quant.get(module, True)
        if spec is False:
            continue
        spec = spec if isinstance(spec, dict) else quant
        bits_of.setdefault(module_kind(module), set()).add(spec["bits"])
        groups.add(spec["group_size"])
    order = [kind for _, kind in _KINDS]
    by_bits: dict[int, list[str]] = {}
    for kind in sorted(bits_of, key=lambda k: (order.index(k) if k in order else len(order), k)):
        for b in sorted(bits_of[kind]):
            by_bits.setdefault(b, []).append(kind)
    group = "/".join(str(g) for g in sorted(groups)) or str(quant["group_size"])
    if len(by_bits) <= 1:
        return f"{next(iter(by_bits), quant['bits'])}-bit, group {group}"
    parts = [f"{', '.join(kinds)} {b}-bit" for b, kinds in sorted(by_bits.items())]
    return f"{'; '.join(parts)} (group {group})"
