"""Checkpoint tensor mapping for the MLA families (V2, V2.5, V3, R1, V3.1): raw Hugging Face
DeepSeek names -> this model's parameters (V4's own layouts: v4_weights.py).

- per-expert `mlp.experts.{e}.{gate,up,down}_proj.*` are stacked into `mlp.switch_mlp.*`
  ([E, out, in]); all experts must be present;
- `self_attn.kv_b_proj` [H*(nope+v), rank] is split per head into `embed_q` (W_uk^T,
  [H, rank, nope]) and `unembed_out` (W_uv, [H, v, rank]), exactly (see _split_kv_b);
- the MTP layer(s) `model.layers.{num_hidden_layers + j}.*` become `mtp.{j}.*`, dropping their
  `embed_tokens` / `shared_head.head` copies when equal to the main model's;
- precomputed rotary tables are dropped.
Already-mapped names (mlx-lm or converted checkpoints) pass through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import mlx.core as mx

from ..errors import CheckpointError
from .config import ModelArgs

_EXPERT = re.compile(
    r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def _rename_mtp(args: ModelArgs, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    n_main = args.num_hidden_layers
    n_mtp = args.num_nextn_predict_layers if args.model_type == "deepseek_v3" else 0
    out = {}
    for name, value in weights.items():
        m = _LAYER.match(name)
        if m and n_main <= int(m.group(1)) < n_main + n_mtp:
            name = f"mtp.{int(m.group(1)) - n_main}.{m.group(2)}"
        out[name] = value
    return out


def stack_experts(
    weights: dict[str, mx.array],
    n_experts: int,
    pattern: re.Pattern = _EXPERT,
    proj_name: Callable[[str], str] = str,
) -> dict[str, mx.array]:
    """Per-expert tensors (`pattern` groups: prefix, expert, projection, kind) stacked as
    `{prefix}.switch_mlp.{proj_name(projection)}.{kind}` [E, ...]; every expert 0..E-1 must
    be there (CheckpointError naming the first missing one otherwise)."""
    groups: dict[tuple[str, str, str], dict[int, mx.array]] = {}
    out = {}
    for name, value in weights.items():
        m = pattern.match(name)
        if m:
            groups.setdefault((m.group(1), m.group(3), m.group(4)), {})[int(m.group(2))] = value
        else:
            out[name] = value
    E = n_experts
    for (prefix, proj, kind), experts in groups.items():
        missing = [e for e in range(E) if e not in experts]
        if missing or len(experts) != E:
            raise CheckpointError(
                f"tensor {prefix}.experts.{missing[0] if missing else E}.{proj}.{kind} is missing "
                f"(config.json says n_routed_experts={E}; the checkpoint has {len(experts)}): "
                "re-download the checkpoint or fix n_routed_experts"
            )
        stacked = mx.stack([experts[e] for e in range(E)])
        out[f"{prefix}.switch_mlp.{proj_name(proj)}.{kind}"] = stacked
    return out


def _split_kv_b(args: ModelArgs, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    H, nope, v, rank = (
        args.num_attention_heads,
        args.qk_nope_head_dim,
        args.v_head_dim,
        args.kv_lora_rank,
    )
    for name in [k for k in weights if k.endswith("self_attn.kv_b_proj.weight")]:
        prefix = name[: -len(".kv_b_proj.weight")]
        w = weights.pop(name)
        scales = weights.pop(f"{prefix}.kv_b_proj.scales", None)
        biases = weights.pop(f"{prefix}.kv_b_proj.biases", None)
        rows = H * (nope + v)
        if w.shape[0] != rows or (scales is None and w.shape[1] != rank):
            raise CheckpointError(
                f"tensor {name} has shape {tuple(w.shape)}, but config.json implies "
                f"{(rows, rank)} (num_attention_heads*(qk_nope_head_dim+v_head_dim), "
                "kv_lora_rank): check those fields"
            )
        if scales is None:
            w = w.reshape(H, nope + v, rank)
            weights[f"{prefix}.embed_q.weight"] = mx.contiguous(w[:, :nope].swapaxes(-1, -2))
            weights[f"{prefix}.unembed_out.weight"] = mx.contiguous(w[:, nope:])
            continue
        # Quantized (mlx-lm's V2 checkpoints). W_uv's rows are kv_b_proj rows with the same
        # groups along the rank: slice the packed words, exactly. W_uk is needed transposed
        # (other groups): keep it dequantized rather than quantizing it a second time.
        bits = (w.shape[-1] * 32) // rank
        group_size = rank // scales.shape[-1]
        for key, t in (("weight", w), ("scales", scales), ("biases", biases)):
            t = t.reshape(H, nope + v, -1)
            weights[f"{prefix}.unembed_out.{key}"] = mx.contiguous(t[:, nope:])
        # float32 scales: W_uk exactly as the quantized values say, not rounded to bf16
        f32 = mx.float32
        wk = mx.dequantize(
            w, scales.astype(f32), biases.astype(f32), group_size=group_size, bits=bits
        )
        wk = wk.reshape(H, nope + v, rank)[:, :nope]
        weights[f"{prefix}.embed_q.weight"] = mx.contiguous(wk.swapaxes(-1, -2))
    return weights


def _drop_duplicate_mtp_copies(args: ModelArgs, weights: dict[str, mx.array]) -> None:
    main = {
        "embed_tokens": "model.embed_tokens",
        "shared_head.head": "model.embed_tokens" if args.tie_word_embeddings else "lm_head",
    }
    for j in range(args.num_nextn_predict_layers):
        for local, main_prefix in main.items():
            for kind in ("weight", "scales", "biases"):
                name = f"mtp.{j}.{local}.{kind}"
                if name not in weights:
                    continue
                ref = weights.get(f"{main_prefix}.{kind}")
                if (
                    ref is not None
                    and ref.shape == weights[name].shape
                    and mx.array_equal(ref, weights[name]).item()
                ):
                    del weights[name]


def sanitize(args: ModelArgs, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if any(k.endswith("weight_scale_inv") for k in weights):
        raise CheckpointError(
            "this checkpoint stores FP8 weights (weight_scale_inv tensors): convert it first with "
            "`mlx-deepseek convert SRC -o DST`, then load DST"
        )
    weights = _rename_mtp(args, weights)
    weights = stack_experts(weights, args.n_routed_experts or 0)
    weights = _split_kv_b(args, weights)
    _drop_duplicate_mtp_copies(args, weights)
    if args.tie_word_embeddings:
        for kind in ("weight", "scales", "biases"):
            head, embed = (
                weights.pop(f"lm_head.{kind}", None),
                weights.get(f"model.embed_tokens.{kind}"),
            )
            if head is not None and not (
                embed is not None
                and head.shape == embed.shape
                and mx.array_equal(head, embed).item()
            ):
                raise CheckpointError(
                    f"config.json says tie_word_embeddings=true, but tensor lm_head.{kind} "
                    f"differs from model.embed_tokens.{kind}: set tie_word_embeddings to false"
                )
    return weights
