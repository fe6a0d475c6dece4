"""Synthetic DeepSeek V4 checkpoints in DeepSeek's release layout (benchmarks, memory runs).

Random weights for any V4 config, encoded as the release is: FP8 e4m3 linears with one ue8m0
(power-of-two) scale per 128 x 128 block, FP4 e2m1 routed experts (two per int8 byte, an
E8M0 scale per 32), bf16 embedding / head / norms, float32 mixing parameters, an int32 hash
table. Tensors are generated, encoded and written one at a time (experts one by one), so a
checkpoint of many GB needs little memory to make. (The tests build theirs with transformers'
own class instead: tests/v4_checkpoints.py.)
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_deepseek.models.tiny import FP8_BLOCK
from mlx_deepseek.models.v4_config import ModelArgs

from .layout_v4 import expected_entries
from .synthetic import write_tokenizer
from .writer import OutTensor, ShardWriter, numbered_shards

FP8_ROLES = ("attention", "shared_expert", "mtp_proj")  # the rest of the linears: bf16


def _planned(e, fmt: str) -> list[OutTensor]:
    """The release's tensors for one entry (a weight and, quantized, its scale)."""
    if fmt == "fp4":
        out, cols = e.shape
        scale = e.src[: -len("weight")] + "scale"
        return [
            OutTensor(e.src, mx.int8, (out, cols // 2), "I8"),
            OutTensor(scale, mx.uint8, (out, cols // 32), "F8_E8M0"),
        ]
    if fmt == "fp8":
        rows, cols = e.shape
        scale = e.src[: -len("weight")] + "scale"
        blocks = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        return [
            OutTensor(e.src, mx.uint8, e.shape, "F8_E4M3"),
            OutTensor(scale, mx.uint8, blocks, "F8_E8M0"),
        ]
    if e.kind == "table":
        return [OutTensor(e.src, mx.int32, e.shape)]
    return [OutTensor(e.src, mx.float32 if e.keep_float32 else mx.bfloat16, e.shape)]


def _format(e) -> str:
    if e.role == "routed_expert":
        return "fp4"
    return "fp8" if e.kind == "linear" and e.role in FP8_ROLES else "float"


def _values(e, rng: np.random.Generator) -> np.ndarray:
    """Float32 weights scaled like a trained model's; norms near 1; small mixing weights."""
    shape = e.shape
    if e.role == "norm":
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if e.role == "mixing":
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if e.role == "router_bias":
        return 0.05 * rng.standard_normal(shape, dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[-1]))


def encode_fp8(w: np.ndarray) -> tuple[mx.array, mx.array]:
    """float32 [R, C] -> (e4m3 bytes [R, C], ue8m0 bytes per 128 x 128 block)."""
    R, C = w.shape
    nr, nc = -(-R // FP8_BLOCK), -(-C // FP8_BLOCK)
    padded = np.zeros((nr * FP8_BLOCK, nc * FP8_BLOCK), np.float32)
    padded[:R, :C] = w
    amax = np.abs(padded.reshape(nr, FP8_BLOCK, nc, FP8_BLOCK)).max(axis=(1, 3))
    exps = np.ceil(np.log2(np.maximum(amax, 1e-30) / 448.0)).astype(np.int32)
    full = np.repeat(np.repeat(np.ldexp(1.0, -exps), FP8_BLOCK, 0), FP8_BLOCK, 1)[:R, :C]
    codes = mx.to_fp8(mx.array((w * full).astype(np.float32)))
    return codes, mx.array((exps + 127).astype(np.uint8))


def encode_fp4(w: np.ndarray) -> tuple[mx.array, mx.array]:
    """float32 [R, C] -> (e2m1 codes two per int8 byte [R, C/2], E8M0 bytes [R, C/32]): MLX's
    mxfp4 is this very layout, so its quantizer writes the release's bytes."""
    packed, scales = mx.quantize(mx.array(w), group_size=32, bits=4, mode="mxfp4")
    return packed.view(mx.int8), scales


def write_release(
    folder: str | Path, config: dict[str, Any], *, shards: int = 1, tokenizer: bool = True
) -> int:
    """Write a random V4 checkpoint in DeepSeek's layout; returns its tensor bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(config)
    entries = expected_entries(args, keep_mtp=args.num_nextn_predict_layers > 0)
    planned = [(e, _format(e)) for e in entries]
    tensors = [t for e, fmt in planned for t in _planned(e, fmt)]
    total = sum(t.nbytes for t in tensors)
    groups: list[list[OutTensor]] = [[] for _ in range(shards)]
    done = 0
    for t in tensors:
        groups[min(shards - 1, done * shards // max(total, 1))].append(t)
        done += t.nbytes
    groups = [g for g in groups if g]
    files = numbered_shards(groups)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_tokenizer(folder, config)
    writer = ShardWriter(folder, files)
    try:
        for e, fmt in planned:
            rng = np.random.default_rng(zlib.crc32(e.src.encode()))
            outs = _planned(e, fmt)
            if e.kind == "table":
                table = np.stack([rng.permutation(args.n_routed_experts)[: e.shape[1]]
                                  for _ in range(e.shape[0])])  # fmt: skip
                writer.write(outs[0].name, mx.array(table.astype(np.int32)))
                continue
            w = _values(e, rng)
            if fmt == "float":
                writer.write(outs[0].name, mx.array(w).astype(outs[0].dtype))
                continue
            weight, scale = (encode_fp4 if fmt == "fp4" else encode_fp8)(w)
            mx.eval(weight, scale)
            writer.write(outs[0].name, weight)
            writer.write(outs[1].name, scale)
        index = writer.finish()
    finally:
        writer.close()
    if len(files) == 1:
        (folder / "model.safetensors.index.json").unlink()
    return int(index["metadata"]["total_size"])
