"""The MoE router after its matmul as one Metal kernel (family "router", router.metal).

ops.route() is a dozen MLX primitives even compiled (softmax or sigmoid, the group scores,
argpartitions, scatter, gather, the normalisation); the kernel does all of it for each token
in one threadgroup: E <= 1024 experts, any top-k, greedy / group_limited_greedy / noaux_tc.
Its indices come highest score first; ops.route()'s come in argpartition's order: the set and
the weight of each index are what must agree.
"""

from __future__ import annotations

import mlx.core as mx

from .runtime import (
    KernelSpec,
    Launch,
    Unsupported,
    header,
    launch,
    source,
    token_count,
)

METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}
SCORINGS = {"softmax": 0, "sigmoid": 1}
MAX_EXPERTS = 1024


def route_spec(
    n_tokens: int,
    n_experts: int,
    *,
    top_k: int,
    topk_method: str,
    scoring_func: str,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    has_bias: bool,
) -> KernelSpec:
    """The launch for n_tokens tokens' logits [n_tokens, n_experts] float32."""
    grouped = topk_method != "greedy" and n_group > 1
    nth = min(MAX_EXPERTS, 32 * -(-n_experts // 32))
    template = (
        ("E", n_experts),
        ("TOPK", top_k),
        ("NG", n_group if grouped else 1),
        ("TG", topk_group if grouped else 1),
        ("METHOD", METHODS[topk_method]),
        ("SCORING", SCORINGS[scoring_func]),
        ("NORM", bool(norm_topk_prob)),
        ("HAS_BIAS", has_bias),
        ("NTH", nth),
    )
    return KernelSpec(
        name="mdsk_router",
        input_names=("logits", "bias", "rsf"),
        output_names=("inds", "w"),
        source=source("router.metal"),
        header=header("moe_common.h", "fused_common.h"),
        grid=(nth, n_tokens, 1),
        threadgroup=(nth, 1, 1),
        template=template,
        output_shapes=((n_tokens, top_k), (n_tokens, top_k)),
        output_dtypes=(mx.uint32, mx.float32),
    )


def dense_weights(inds: mx.array, weights: mx.array, n_experts: int) -> mx.array:
    """[..., k] indices and weights -> [..., E] with each weight at its expert (0 elsewhere):
    the routing as a matrix, independent of the order of the k indices."""
    onehot = mx.expand_dims(inds.astype(mx.int32), -1) == mx.arange(n_experts)
    return (onehot * mx.expand_dims(weights, -1)).sum(axis=-2)


def _compare(got: list[mx.array], ref: list[mx.array]) -> tuple[float, float]:
    n_experts = int(max(mx.max(got[0]).item(), mx.max(ref[0]).item())) + 1
    a = dense_weights(got[0], got[1], n_experts)
    b = dense_weights(ref[0], ref[1], n_experts)
    return mx.max(mx.abs(a - b)).item(), mx.max(mx.abs(b)).item()


def route(logits: mx.array, bias: mx.array | None, **config) -> Launch:
    """(inds uint32 [..., k], weights float32 [..., k]) of the routing `config` describes
    (ops.Routing's fields) for float32 logits [..., E], from one kernel."""
    n, E = token_count(logits), logits.shape[-1]
    if logits.dtype != mx.float32 or E > MAX_EXPERTS:
        raise Unsupported(f"router logits {logits.dtype} with {E} experts")
    if bias is not None and (bias.dtype != mx.float32 or bias.shape != (E,)):
        raise Unsupported(f"router bias {bias.dtype} {bias.shape}")
    k, method = config["top_k"], config["topk_method"]
    groups, keep = config["n_group"], config["topk_group"]
    if method not in METHODS or config["scoring_func"] not in SCORINGS or not 1 <= k <= E:
        raise Unsupported(f"routing {method} / {config['scoring_func']} / top-{k}")
    if method != "greedy" and groups > 1 and (E % groups or not 1 <= keep <= groups):
        raise Unsupported(f"{E} experts in {groups} groups, keeping {keep}")
    if method != "greedy" and groups > 1 and keep * (E // groups) < k:
        raise Unsupported(f"top-{k} of {keep} groups of {E // groups}")
    spec = route_spec(
        n,
        E,
        top_k=k,
        topk_method=method,
        scoring_func=config["scoring_func"],
        n_group=groups,
        topk_group=keep,
        norm_topk_prob=config["norm_topk_prob"],
        has_bias=bias is not None,
    )
    scale = mx.array([config["routed_scaling_factor"]], dtype=mx.float32)
    inputs = [logits.reshape(n, E), bias if bias is not None else scale, scale]
    lead = logits.shape[:-1]

    def run() -> list[mx.array]:
        inds, weights = launch(spec, inputs)
        return [inds.reshape(*lead, k), weights.reshape(*lead, k)]

    return Launch(("router", spec.template, n), run, mx.float32, _compare)
