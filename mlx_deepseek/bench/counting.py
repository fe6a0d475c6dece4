"""Counting the MLX primitives one decode step evaluates (a proxy for GPU dispatches).

The counting rule, applied identically to every runtime:

1. Build one decode step's graph lazily (nothing evaluated) and export it with
   `mx.export_to_dot`; every rectangle in the DOT output is one primitive node. Arrays
   already evaluated (weights, the cache before the step) are leaves and not counted.
2. Count every node except pure views and no-ops (VIEWS below: reshapes, transposes,
   slices, broadcasts, splits, ...): MLX runs those without a kernel. A `Compiled...` node
   (an `mx.compile` fusion) counts once: it is one kernel.
3. "Metal-equivalent": on a CPU, MLX expands its fast ops (`mx.fast.rms_norm`,
   `layer_norm`, `rope`, `scaled_dot_product_attention`) and `mx.dequantize` into a dozen
   primitives each, where Metal runs one kernel (a dequantize is one `fast::Quantize`
   primitive on the GPU). With `metal_equivalent=True` each such call is stood in by ONE
   placeholder node of the same output shape, and SDPA only when MLX's Metal back-end
   (0.32.x) has a fused kernel for its shapes (otherwise Metal expands it too, and so do
   we). mlx-deepseek's custom Metal kernels, which cannot run without Metal (a call
   raises at once), are switched on as on a Mac (the "metal" back-end inside
   `kernels.pretend_metal`) and each launch
   is stood in by ONE placeholder node with the kernel's output shapes: "Fused<kernel>".
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import mlx.core as mx

from mlx_deepseek import ops
from mlx_deepseek.kernels import runtime as kernels
from mlx_deepseek.kernels.runtime import KernelSpec

VIEWS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Slice",
        "Broadcast",
        "BroadcastAxes",
        "ExpandDims",
        "Squeeze",
        "AsStrided",
        "Split",
        "StopGradient",
        "Depends",
        "Flatten",
        "Unflatten",
        "Identity",
    }
)
PLACEHOLDER_PREFIX = "fused_"

_NODE = re.compile(r'^\{ (\d+) \[label ="([^"]+)", shape=rectangle\]; \}$')
_EDGE = re.compile(r"^(\S+) -> (\S+)$")

# placeholders made while counting: name -> array (named in the DOT export)
_placeholders: dict[str, mx.array] | None = None


@dataclass
class PrimitiveCount:
    total: int  # counted primitives (views excluded)
    by_name: dict[str, int]  # counted primitives by name, placeholders as "Fused<kind>"
    views: int  # excluded view / no-op nodes

    def as_dict(self) -> dict:
        return {"total": self.total, "views_excluded": self.views, "by_primitive": self.by_name}


def count_primitives(outputs: Sequence[mx.array], named: dict[str, mx.array] | None = None):
    """Count the unevaluated graph behind `outputs` by the rule in this module's docstring."""
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs, **(named or {}))
    return count_dot(buf.getvalue())


def count_dot(dot: str) -> PrimitiveCount:
    labels: dict[str, str] = {}
    produces: dict[str, list[str]] = {}
    for line in dot.splitlines():
        line = line.strip()
        m = _NODE.match(line)
        if m:
            labels[m.group(1)] = m.group(2)
            continue
        m = _EDGE.match(line)
        if m and m.group(1) in labels:  # primitive -> its output array
            produces.setdefault(m.group(1), []).append(m.group(2).strip('"'))
    counted: Counter[str] = Counter()
    views = 0
    for node, label in labels.items():
        fused = [o for o in produces.get(node, []) if o.startswith(PLACEHOLDER_PREFIX)]
        if fused:
            kind = fused[0][len(PLACEHOLDER_PREFIX) :].rsplit("_", 1)[0]
            counted[f"Fused{kind}"] += 1
        elif label in VIEWS:
            views += 1
        else:
            counted[label] += 1
    return PrimitiveCount(sum(counted.values()), dict(counted.most_common()), views)


def placeholder(kind: str, shape: Sequence[int], dtype: mx.Dtype, inputs: Sequence) -> mx.array:
    """One graph node of `shape`/`dtype` depending on `inputs`, counted as 'Fused<kind>'.

    For counting only (its values are zeros); valid inside `counting()`.
    """
    return placeholders(kind, [shape], [dtype], inputs)[0]


def placeholders(
    kind: str, shapes: Sequence[Sequence[int]], dtypes: Sequence[mx.Dtype], inputs: Sequence
) -> list[mx.array]:
    """ONE graph node with an output per shape/dtype (a kernel with several outputs),
    depending on `inputs`, counted once as 'Fused<kind>'. Valid inside `counting()`."""
    if _placeholders is None:
        raise RuntimeError("placeholder() is only for graphs built inside counting()")
    leaves = [mx.zeros(tuple(s), dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
    mx.eval(leaves)
    deps = [x for x in inputs if isinstance(x, mx.array)]
    outs = mx.depends(leaves, deps) if deps else leaves
    for out in outs:
        _placeholders[f"{PLACEHOLDER_PREFIX}{kind}_{len(_placeholders)}"] = out
    return list(outs)


def _kernel_placeholders(spec: KernelSpec, inputs: Sequence[mx.array]) -> list[mx.array]:
    """A custom kernel launch as one placeholder node ('Fused<kernel name>')."""
    kind = spec.name.removeprefix("mdsk_")
    return placeholders(kind, spec.output_shapes, spec.output_dtypes, inputs)


def metal_sdpa_fused(q: mx.array, k: mx.array, v: mx.array, mask) -> bool:
    """Whether MLX 0.32's Metal back-end runs this SDPA call as a fused kernel (inference)."""
    lq, lk = q.shape[2], k.shape[2]
    dq, dv = q.shape[-1], v.shape[-1]
    gqa = q.shape[1] // k.shape[1]
    vector_dims = (dq == dv and dq in (64, 96, 128, 256)) or (dq == 192 and dv == 128)
    full_dims = dq == dv and dq in (64, 72, 80, 96, 128)
    array_mask = isinstance(mask, mx.array)
    causal = isinstance(mask, str) and mask == "causal"
    full_mask_ok = mask is None or array_mask or (lq <= lk and causal)
    full = lq > 8 and full_mask_ok and full_dims
    vector = lq <= 8 and lq <= lk and vector_dims and lq * gqa <= 32
    return full or vector


@contextmanager
def counting(
    metal_equivalent: bool = True, backend: str = "metal"
) -> Iterator[dict[str, mx.array]]:
    """Build graphs for counting: yields the placeholder table to pass as `named`.

    With metal_equivalent, mx.fast ops that Metal fuses become one placeholder each, and the
    model's ops run on `backend`: "metal" (mlx-deepseek's custom kernels as on a Mac) or
    "mlx" (the reference path: MLX ops only). Graphs built inside must never be evaluated
    (placeholders hold zeros).
    """
    global _placeholders
    if _placeholders is not None:
        raise RuntimeError("counting() does not nest")
    _placeholders = {}
    saved: dict[str, Callable] = {}
    pretend = ExitStack()
    if metal_equivalent:
        pretend.enter_context(kernels.pretend_metal(_kernel_placeholders))
        pretend.enter_context(ops.use(backend))
        saved = {n: getattr(mx.fast, n) for n in ("rms_norm", "layer_norm", "rope")}
        saved["scaled_dot_product_attention"] = mx.fast.scaled_dot_product_attention
        sdpa = saved["scaled_dot_product_attention"]

        def rms_norm(x, weight, eps, **kw):
            return placeholder("RMSNorm", x.shape, x.dtype, [x, weight])

        def layer_norm(x, weight, bias, eps, **kw):
            return placeholder("LayerNorm", x.shape, x.dtype, [x, weight, bias])

        def rope(x, dims, *args, **kw):
            offset = kw.get("offset")
            return placeholder("RoPE", x.shape, x.dtype, [x, offset, kw.get("freqs")])

        def attention(q, k, v, *args, scale, mask=None, **kw):
            if not metal_sdpa_fused(q, k, v, mask):
                return sdpa(q, k, v, *args, scale=scale, mask=mask, **kw)
            shape = (*q.shape[:-1], v.shape[-1])
            return placeholder("SDPA", shape, q.dtype, [q, k, v, mask, kw.get("sinks")])

        def dequantize(w, scales, biases=None, group_size=None, bits=None, mode="affine", **kw):
            dtype = kw.get("dtype") or scales.dtype
            if mode != "affine" or biases is None:
                return saved_dequantize(w, scales, biases, group_size, bits, mode, **kw)
            shape = (*w.shape[:-1], w.shape[-1] * 32 // (bits or 4))
            return placeholder("Dequantize", shape, dtype, [w, scales, biases])

        saved_dequantize = mx.dequantize
        mx.fast.rms_norm = rms_norm
        mx.fast.layer_norm = layer_norm
        mx.fast.rope = rope
        mx.fast.scaled_dot_product_attention = attention
        mx.dequantize = dequantize
    try:
        with pretend:
            yield _placeholders
    finally:
        for n, f in saved.items():
            setattr(mx.fast, n, f)
        if metal_equivalent:
            mx.dequantize = saved_dequantize
        _placeholders = None


def count_step(
    step: Callable[[], Sequence[mx.array]], metal_equivalent: bool = True, backend: str = "metal"
):
    """Count the primitives of the graph `step()` builds (it must not evaluate anything)."""
    with counting(metal_equivalent, backend) as named:
        outputs = step()
        return count_primitives(outputs, named)
