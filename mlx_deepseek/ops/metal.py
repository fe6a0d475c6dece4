"""The "metal" back-end: MLX on a Mac's GPU, with the fused Metal kernels where they apply.

Each op asks its kernel family's planner (mlx_deepseek/kernels/) for a launch; a planner
raises Unsupported where its kernels do not apply (more than 8 tokens, other dtypes,
unquantized weights, an array mask, ...) and the op is MLX's. The first use of each variant
(the kernel's template arguments) is checked against MLX's result; on a compile error or a
mismatch that family is switched off with one warning and MLX's result is used.

Families: "moe" and "mlp" (kernels/moe.py), "router" (kernels/router.py), "norm", "latent"
and "embedding" (kernels/norm.py), "mla" (kernels/mla.py). MLX_DEEPSEEK_KERNELS selects them
when the back-end is resolved: unset or 1 = all, 0 = none, or a comma list ("moe,router").
Inside kernels.runtime.pretend_metal() no self-check runs (the graph is for inspection).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Hashable
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn

from ..kernels import mla as mla_kernels
from ..kernels import moe as moe_kernels
from ..kernels import norm as norm_kernels
from ..kernels import router as router_kernel
from ..kernels.runtime import Launch, Unsupported, pretending
from . import backend
from . import mlx as reference
from .mlx import expanded_attention  # noqa: F401  (MLX's own here: prefill)
from .types import CAUSAL, MLAHeads, Routing

log = logging.getLogger(__name__)

ENV_SWITCH = "MLX_DEEPSEEK_KERNELS"
FAMILIES = ("moe", "mlp", "router", "norm", "latent", "embedding", "mla")
# Self-check: max |kernel - reference| allowed, relative to max |reference|. The reference
# rounds its intermediates to the activation dtype; layout or indexing bugs give errors ~1.
SELF_CHECK_TOLERANCE = {mx.float32: 1e-3, mx.float16: 2e-2, mx.bfloat16: 6e-2}


class _State:
    on: frozenset[str] = frozenset(FAMILIES)  # chosen by MLX_DEEPSEEK_KERNELS at configure()
    disabled: set[str] = set()  # families switched off after a failed self-check
    checked: set[Hashable] = set()  # (family, variant) that passed it


def switched_on(value: str | None = None) -> frozenset[str]:
    """The families MLX_DEEPSEEK_KERNELS (or `value`) selects."""
    value = (os.environ.get(ENV_SWITCH, "1") if value is None else value).strip().lower()
    if value in ("", "1", "on", "all", "true", "yes"):
        return frozenset(FAMILIES)
    if value in ("0", "off", "none", "false", "no"):
        return frozenset()
    return frozenset(v.strip() for v in value.split(",")) & frozenset(FAMILIES)


def configure() -> None:
    """Read the switch (called when this back-end is resolved)."""
    _State.on = switched_on()


def enabled(family: str) -> bool:
    """Whether a family's kernels may run (switched on, not failed its self-check)."""
    return family in _State.on and family not in _State.disabled


def failed_families() -> list[str]:
    """The families switched off by a failed self-check in this process."""
    return sorted(_State.disabled)


def max_relative_error(got: list[mx.array], ref: list[mx.array]) -> tuple[float, float]:
    """(max |got - ref|, max |ref|) over all outputs, in float32."""
    err = scale = 0.0
    for g, r in zip(got, ref, strict=True):
        if g is None and r is None:
            continue
        g32, r32 = g.astype(mx.float32), r.astype(mx.float32)
        err = max(err, mx.max(mx.abs(g32 - r32)).item())
        scale = max(scale, mx.max(mx.abs(r32)).item())
    return err, scale


def _disable(family: str, message: str) -> None:
    _State.disabled.add(family)
    warnings.warn(message, RuntimeWarning, stacklevel=5)


def fused(family: str, plan: Callable[[], Launch], ref: Callable[[], tuple | list]) -> list:
    """The kernels' outputs for this call, or the reference's where they do not apply or
    fail. The first use of each variant is checked against ref()."""
    if not enabled(family):
        return list(ref())
    try:
        launch = plan()
    except Unsupported as e:
        log.debug("%s kernels not used: %s", family, e)
        return list(ref())
    key = (family, launch.variant)
    if pretending() or key in _State.checked:
        return launch.run()
    name = f"fused {family} Metal kernels"
    try:
        got = launch.run()
        with backend.use("mlx"):  # MLX's maths all the way down (a nested op too)
            expected = list(ref())
        err, scale = (launch.compare or max_relative_error)(got, expected)
    except Exception as e:  # a compile error surfaces here, at evaluation
        _disable(family, f"mlx-deepseek: the {name} failed ({type(e).__name__}: {e}); using MLX's")
        return list(ref())
    tolerance = SELF_CHECK_TOLERANCE.get(launch.dtype, 1e-3) * scale + 1e-6
    if not err <= tolerance:  # also catches NaN
        _disable(
            family,
            f"mlx-deepseek: the {name} disagree with MLX's reference (max error {err:.3g}, "
            f"tolerance {tolerance:.3g}, {launch.variant}); using MLX's",
        )
        return expected
    _State.checked.add(key)
    return got


# ---- the ops ---------------------------------------------------------------------------------


def add_rms_norm(
    x: mx.array, r: mx.array | None, norm: nn.Module, float32_copy: bool = False
) -> tuple[mx.array, ...]:
    if r is None:
        return reference.add_rms_norm(x, r, norm, float32_copy)
    return tuple(
        fused(
            "norm",
            lambda: norm_kernels.add_rms_norm(x, r, norm, float32_copy),
            lambda: reference.add_rms_norm(x, r, norm, float32_copy),
        )
    )


def embed(
    embedding: nn.Module, tokens: mx.array, norm: nn.Module | None = None
) -> tuple[mx.array, mx.array | None]:
    h, n = fused(
        "embedding",
        lambda: norm_kernels.quantized_embedding(embedding, tokens, norm),
        lambda: reference.embed(embedding, tokens, norm),
    )
    return h, n


def latent(kv, norm, rope, offset, q_a=None, q_norm=None) -> tuple:
    c_kv, k_pe, qn = fused(
        "latent",
        lambda: norm_kernels.latent_norm_rope(kv, norm, rope, offset, q_a, q_norm),
        lambda: reference.latent(kv, norm, rope, offset, q_a, q_norm),
    )
    return c_kv, k_pe, qn


def absorbed_attention(q: mx.array, c_kv, k_pe, mla: MLAHeads, mask, offset) -> mx.array:
    def plan() -> Launch:
        causal = (mask is None and q.shape[1] == 1) or (isinstance(mask, str) and mask == CAUSAL)
        if not causal:
            raise Unsupported("not the causal mask (the kernels imply it)")
        if reference.is_quantized(c_kv) or reference.is_quantized(k_pe):
            raise Unsupported("a quantized latent cache (MLX's quantized matmuls read it)")
        return mla_kernels.absorbed_attention(
            q, c_kv, k_pe, mla.embed_q, mla.unembed_out, mla.rope, mla.nope, mla.v_dim,
            mla.scale, offset,
        )  # fmt: skip

    (out,) = fused(
        "mla", plan, lambda: [reference.absorbed_attention(q, c_kv, k_pe, mla, mask, offset)]
    )
    return out


def route(logits: mx.array, bias: mx.array | None, routing: Routing) -> tuple[mx.array, mx.array]:
    inds, weights = fused(
        "router",
        lambda: router_kernel.route(logits, bias, **asdict(routing)),
        lambda: reference.route(logits, bias, routing),
    )
    return inds, weights


def _two_kernel_op(family: str, plan: Callable[..., moe_kernels.Plan], ref: Callable) -> Callable:
    """An op computed by the two MoE kernels where `plan` takes its arguments, else by `ref`
    (positional arguments, as ops/__init__ passes them)."""

    def op(*args) -> mx.array:
        (y,) = fused(family, lambda: plan(*args).as_launch(), lambda: [ref(*args)])
        return y

    op.__name__ = op.__qualname__ = ref.__name__
    return op


# ops.mlp(x, layer) and ops.moe(x, inds, weights, experts, shared, swiglu_limit)
mlp = _two_kernel_op("mlp", moe_kernels.plan_mlp, reference.mlp)
moe = _two_kernel_op("moe", moe_kernels.plan_moe, reference.moe)


def prepare(model: nn.Module) -> int:
    """Nothing to change in the model for the GPU."""
    return 0
