"""MLA absorbed decode attention as two Metal kernels (family "mla").

MLX runs the absorbed attention of a decode step as ~9 dispatches: MLX's fused SDPA has no
kernel for a 512-wide head with an array mask, so it expands to scale, two matmuls, the mask
add, softmax and a matmul, plus q_pe's RoPE and scale and the W_uv matmul. Here (sources
metal_kernels/mla_attend.metal, mla_combine.metal):

  attend   per chunk of cached keys and group of queries (query = head x token): RoPE of
           q_pe, scores against c_kv and k_pe, causal mask, online softmax partials
  combine  per head: merges the chunks and multiplies by W_uv (when unembed_out is
           affine-quantized; otherwise it returns the latent output and MLX does W_uv)

The key range is split into chunks (flash-decoding) so long contexts fill the GPU; the
partials are float32. Only for 1-8 tokens per step (decode, speculative verification) with
the causal mask or none.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .runtime import (
    SUPPORTED_DTYPES,
    KernelSpec,
    Launch,
    Unsupported,
    affine,
    header,
    launch,
    source,
    token_count,
)

BK = 32  # keys per tile (one per lane in the softmax step)
ATTEND_THREADS = 256
COMBINE_THREADS = 256
CHUNK = 512  # keys per chunk once the GPU is full
MIN_THREADGROUPS = 64  # split long contexts until the attend pass has this many
TG_MEMORY = 32768


def query_group(rank: int, rope: int) -> int:
    """Queries per attend threadgroup: as many of 8, 4, 2, 1 as fit its 32 KB."""
    for qg in (8, 4, 2, 1):
        if 4 * (qg * (rank + rope) + qg * BK + 3 * qg) <= TG_MEMORY:
            return qg
    raise Unsupported(f"latent width {rank + rope} does not fit a threadgroup")


def chunking(S: int, groups: int) -> tuple[int, int]:
    """(number of chunks, keys per chunk) for S keys and `groups` query groups x batch."""
    tiles = -(-S // BK)
    nb = min(tiles, max(-(-S // CHUNK), -(-MIN_THREADGROUPS // groups)))
    chunk = BK * -(-tiles // nb)
    return -(-S // chunk), chunk


def attention_specs(
    dtype: mx.Dtype,
    B: int,
    H: int,
    L: int,
    S: int,
    rank: int,
    rope: int,
    nope: int,
    v_dim: int,
    unembed: tuple[int, int, mx.Dtype] | None,
) -> tuple[KernelSpec, KernelSpec, int]:
    """(attend launch, combine launch, chunk length) for one call. unembed: (bits, group
    size, scales dtype) of a quantized W_uv to apply in the combine pass, or None."""
    qg = query_group(rank, rope)
    n_groups = -(-H * L // qg)
    nb, chunk = chunking(S, n_groups * B)
    common = header("moe_common.h", "fused_common.h")
    attend = KernelSpec(
        name="mdsk_mla_attend",
        input_names=("q_lat", "qb", "c_kv", "k_pe", "freqs", "fparams", "iparams"),
        output_names=("o", "ml"),
        source=source("mla_attend.metal"),
        header=common,
        grid=(ATTEND_THREADS * n_groups, nb, B),
        threadgroup=(ATTEND_THREADS, 1, 1),
        template=(
            ("T", dtype),
            ("H", H),
            ("L", L),
            ("RANK", rank),
            ("ROPE", rope),
            ("NOPE", nope),
            ("QG", qg),
            ("BK", BK),
            ("NTH", ATTEND_THREADS),
        ),
        output_shapes=((B, nb, H * L, rank), (B, nb, H * L, 2)),
        output_dtypes=(mx.float32, mx.float32),
        ensure_row_contiguous=False,  # the cache slices: the kernel reads their strides
    )
    bits, gs, sdtype = unembed or (4, 32, dtype)
    combine = KernelSpec(
        name="mdsk_mla_combine",
        input_names=("o", "ml", "w", "scales", "biases"),
        output_names=("y",),
        source=source("mla_combine.metal"),
        header=common,
        grid=(COMBINE_THREADS, H, B),
        threadgroup=(COMBINE_THREADS, 1, 1),
        template=(
            ("T", dtype),
            ("S", sdtype),
            ("H", H),
            ("L", L),
            ("RANK", rank),
            ("V", v_dim),
            ("BITS", bits),
            ("GS", gs),
            ("UNEMBED", unembed is not None),
            ("NTH", COMBINE_THREADS),
        ),
        output_shapes=((B, L, H * v_dim),) if unembed else ((B, H, L, rank),),
        output_dtypes=(dtype,),
    )
    return attend, combine, chunk


def _quantized_unembed(
    unembed_out: nn.Module, heads: int, v_dim: int, rank: int
) -> tuple[int, int, mx.Dtype] | None:
    try:
        bits, gs = affine(unembed_out, "unembed_out")
    except Unsupported:
        return None
    w, s = unembed_out.weight, unembed_out.scales
    if w.shape != (heads, v_dim, rank * bits // 32) or s.shape != (heads, v_dim, rank // gs):
        return None
    if s.dtype not in SUPPORTED_DTYPES or unembed_out.biases.dtype != s.dtype:
        return None
    return bits, gs, s.dtype


def absorbed_attention(
    q: mx.array,
    c_kv: mx.array,
    k_pe: mx.array,
    embed_q: nn.Module,
    unembed_out: nn.Module,
    rope: Any,
    nope: int,
    v_dim: int,
    scale: float,
    offset: int,
) -> Launch:
    """MLA's absorbed attention output [B, L, H * v] (o_proj's input), causal.

    q: q_proj's output [B, L, H * (nope + rope)] (q_pe un-roped); c_kv, k_pe: the cache
    after the update [B, 1, S, *]; offset: position of the first of the L tokens (token l
    sees keys <= offset + l); embed_q / unembed_out: W_uk^T / W_uv as MultiLinear layers.
    """
    B, L, _ = q.shape
    rank, rope_dims = c_kv.shape[-1], k_pe.shape[-1]
    H = q.shape[-1] // (nope + rope_dims)
    token_count(q)
    S = k_pe.shape[2]
    dtype = q.dtype
    if dtype not in SUPPORTED_DTYPES or {c_kv.dtype, k_pe.dtype} != {dtype}:
        raise Unsupported(f"dtypes {q.dtype} {c_kv.dtype} {k_pe.dtype}")
    if q.shape[-1] != H * (nope + rope_dims):
        raise Unsupported(f"query shape {q.shape}")
    if not isinstance(offset, int):
        raise Unsupported(f"offset {offset!r} is not a Python int")
    if c_kv.shape != (B, 1, S, rank) or k_pe.shape != (B, 1, S, rope_dims) or S != offset + L:
        raise Unsupported(f"cache shapes {c_kv.shape} {k_pe.shape} at offset {offset}")
    if rope_dims % 2 or rope_dims != rope.dims:
        raise Unsupported(f"rope dims {rope_dims}")
    query_group(rank, rope_dims)
    if 4 * L * rank > TG_MEMORY:  # the combine pass holds every token's latent output
        raise Unsupported(f"{L} tokens of a {rank}-wide latent")
    unembed = _quantized_unembed(unembed_out, H, v_dim, rank)
    attend, combine, chunk = attention_specs(
        dtype, B, H, L, S, rank, rope_dims, nope, v_dim, unembed
    )
    fparams = mx.array([scale, rope.mscale], dtype=mx.float32)
    iparams = mx.array([offset, chunk], dtype=mx.int32)
    if unembed:
        w_inputs = [unembed_out.weight, unembed_out.scales, unembed_out.biases]
    else:  # never read; 8 elements keep them in the `device` address space like real ones
        w_inputs = [mx.array([0] * 8, mx.uint32), mx.array([0.0] * 8, dtype)]
        w_inputs.append(w_inputs[1])

    def run() -> list[mx.array]:
        q_nope = q.reshape(B, L, H, -1)[..., :nope].transpose(0, 2, 1, 3)
        q_lat = embed_q(q_nope)  # [B, H, L, rank]
        o, ml = launch(attend, [q_lat, q, c_kv, k_pe, rope.freqs, fparams, iparams])
        y = launch(combine, [o, ml, *w_inputs])[0]
        if not unembed:  # [B, H, L, rank] -> W_uv by MLX -> [B, L, H * v]
            y = unembed_out(y).transpose(0, 2, 1, 3).reshape(B, L, H * v_dim)
        return [y]

    return Launch(("mla", attend.template, combine.template, B), run, dtype)
