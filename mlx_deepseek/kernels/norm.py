"""Small fused Metal kernels for a decode step's glue (sources in metal_kernels/).

- `add_rms_norm`: the residual add and the next RMSNorm in one dispatch (family "norm");
- `latent_norm_rope`: MLA's kv_a_layernorm of c_kv and the RoPE of k_pe, the two halves of
  kv_a_proj_with_mqa's output, in one dispatch (family "latent");
- `quantized_embedding`: nn.QuantizedEmbedding's three gathers and dequantize in one
  dispatch (family "embedding").

Each returns None where it does not apply (no Metal, switched off, more than MAX_TOKENS
tokens, other dtypes or layers) and the caller computes the same maths with MLX. See
kernels.py for the runtime (self-check, switches, counting).
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn

from ..models.rope import RoPE
from .runtime import (
    SUPPORTED_DTYPES,
    KernelSpec,
    Unsupported,
    affine,
    enabled,
    fused_call,
    header,
    launch,
    source,
    token_count,
)

log = logging.getLogger(__name__)


def threads_for(n: int) -> int:
    """Threads per threadgroup for a row of n values: ~4 values each, 32 to 1024."""
    return min(1024, 32 * max(1, -(-n // 128)))


def _float_params(*values: float) -> mx.array:
    return mx.array(values, dtype=mx.float32)


def _rms_weight(norm: nn.Module, dtype: mx.Dtype, size: int, what: str) -> mx.array:
    w = norm.get("weight")
    if not isinstance(norm, nn.RMSNorm) or w is None:
        raise Unsupported(f"{what} is not an RMSNorm with a weight")
    if w.dtype != dtype or tuple(w.shape) != (size,):
        raise Unsupported(f"{what}'s weight is {w.dtype} {tuple(w.shape)}")
    return w


# ---- residual add + RMSNorm --------------------------------------------------------------------


def add_rms_norm(
    x: mx.array, r: mx.array, norm: nn.Module, float32_copy: bool = False
) -> tuple[mx.array, ...] | None:
    """(h, norm(h)) with h = x + r, from one kernel; None where it does not apply. With
    float32_copy, a third output norm(h).astype(float32) (for a float32 router) from the
    same kernel."""
    if not enabled("norm"):
        return None
    try:
        if x.dtype not in SUPPORTED_DTYPES or r.dtype != x.dtype or r.shape != x.shape:
            raise Unsupported(f"x {x.dtype} {x.shape}, r {r.dtype} {r.shape}")
        n, D = token_count(x), x.shape[-1]
        w = _rms_weight(norm, x.dtype, D, "the norm")
    except Unsupported as e:
        log.debug("fused add+RMSNorm not used: %s", e)
        return None
    nth = threads_for(D)
    outputs = ("h", "y", "y32") if float32_copy else ("h", "y")
    spec = KernelSpec(
        name="mdsk_add_rms_norm_y32" if float32_copy else "mdsk_add_rms_norm",
        input_names=("x", "r", "w", "eps"),
        output_names=outputs,
        source=f"#define MDSK_Y32 {int(float32_copy)}\n" + source("add_rms_norm.metal"),
        header=header("moe_common.h", "fused_common.h"),
        grid=(nth, n, 1),
        threadgroup=(nth, 1, 1),
        template=(("T", x.dtype), ("D", D), ("NTH", nth)),
        output_shapes=((n, D),) * len(outputs),
        output_dtypes=(x.dtype, x.dtype, mx.float32)[: len(outputs)],
    )
    inputs = [x.reshape(n, D), r.reshape(n, D), w, _float_params(norm.eps)]

    def run() -> list[mx.array]:
        return [o.reshape(x.shape) for o in launch(spec, inputs)]

    def reference() -> list[mx.array]:
        h = x + r
        y = norm(h)
        return [h, y, y.astype(mx.float32)][: len(outputs)]

    variant = ("add_rms_norm", x.dtype, D, n, float32_copy)
    out = fused_call("norm", variant, run, reference, x.dtype)
    return tuple(out) if out else None


# ---- MLA latent: kv_a_layernorm(c_kv), rope(k_pe) ------------------------------------------------


def latent_norm_rope(
    kv: mx.array,
    norm: nn.Module,
    rope: RoPE,
    rank: int,
    offset: int,
    q_a: mx.array | None = None,
    q_norm: nn.Module | None = None,
) -> tuple[mx.array, ...] | None:
    """kv [B, L, rank + rope] -> (c_kv [B, 1, L, rank] normed, k_pe [B, 1, L, rope] roped at
    positions offset + l), from one kernel; with q_a [B, L, q_lora_rank] and q_norm (its
    RMSNorm, the same eps), q_norm(q_a) too, as a third output. None where it does not apply."""
    if not enabled("latent"):
        return None
    try:
        if kv.ndim != 3 or kv.dtype not in SUPPORTED_DTYPES:
            raise Unsupported(f"kv {kv.dtype} {kv.shape}")
        B, L, width = kv.shape
        n, dims = token_count(kv), width - rank
        if dims != rope.dims or dims % 2:
            raise Unsupported(f"rope dims {dims}")
        if not isinstance(offset, int):
            raise Unsupported("the cache offset is not a Python int")
        w = _rms_weight(norm, kv.dtype, rank, "kv_a_layernorm")
        qr = 0
        if q_a is not None:
            qr = q_a.shape[-1]
            if q_a.shape[:-1] != (B, L) or q_a.dtype != kv.dtype or q_norm.eps != norm.eps:
                raise Unsupported(f"q_a {q_a.dtype} {q_a.shape}")
            wq = _rms_weight(q_norm, kv.dtype, qr, "q_a_layernorm")
    except Unsupported as e:
        log.debug("fused latent norm+rope not used: %s", e)
        return None
    nth = threads_for(max(rank, qr))
    names = ("kv", "w", "freqs", "fparams", "iparams") + (("qa", "wq") if qr else ())
    spec = KernelSpec(
        name="mdsk_latent_qnorm_rope" if qr else "mdsk_latent_norm_rope",
        input_names=names,
        output_names=("c", "k", "qn") if qr else ("c", "k"),
        source=f"#define MDSK_QNORM {int(bool(qr))}\n" + source("latent_norm_rope.metal"),
        header=header("moe_common.h", "fused_common.h"),
        grid=(nth, n, 1),
        threadgroup=(nth, 1, 1),
        template=(("T", kv.dtype), ("RANK", rank), ("ROPE", dims), ("NTH", nth), ("QR", qr)),
        output_shapes=((n, rank), (n, dims), (n, qr))[: 3 if qr else 2],
        output_dtypes=(kv.dtype,) * (3 if qr else 2),
    )
    inputs = [
        kv.reshape(n, width),
        w,
        rope.freqs,
        _float_params(norm.eps, rope.mscale),
        mx.array([offset, L], dtype=mx.int32),
    ]
    if qr:
        inputs += [q_a.reshape(n, qr), wq]

    def run() -> list[mx.array]:
        c, k, *qn = launch(spec, inputs)
        out = [c.reshape(B, 1, L, rank), k.reshape(B, 1, L, dims)]
        return out + [qn[0].reshape(B, L, qr)] if qr else out

    def reference() -> list[mx.array]:
        c, k = mx.split(kv, [rank], axis=-1)
        out = [mx.expand_dims(norm(c), 1), rope(mx.expand_dims(k, 1), offset)]
        return out + [q_norm(q_a)] if qr else out

    variant = ("latent_norm_rope", kv.dtype, rank, dims, n, qr)
    out = fused_call("latent", variant, run, reference, kv.dtype)
    return tuple(out) if out else None


# ---- quantized embedding -----------------------------------------------------------------------


def quantized_embedding(
    embed: nn.Module, tokens: mx.array, norm: nn.Module | None = None
) -> tuple[mx.array, ...] | None:
    """(embed(tokens) [..., D],) for an affine nn.QuantizedEmbedding, from one kernel; with
    norm, (embed(tokens), norm(embed(tokens))) from the same kernel. None where it does not
    apply."""
    if not enabled("embedding") or not isinstance(embed, nn.QuantizedEmbedding):
        return None
    try:
        n = tokens.size
        if not 1 <= n <= 8 or not mx.issubdtype(tokens.dtype, mx.integer):
            raise Unsupported(f"tokens {tokens.dtype} {tokens.shape}")
        bits, gs = affine(embed, "the embedding")
        V, D = embed.weight.shape[0], embed.weight.shape[1] * 32 // bits
        dtype = embed.scales.dtype
        if dtype not in SUPPORTED_DTYPES or embed.biases.dtype != dtype:
            raise Unsupported(f"embedding scales {dtype}")
        if embed.scales.shape != (V, D // gs):
            raise Unsupported(f"embedding scales shape {embed.scales.shape}")
        wn = None if norm is None else _rms_weight(norm, dtype, D, "the first norm")
    except Unsupported as e:
        log.debug("fused embedding not used: %s", e)
        return None
    nth = threads_for(D)
    names, outputs = ("tok", "w", "scales", "biases"), ("y",)
    inputs = [tokens.reshape(n), embed.weight, embed.scales, embed.biases]
    if wn is not None:
        names, outputs = names + ("wn", "eps"), ("y", "n")
        inputs += [wn, _float_params(norm.eps)]
    spec = KernelSpec(
        name="mdsk_embedding_norm" if wn is not None else "mdsk_embedding",
        input_names=names,
        output_names=outputs,
        source=f"#define MDSK_NORM {int(wn is not None)}\n" + source("embedding.metal"),
        header=header("moe_common.h", "fused_common.h"),
        grid=(nth, n, 1),
        threadgroup=(nth, 1, 1),
        template=(("T", dtype), ("BITS", bits), ("GS", gs), ("D", D), ("NTH", nth)),
        output_shapes=((n, D),) * len(outputs),
        output_dtypes=(dtype,) * len(outputs),
    )

    def run() -> list[mx.array]:
        return [o.reshape(*tokens.shape, D) for o in launch(spec, inputs)]

    def reference() -> list[mx.array]:
        y = embed(tokens)
        return [y] if norm is None else [y, norm(y)]

    variant = ("embedding", dtype, bits, gs, D, n, tokens.dtype, wn is not None)
    out = fused_call("embedding", variant, run, reference, dtype)
    return tuple(out) if out else None
