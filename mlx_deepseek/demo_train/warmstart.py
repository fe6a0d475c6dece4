"""Start training from an earlier demo package (``train --init DIR``) instead of from scratch.

The earlier package (the 4-bit `mlx_deepseek/demo/` of an older release) has the same
architecture but its own tokenizer. Its weights are dequantized; every tensor whose shape
matches is copied; the embedding and output-head rows are copied token by token where the
token's string is in both vocabularies (byte-level BPE strings, special tokens by content),
and rows of tokens the old vocabulary lacks keep the new model's random start.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_deepseek.models.deepseek_v3 import Model

VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def _vocab(tokenizer_json: Path) -> dict[str, int]:
    data = json.loads(tokenizer_json.read_text())
    vocab = dict(data["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab


def dequantized(folder: Path) -> dict[str, mx.array]:
    """A package's tensors in float32, quantized ones (weight, scales, biases) dequantized;
    integer ones as they are."""
    config = json.loads((folder / "config.json").read_text())
    q = config.get("quantization") or {}
    raw: dict[str, mx.array] = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw.update(mx.load(str(f)))
    out = {}
    for name, w in raw.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in raw:
            continue
        base = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and base + ".scales" in raw:
            # a mixed recipe gives some layers their own bits / group size (mlx-lm's layout)
            own = q.get(base) if isinstance(q.get(base), dict) else q
            w = mx.dequantize(
                w, raw[base + ".scales"], raw[base + ".biases"], own["group_size"], own["bits"]
            )
        # (integer tensors, V4's hash tables, keep their dtype)
        out[name] = w.astype(mx.float32) if mx.issubdtype(w.dtype, mx.floating) else w
    return out


def warm_start(model: Model, folder: Path, tokenizer_json: Path) -> dict[str, int]:
    """Copy `folder`'s weights into `model` (see the module's docstring); returns counts."""
    old = dequantized(folder)
    old_vocab, new_vocab = _vocab(folder / "tokenizer.json"), _vocab(tokenizer_json)
    shared = [(new_vocab[s], i) for s, i in old_vocab.items() if s in new_vocab]
    new_ids = mx.array([n for n, _ in shared])
    old_ids = mx.array([o for _, o in shared])
    params = dict(tree_flatten(model.parameters()))
    updates, copied = [], 0
    for name, value in params.items():
        src = old.get(name)
        if src is None:
            continue
        if name in VOCAB_ROWS:
            value = mx.array(value)
            value[new_ids] = src[old_ids]
        elif src.shape != value.shape:
            raise ValueError(f"{name}: {folder} has shape {src.shape}, the model {value.shape}")
        else:
            value = src
        updates.append((name, value))
        copied += 1
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    return {"tensors_copied": copied, "tensors": len(params), "tokens_mapped": len(shared)}
