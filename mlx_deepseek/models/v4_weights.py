"""DeepSeek V4 checkpoint tensors -> the model's parameters.

Two published layouts load:
- DeepSeek's (`embed.weight`, `head.weight`, `norm.weight`, `hc_head_{fn,base,scale}`,
  `layers.N.{attn,ffn}.*`, `mtp.J.*`): FP8 e4m3 weights (uint8 bytes) with a `.scale` per
  128x128 block (ue8m0 bytes, or float32) are decoded to float32 here; the routed experts'
  FP4 e2m1 weights (int8, two per byte, low nibble first) with an E8M0 `.scale` per 32
  inputs ARE MLX's mxfp4 layout: they become quantized experts as they are, bit for bit.
- transformers' save_pretrained: the same names under `model.` (`model.layers.N...`,
  `model.embed_tokens.weight`, `model.norm.weight`, `model.hc_head.hc_{fn,base,scale}`) and
  `head.weight`, in floating point.
Both become: `model.embed_tokens`, `model.layers.N.*` (DeepSeek's leaf names, the routed
experts stacked as `ffn.switch_mlp.{gate,up,down}_proj` [E, out, in], the shared expert's
w1 / w3 / w2 as `ffn.shared_experts.{gate,up,down}_proj`), `model.norm.{weight,
hc_fn,hc_base,hc_scale}`, `lm_head`, and `mtp.J.*` (its collapse as `mtp.J.norm.hc_*`).
Names already in that form (converted MLX checkpoints) pass through.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx

from ..errors import CheckpointError
from .v4_config import ModelArgs
from .weights import stack_experts

FP8_BLOCK = 128
FP4_GROUP = 32
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "embed_tokens.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "lm_head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.norm.hc_fn",
    "hc_head_base": "model.norm.hc_base",
    "hc_head_scale": "model.norm.hc_scale",
    "hc_head.hc_fn": "model.norm.hc_fn",
    "hc_head.hc_base": "model.norm.hc_base",
    "hc_head.hc_scale": "model.norm.hc_scale",
}
_MTP_HEAD = re.compile(r"^mtp\.(\d+)\.hc_head_(fn|base|scale)$")
_EXPERT = re.compile(r"^(.*\.ffn)\.experts\.(\d+)\.(w[123])\.(weight|scales)$")
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_SHARED = re.compile(r"\.shared_experts\.(w[123])\.")


def canonical_name(name: str) -> str:
    """A tensor name of either published layout -> this model's parameter name."""
    body = name[len("model.") :] if name.startswith("model.") else name
    if body in _TOP:
        return _TOP[body]
    m = _MTP_HEAD.match(body)
    if m:
        return f"mtp.{m.group(1)}.norm.hc_{m.group(2)}"
    body = _SHARED.sub(lambda m: f".shared_experts.{_PROJ[m.group(1)]}.", body)
    if body.startswith("layers.") or body.startswith("norm.") or body.startswith("embed_tokens."):
        return f"model.{body}"
    return body


def e8m0_to_float(scale: mx.array) -> mx.array:
    """ue8m0 bytes (2**(b - 127)) -> float32, exactly (float32 scales pass through)."""
    if scale.dtype != mx.uint8:
        return scale.astype(mx.float32)
    bits = scale.astype(mx.uint32) << 23
    # b = 0 is 2**-127, a float32 subnormal the exponent field cannot hold
    return mx.where(scale == 0, mx.array(2.0**-127, mx.float32), bits.view(mx.float32))


def dequantize_fp8(name: str, weight: mx.array, scale: mx.array, block: int) -> mx.array:
    """e4m3 bytes [R, C] times one scale per block x block tile -> float32 [R, C]."""
    rows, cols = weight.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    if tuple(scale.shape) != (nr, nc):
        raise CheckpointError(
            f"tensor {name}.scale has shape {tuple(scale.shape)}, but FP8 {name}.weight "
            f"{(rows, cols)} in {block}x{block} blocks needs {(nr, nc)}"
        )
    w = mx.from_fp8(weight, dtype=mx.float32)  # exact: e4m3 values are float32 values
    s = e8m0_to_float(scale)
    s = mx.repeat(mx.repeat(s, block, axis=0)[:rows], block, axis=1)[:, :cols]
    return w * s


def fp4_as_mxfp4(name: str, weight: mx.array, scale: mx.array) -> tuple[mx.array, mx.array]:
    """FP4 e2m1 int8 [R, C/2] + E8M0 [R, C/32] -> MLX mxfp4 (uint32 [R, C/8], uint8 scales)."""
    rows, half = weight.shape
    if half % 4 or tuple(scale.shape) != (rows, 2 * half // FP4_GROUP):
        raise CheckpointError(
            f"tensor {name}.scale has shape {tuple(scale.shape)}, but FP4 {name}.weight "
            f"{(rows, half)} (two values a byte) needs {(rows, 2 * half // FP4_GROUP)}"
        )
    if scale.dtype != mx.uint8:
        raise CheckpointError(f"tensor {name}.scale: FP4 scales must be E8M0 bytes")
    return weight.view(mx.uint8).view(mx.uint32), scale


def _decode(weights: dict[str, mx.array], block: int) -> dict[str, mx.array]:
    """FP8 -> float32; routed experts' FP4 -> mxfp4 `.weight` / `.scales`; FP4 elsewhere ->
    float32."""
    out = {}
    for name, value in weights.items():
        if not name.endswith(".scale"):
            if name not in out:
                out[name] = value
            continue
        base = name[: -len(".scale")]
        weight = weights.get(f"{base}.weight")
        if weight is None:
            raise CheckpointError(f"tensor {name} has no {base}.weight to scale")
        if weight.dtype == mx.uint8:
            out[f"{base}.weight"] = dequantize_fp8(base, weight, value, block)
        elif weight.dtype == mx.int8:
            packed, scales = fp4_as_mxfp4(base, weight, value)
            if _EXPERT.match(f"{base}.weight"):
                out[f"{base}.weight"], out[f"{base}.scales"] = packed, scales
            else:
                out[f"{base}.weight"] = mx.dequantize(
                    packed, scales, group_size=FP4_GROUP, bits=4, mode="mxfp4", dtype=mx.float32
                )
        else:
            raise CheckpointError(
                f"tensor {name} scales {base}.weight of dtype {weight.dtype}; expected FP8 "
                "(uint8) or packed FP4 (int8) weights"
            )
    return out


def sanitize(args: ModelArgs, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map either layout onto the model's parameters (see the module docstring)."""
    renamed: dict[str, mx.array] = {}
    for name, value in weights.items():
        key = canonical_name(name)
        if key in renamed:
            raise CheckpointError(f"tensor {name}: the checkpoint holds {key} twice")
        renamed[key] = value
    quant = args.quantization_config or {}
    block = FP8_BLOCK
    if isinstance(quant.get("weight_block_size"), list):
        block = int(quant["weight_block_size"][0])
    out = stack_experts(_decode(renamed, block), args.n_routed_experts, _EXPERT, _PROJ.get)
    for name in [k for k in out if k.endswith(".tid2eid")]:
        out[name] = out[name].astype(mx.int32)
    return out


def weight_bytes(weights: dict[str, mx.array], dtype: mx.Dtype) -> int:
    """Bytes the sanitized weights take once loaded: floats in `dtype`, the rest as stored."""
    total = 0
    for v in weights.values():
        total += v.size * dtype.size if mx.issubdtype(v.dtype, mx.floating) else v.nbytes
    return total
