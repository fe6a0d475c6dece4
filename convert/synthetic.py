"""Synthetic DeepSeek checkpoints in the real Hugging Face layout (tests, benchmarks).

Random weights for any config (per-expert tensors, kv_b_proj, the MTP layer at index
`num_hidden_layers`), written as bf16, fp32 or DeepSeek-V3-style FP8 (e4m3 + block
`weight_scale_inv`), sharded with an index; optionally with each other weight's scale in
the next shard, as real FP8 checkpoints may place them. Tensors are generated and written
one at a time, so a checkpoint of many GB needs little memory to make.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_deepseek.models import model_args

from .layout import expected_entries
from .writer import OutTensor, ShardWriter, numbered_shards

FP8_MAX = 448.0
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '<｜User｜>' + m['content'] }}{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def source_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape of a Hugging Face checkpoint for `config` (MTP included)."""
    args = model_args(config)
    return {e.src: e.shape for e in expected_entries(args, keep_mtp=True)}


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Weights scaled like a trained model's (1/sqrt(in)); norms near 1; a small router bias."""
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith("e_score_correction_bias"):
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[-1]))


def is_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Which tensors DeepSeek-V3's FP8 release stores as FP8: linear weights, except the
    embeddings, heads and the router."""
    skip = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "mlp.gate.weight")
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith(skip)


def fp8_quantize(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """float32 [R, C] -> (e4m3 bytes uint8 [R, C], scale_inv float32 [ceil(R/br), ceil(C/bc)])."""
    R, C = w.shape
    br, bc = block
    nr, nc = -(-R // br), -(-C // bc)
    padded = np.zeros((nr * br, nc * bc), np.float32)
    padded[:R, :C] = w
    amax = np.abs(padded.reshape(nr, br, nc, bc)).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    full = np.repeat(np.repeat(scale, br, 0), bc, 1)[:R, :C]
    q = np.array(mx.to_fp8(mx.array(w / full)))
    return q, scale


def fp8_dequantize(q: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    R, C = q.shape
    full = np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[:R, :C]
    return np.array(mx.from_fp8(mx.array(q), dtype=mx.float32)) * full


def write_checkpoint(
    folder: str | Path,
    config: dict[str, Any],
    weights: dict[str, np.ndarray] | Callable[[str, tuple[int, ...]], np.ndarray] | None = None,
    *,
    fmt: str = "bf16",
    shards: int = 1,
    block: tuple[int, int] = (128, 128),
    scales_elsewhere: bool = False,
    seed: int = 0,
    tokenizer: bool = True,
    keep: Callable[[str], bool] | None = None,
    mtp_copies: bool = True,
) -> dict[str, np.ndarray] | None:
    """Write a checkpoint; returns the float32 weights it represents (None for a callable).

    `weights`: a dict (name -> float32), a function (name, shape) -> float32 called one
    tensor at a time (for big checkpoints; nothing is returned then), or None for random
    weights from `seed`. `fmt`: "bf16", "f32" or "fp8". `keep`: filter on tensor names.
    `mtp_copies`: random MTP embed_tokens / shared_head.head equal the main model's (as in
    DeepSeek's releases) rather than differing.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = source_shapes(config)
    if isinstance(weights, dict):
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if keep is not None:
        shapes = {k: v for k, v in shapes.items() if keep(k)}
    rng = np.random.default_rng(seed)
    make = weights if callable(weights) else None
    table = weights if isinstance(weights, dict) else None
    config = dict(config)
    if fmt == "fp8":
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        }
    elif fmt == "f32":
        config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_tokenizer(folder, config)

    def planned(name: str, shape: tuple[int, ...]) -> list[OutTensor]:
        if fmt == "fp8" and is_fp8_weight(name, shape):
            scale = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
            return [
                OutTensor(name, mx.uint8, shape, "F8_E4M3"),
                OutTensor(f"{name}_scale_inv", mx.float32, scale),
            ]
        dtype = mx.float32 if fmt == "f32" or name.endswith("correction_bias") else mx.bfloat16
        return [OutTensor(name, dtype, shape)]

    tensors = [t for name, shape in shapes.items() for t in planned(name, shape)]
    groups = _split(tensors, shards, scales_elsewhere)
    files = numbered_shards(groups)
    writer = ShardWriter(folder, files)
    effective: dict[str, np.ndarray] = {}
    n_main = config["num_hidden_layers"]
    head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    copies = {
        f"model.layers.{n_main + j}.{local}": main
        for j in range(config.get("num_nextn_predict_layers", 0))
        for local, main in (
            ("embed_tokens.weight", "model.embed_tokens.weight"),
            ("shared_head.head.weight", head),
        )
    }
    generated: dict[str, np.ndarray] = {}
    try:
        for name, shape in shapes.items():
            if make:
                w = make(name, shape)
            elif table:
                w = table[name]
            elif mtp_copies and copies.get(name) in generated:
                w = generated[copies[name]]
            else:
                w = random_tensor(name, shape, rng)
                if name in copies.values():
                    generated[name] = w
            w = np.asarray(w, dtype=np.float32)
            for t, data, eff in _encode(name, w, planned(name, shape), block):
                writer.write(t.name, data)
                if eff is not None and make is None:
                    effective[name] = eff
        writer.finish()
    finally:
        writer.close()
    if len(files) == 1:
        (folder / "model.safetensors.index.json").unlink()  # single-file checkpoints have none
    return None if make else effective


def _encode(
    name: str, w: np.ndarray, planned: list[OutTensor], block: tuple[int, int]
) -> Iterator[tuple[OutTensor, mx.array, np.ndarray | None]]:
    if planned[0].header_dtype == "F8_E4M3":
        q, scale = fp8_quantize(w, block)
        yield planned[0], mx.array(q), fp8_dequantize(q, scale, block)
        yield planned[1], mx.array(scale), None
        return
    a = mx.array(w).astype(planned[0].dtype)
    yield planned[0], a, np.array(a.astype(mx.float32))


def _split(tensors: list[OutTensor], n: int, scales_elsewhere: bool) -> list[list[OutTensor]]:
    """`n` groups of about equal bytes, in order; with scales_elsewhere, every other
    weight_scale_inv moves to the next group (wrapping around)."""
    total = sum(t.nbytes for t in tensors)
    groups: list[list[OutTensor]] = [[] for _ in range(n)]
    done, moved = 0, 0
    for t in tensors:
        i = min(n - 1, done * n // max(total, 1))
        if scales_elsewhere and t.name.endswith("_scale_inv"):
            moved += 1
            if moved % 2:
                i = (i + 1) % n
        groups[i].append(t)
        done += t.nbytes
    return [g for g in groups if g]


def write_tokenizer(folder: Path, config: dict[str, Any]) -> None:
    """A byte-level tokenizer (256 byte tokens after DeepSeek's BOS/EOS) + chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {BOS: 0, EOS: 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "add_bos_token": True,
                "model_max_length": config.get("max_position_embeddings", 4096),
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6})
    )
