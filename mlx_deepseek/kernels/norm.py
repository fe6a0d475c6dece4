"""Small fused kernels for a decode step's glue (sources in metal_kernels/).

- `add_rms_norm`: the residual add and the next RMSNorm in one dispatch (family "norm");
- `latent_norm_rope`: MLA's kv_a_layernorm of c_kv and the RoPE of k_pe, the two halves of
  kv_a_proj_with_mqa's output (and q_a_layernorm of the q LoRA), in one dispatch ("latent");
- `quantized_embedding`: nn.QuantizedEmbedding's gathers and dequantize, and the first
  layer's input norm, in one dispatch ("embedding").

Each is a planner: it returns the `Launch` for its arguments or raises Unsupported (more
than MAX_TOKENS tokens, other dtypes or layers); mlx_deepseek/ops/metal.py dispatches.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from .runtime import (
    SUPPORTED_DTYPES,
    KernelSpec,
    Launch,
    Unsupported,
    affine,
    float_params,
    launch,
    row_kernel,
    source,
    token_count,
)


def _rms_weight(norm: nn.Module, dtype: mx.Dtype, size: int, what: str) -> mx.array:
    w = norm.get("weight")
    if not isinstance(norm, nn.RMSNorm) or w is None:
        raise Unsupported(f"{what} is not an RMSNorm with a weight")
    if w.dtype != dtype or tuple(w.shape) != (size,):
        raise Unsupported(f"{what}'s weight is {w.dtype} {tuple(w.shape)}")
    return w


def add_rms_norm(x: mx.array, r: mx.array, norm: nn.Module, float32_copy: bool = False) -> Launch:
    """(h, norm(h)) with h = x + r; with float32_copy also norm(h) in float32 (for a
    float32 router) from the same kernel."""
    if x.dtype not in SUPPORTED_DTYPES or r.dtype != x.dtype or r.shape != x.shape:
        raise Unsupported(f"x {x.dtype} {x.shape}, r {r.dtype} {r.shape}")
    n, D = token_count(x), x.shape[-1]
    w = _rms_weight(norm, x.dtype, D, "the norm")
    copy32 = float32_copy and x.dtype != mx.float32  # in float32, y is the copy
    outputs = ("h", "y", "y32") if copy32 else ("h", "y")
    spec = row_kernel(
        "mdsk_add_rms_norm_y32" if copy32 else "mdsk_add_rms_norm",
        ("x", "r", "w", "eps"),
        outputs,
        f"#define MDSK_Y32 {int(copy32)}\n" + source("add_rms_norm.metal"),
        (("T", x.dtype), ("D", D)),
        rows=n,
        width=D,
        output_shapes=((n, D),) * len(outputs),
        output_dtypes=(x.dtype, x.dtype, mx.float32)[: len(outputs)],
    )
    inputs = [x.reshape(n, D), r.reshape(n, D), w, float_params(norm.eps)]

    def run() -> list[mx.array]:
        out = [o.reshape(x.shape) for o in launch(spec, inputs)]
        return out + [out[1]] if float32_copy and not copy32 else out

    return Launch(("add_rms_norm", x.dtype, D, n, copy32), run, x.dtype)


def latent_norm_rope(
    kv: mx.array,
    norm: nn.Module,
    rope,
    offset: int,
    q_a: mx.array | None = None,
    q_norm: nn.Module | None = None,
) -> Launch:
    """kv [B, L, rank + rope] -> (c_kv [B, 1, L, rank] normed, k_pe [B, 1, L, rope] roped at
    positions offset + l); with q_a [B, L, q_lora_rank] and q_norm (its RMSNorm, the same
    eps), q_norm(q_a) too, as a third output."""
    if kv.ndim != 3 or kv.dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"kv {kv.dtype} {kv.shape}")
    if not isinstance(offset, int):
        raise Unsupported("the cache offset is not a Python int")
    B, L, width = kv.shape
    rank = norm.weight.shape[0]
    n, dims = token_count(kv), width - rank
    if dims != rope.dims or dims % 2:
        raise Unsupported(f"rope dims {dims}")
    w = _rms_weight(norm, kv.dtype, rank, "kv_a_layernorm")
    qr = 0
    if q_a is not None:
        qr = q_a.shape[-1]
        if q_a.shape[:-1] != (B, L) or q_a.dtype != kv.dtype or q_norm.eps != norm.eps:
            raise Unsupported(f"q_a {q_a.dtype} {q_a.shape}")
        wq = _rms_weight(q_norm, kv.dtype, qr, "q_a_layernorm")
    spec = row_kernel(
        "mdsk_latent_qnorm_rope" if qr else "mdsk_latent_norm_rope",
        ("kv", "w", "freqs", "fparams", "iparams") + (("qa", "wq") if qr else ()),
        ("c", "k", "qn") if qr else ("c", "k"),
        f"#define MDSK_QNORM {int(bool(qr))}\n" + source("latent_norm_rope.metal"),
        (("T", kv.dtype), ("RANK", rank), ("ROPE", dims)),
        rows=n,
        width=max(rank, qr),
        output_shapes=((n, rank), (n, dims), (n, qr))[: 3 if qr else 2],
        output_dtypes=(kv.dtype,) * (3 if qr else 2),
    )
    # QR after NTH in the kernel's template list: keep the order its source declares
    spec = _with_template(spec, ("QR", qr))
    inputs = [
        kv.reshape(n, width),
        w,
        rope.freqs,
        float_params(norm.eps, rope.mscale),
        mx.array([offset, L], dtype=mx.int32),
    ]
    if qr:
        inputs += [q_a.reshape(n, qr), wq]

    def run() -> list[mx.array]:
        c, k, *qn = launch(spec, inputs)
        out = [c.reshape(B, 1, L, rank), k.reshape(B, 1, L, dims)]
        return out + [qn[0].reshape(B, L, qr)] if qr else out + [None]

    return Launch(("latent_norm_rope", kv.dtype, rank, dims, n, qr), run, kv.dtype)


def quantized_embedding(
    embed: nn.Module, tokens: mx.array, norm: nn.Module | None = None
) -> Launch:
    """(embed(tokens) [..., D], norm(embed(tokens)) or None) for an affine
    nn.QuantizedEmbedding; the norm in the same dispatch."""
    if not isinstance(embed, nn.QuantizedEmbedding):
        raise Unsupported("the embedding is not quantized")
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
    names, outputs = ("tok", "w", "scales", "biases"), ("y",)
    inputs = [tokens.reshape(n), embed.weight, embed.scales, embed.biases]
    if norm is not None:
        names, outputs = names + ("wn", "eps"), ("y", "n")
        inputs += [_rms_weight(norm, dtype, D, "the norm"), float_params(norm.eps)]
    spec = row_kernel(
        "mdsk_embedding_norm" if norm is not None else "mdsk_embedding",
        names,
        outputs,
        f"#define MDSK_NORM {int(norm is not None)}\n" + source("embedding.metal"),
        (("T", dtype), ("BITS", bits), ("GS", gs), ("D", D)),
        rows=n,
        width=D,
        output_shapes=((n, D),) * len(outputs),
        output_dtypes=(dtype,) * len(outputs),
    )

    def run() -> list[mx.array]:
        out = [o.reshape(*tokens.shape, D) for o in launch(spec, inputs)]
        return out if norm is not None else out + [None]

    variant = ("embedding", dtype, bits, gs, D, n, tokens.dtype, norm is not None)
    return Launch(variant, run, dtype)


def _with_template(spec: KernelSpec, extra: tuple[str, object]) -> KernelSpec:
    return replace(spec, template=(*spec.template, extra))
