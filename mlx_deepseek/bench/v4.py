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

from ..models.tiny import V4_FLASH, release_config

# the whole V4-Flash next to the whole V3 (61 MLA layers, each its latent + the RoPE key per token)
V3_LAYERS, V3_VALUES_PER_LAYER = 61, 512 + 64
BF16 = 2


def flash_config(ratios: list[int], experts: int, vocab: int) -> dict[str, Any]:
    """A V4 config.json in DeepSeek's layout with Flash's per-layer shapes (V4_FLASH), the
    layers' attention kinds from `ratios`, one hash-routed layer and no MTP module."""
    fields = dict(
        V4_FLASH,
        vocab_size=vocab,
        num_hidden_layers=len(ratios),
        n_routed_experts=experts,
        compress_ratios=list(ratios),
        num_hash_layers=1,
        num_nextn_predict_layers=0,
    )
    del fields["num_key_value_heads"]  # as the shapes' configs (and their cache keys) always were
    return release_config(**fields)


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

    flash = ModelArgs.from_dict(V4_FLASH)
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
