"""DeepSeek V4 in the benchmark: its synthetic shapes, their checkpoints, its cache filled to a
context, and its KV bytes per token next to V3's.

mlx-lm (0.32) has no `deepseek_v4` model, so a V4 shape is measured with mlx-deepseek alone.
Its source checkpoint is written in DeepSeek's release layout (FP8 linears with ue8m0 block
scales, FP4 routed experts: convert/synthetic_v4.py) and converted by `mlx-deepseek convert`
as a user would: the FP4 experts become MLX mxfp4 bit for bit, the FP8 linears the requested
affine bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

# DeepSeek-V4-Flash's attention schedule: two sliding-window layers, then compressed sparse
# (ratio 4) and heavily compressed (ratio 128) in turn; the MTP layer's entry last
FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4, 0]
FLASH_LAYERS = 43
V3_LAYERS, V3_VALUES_PER_LAYER = 61, 512 + 64  # MLA's latent + the RoPE key, per token
BF16 = 2

# V4-Flash's per-layer fields exactly (families-2026.md); layers, experts, vocabulary scaled
FLASH_FIELDS: dict[str, Any] = dict(
    hidden_size=4096,
    moe_intermediate_size=2048,
    num_attention_heads=64,
    head_dim=512,
    qk_rope_head_dim=64,
    q_lora_rank=1024,
    num_experts_per_tok=6,
    n_shared_experts=1,
    o_groups=8,
    o_lora_rank=1024,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    sliding_window=128,
    hc_mult=4,
    swiglu_limit=10.0,
    routed_scaling_factor=1.5,
    scoring_func="sqrtsoftplus",
    rope_theta=10000,
    compress_rope_theta=160000,
    max_position_embeddings=1048576,
)


def flash_config(ratios: list[int], experts: int, vocab: int) -> dict[str, Any]:
    """A V4 config.json in DeepSeek's layout with Flash's per-layer shapes, the layers'
    attention kinds from `ratios`, one hash-routed layer and no MTP module."""
    from mlx_deepseek.convert.synthetic_v4 import release_config

    return release_config(
        **FLASH_FIELDS,
        vocab_size=vocab,
        num_hidden_layers=len(ratios),
        n_routed_experts=experts,
        compress_ratios=list(ratios),
        num_hash_layers=1,
        num_nextn_predict_layers=0,
    )


def tiny_config(ratios: list[int]) -> dict[str, Any]:
    """A V4 model of a few MB with every layer kind (tests, a smoke run): window 8, ratios 4
    and 16, top-4 of the indexer."""
    from mlx_deepseek.convert.synthetic_v4 import release_config

    return release_config(
        vocab_size=512,
        hidden_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=len(ratios),
        num_attention_heads=4,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=64,
        num_experts_per_tok=2,
        n_routed_experts=4,
        o_groups=2,
        o_lora_rank=64,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=4,
        sliding_window=8,
        hc_mult=2,
        hc_sinkhorn_iters=3,
        compress_ratios=list(ratios),
        num_hash_layers=1,
        num_nextn_predict_layers=0,
        max_position_embeddings=65536,
    )


def write_source(config: dict[str, Any], folder: Path) -> None:
    """The release-layout checkpoint (FP8 / FP4 / bf16), tensor by tensor, ~4 GB a shard."""
    from mlx_deepseek.convert.synthetic_v4 import write_release
    from mlx_deepseek.models.v4_config import ModelArgs

    args = ModelArgs.from_dict(config)
    fp4_bytes = 3 * args.n_routed_experts * args.moe_intermediate_size * args.hidden_size // 2
    shards = max(1, -(-fp4_bytes * args.num_hidden_layers // (4 * 10**9)))
    write_release(folder, config, shards=shards)


def is_v4_cache(cache: list[Any]) -> bool:
    return bool(cache) and hasattr(cache[0], "window")


# ---- a cache at a context, without the prefill -------------------------------------------------


def buffer_widths(model: Any) -> list[dict[str, tuple[int, mx.Dtype]]]:
    """Per layer: each cache buffer's row width and dtype, read after a real prefill of one
    heavily-compressed window (so that every buffer holds rows)."""
    from mlx_deepseek.models.v4_config import ModelArgs

    args: ModelArgs = model.args
    longest = max([args.compress_ratio(i) for i in range(args.num_hidden_layers)] + [1])
    cache = model.make_cache()
    mx.eval(model(mx.zeros((1, longest), mx.int32), cache))
    out = []
    for c in cache:
        widths = {}
        for name in ("window", "compressed", "comp_state", "indexer", "index_state"):
            b = getattr(c, name)
            if b is not None:
                widths[name] = (b.buf.shape[2], b.buf.dtype)
        out.append(widths)
    return out


def fill(model: Any, widths: list[dict], context: int, room: int, key: mx.array) -> list[Any]:
    """A V4 cache at offset `context`, every buffer holding random rows of its real width
    where a decode step at that offset reads them: the window's last positions, every
    compressed and indexer row, the compressors' open windows; `room` more tokens fit
    without reallocating, and up to MAX_ROLLBACK tokens roll back exactly (`rewind`)."""
    from mlx_deepseek.models.v4_cache import MAX_ROLLBACK, STEP

    cache = model.make_cache()
    back = max(0, context - MAX_ROLLBACK)
    for c, layer in zip(cache, widths, strict=True):
        spans = {"window": (c._window_floor(back), context)}
        if c.ratio:
            state = (c._state_floor(back), context)
            spans.update(comp_state=state, index_state=state)
            spans.update(compressed=(0, context // c.ratio), indexer=(0, context // c.ratio))
        for name, (width, dtype) in layer.items():
            start, end = spans[name]
            key, sub = mx.random.split(key)
            b = getattr(c, name)
            b.buf = mx.random.normal((1, end - start + room + STEP, width), key=sub).astype(dtype)
            b.start, b.end = start, end
        c.offset = context
        c.advance(0)
        mx.eval(c.state)
    return cache


def rewind(cache: list[Any], offset: int) -> None:
    """Roll a V4 cache back to `offset` (<= MAX_ROLLBACK tokens: exact)."""
    for c in cache:
        c.trim(c.offset - offset)


def cache_bytes_per_token(cache: list[Any]) -> float:
    """The rows held (windows, compressed and indexer rows, compressor state) per token."""
    return sum(c.nbytes for c in cache) / max(cache[0].offset, 1)


def read_bytes(cache: list[Any], topk: int) -> int:
    """Cache bytes one decode step reads: per layer the window, and the compressor state of
    the open windows; a compressed sparse layer its top-k compressed rows and every indexer
    row (the indexer scores them all); a heavily compressed layer all its rows."""
    total = 0
    for c in cache:
        total += _row_bytes(c.window, min(c.window.end - c.window.start, c.window_size))
        for state in (c.comp_state, c.index_state):
            if state is not None:
                total += _row_bytes(state, state.end - c._state_floor(c.offset))
        if c.compressed is not None:
            n = c.compressed.end
            total += _row_bytes(c.compressed, min(n, topk) if c.indexer is not None else n)
        if c.indexer is not None:
            total += _row_bytes(c.indexer, c.indexer.end)
    return total


def _row_bytes(b: Any, rows: int) -> int:
    return 0 if b.buf is None else rows * b.buf.shape[2] * b.buf.dtype.size


# ---- KV bytes per token, whole models -----------------------------------------------------------


def kv_comparison(config: dict[str, Any]) -> dict[str, Any]:
    """KV cache bytes per token in bf16: the whole V4-Flash (43 layers, its schedule) next to
    the whole V3 (61 MLA layers), and this synthetic model's layers; V4's windows are bounded
    (a fixed size, not per token), listed apart."""
    from mlx_deepseek.models.v4_config import ModelArgs

    flash = ModelArgs.from_dict(
        {
            **FLASH_FIELDS,
            "model_type": "deepseek_v4",
            "num_hidden_layers": FLASH_LAYERS,
            "compress_ratios": FLASH_RATIOS,
            "num_nextn_predict_layers": 1,
        }
    )
    here = ModelArgs.from_dict(config)
    v3 = V3_LAYERS * V3_VALUES_PER_LAYER
    v4 = flash.cache_values_per_token()
    return {
        "dtype": "bfloat16",
        "v4_flash_values_per_token": v4,
        "v4_flash_bytes_per_token": v4 * BF16,
        "v4_flash_window_bytes": flash.window_values() * BF16,
        "v3_values_per_token": v3,
        "v3_bytes_per_token": v3 * BF16,
        "v3_over_v4": v3 / v4,
        "synthetic_values_per_token": here.cache_values_per_token(),
        "synthetic_v3_values_per_token": here.num_hidden_layers * V3_VALUES_PER_LAYER,
    }
