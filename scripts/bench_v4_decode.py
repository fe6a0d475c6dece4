"""DeepSeek V4 decode time per token at growing context, on a small synthetic V4 shape.

    python scripts/bench_v4_decode.py [--contexts 512,2048,8192,16384] [--steps 16]

A random V4 model (a sliding, a compressed sparse, a heavily compressed and another sparse
layer; window 128, ratios 4 / 128, indexer top-64) is prefilled to each context, then decodes
`steps` tokens; it prints the median time per token, the rows one decode step attends to per
layer and the cache size. V4's decode reads the window and the indexer's top-k rows, so its
cost should stay nearly flat as the context grows (only the indexer's scores and the heavily
compressed rows grow, by 1/4 resp. 1/128 row per token).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.models import v4_attention
from mlx_deepseek.models.deepseek_v4 import Model, ModelArgs

SHAPE = {
    "model_type": "deepseek_v4",
    "vocab_size": 1024,
    "hidden_size": 512,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "head_dim": 128,
    "qk_rope_head_dim": 32,
    "q_lora_rank": 128,
    "num_experts_per_tok": 2,
    "n_routed_experts": 8,
    "o_groups": 2,
    "o_lora_rank": 128,
    "index_n_heads": 8,
    "index_head_dim": 64,
    "index_topk": 64,
    "sliding_window": 128,
    "hc_mult": 4,
    "num_hash_layers": 1,
    "num_nextn_predict_layers": 0,
    "compress_ratios": [0, 4, 128, 4],
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 4096},
}


def random_model(seed: int = 0) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(SHAPE))
    params = tree_map(
        lambda p: (
            mx.random.randint(0, 8, p.shape).astype(p.dtype)
            if p.dtype == mx.int32
            else mx.random.normal(p.shape) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.3)
        ),
        model.parameters(),
    )
    model.update(params)
    mx.eval(model.parameters())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="512,2048,8192,16384")
    parser.add_argument("--steps", type=int, default=16)
    opts = parser.parse_args()
    model = random_model()
    print(f"parameters: {sum(v.size for _, v in tree_flatten(model.parameters())):,}")
    rows: list[int] = []
    real = v4_attention.ops.shared_kv_attention

    def spy(q, kv, sinks, scale, mask=None):
        rows.append(kv.shape[1])
        return real(q, kv, sinks, scale, mask)

    v4_attention.ops.shared_kv_attention = spy
    caches, tokens = {}, {}
    for context in [int(c) for c in opts.contexts.split(",")]:
        cache = model.make_cache()
        tokens[context] = mx.random.randint(0, SHAPE["vocab_size"], (1, context + opts.steps + 1))
        for lo in range(0, context, 2048):
            model(tokens[context][:, lo : min(lo + 2048, context)], cache)
            mx.eval([c.state for c in cache])
        caches[context] = cache
    # decode steps of all contexts interleaved, so that a busy machine slows them alike
    times: dict[int, list[float]] = {c: [] for c in caches}
    attended: dict[int, list[int]] = {}
    for i in range(opts.steps + 1):
        for context, cache in caches.items():
            rows.clear()
            t0 = time.perf_counter()
            mx.eval(model(tokens[context][:, context + i : context + i + 1], cache))
            if i:  # the first step warms up
                times[context].append(time.perf_counter() - t0)
            attended[context] = list(rows)
    base = None
    for context, cache in caches.items():
        ms = statistics.median(times[context]) * 1e3
        base = base or ms
        print(
            f"context {context:6d}: {ms:7.2f} ms/token ({ms / base:.2f}x of the first), rows "
            f"attended per layer {attended[context]}, cache "
            f"{sum(c.nbytes for c in cache) / 1e6:.1f} MB"
        )


if __name__ == "__main__":
    main()
