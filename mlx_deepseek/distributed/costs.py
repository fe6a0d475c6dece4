"""What a split costs per decoded token: bytes on the wire, collectives, and a tok/s model.

Bytes per token follow the collectives the split models issue (pipeline.py, tensor.py) and
count what comm.py counts; the tests check the formulas against a real run's counts (and the
kernel's TCP byte counters). The time model is the usual one for decode on Apple Silicon:

    time per token = bytes of weights read / (memory bandwidth x EFFICIENCY)  (per rank)
                   + for each collective: steps x (link latency + bytes per step / link bandwidth)

- pipeline: the ranks run one after another, so a token costs all the weights read at one
  machine's speed plus N-1 hops and the logits' broadcast: it lets a model fit, it does not
  decode faster;
- tensor: each rank reads its share, but the step waits for the busiest rank: the expected
  largest number of a token's k experts that land on one rank (exact, from the multinomial);
  and every layer costs two all_sums (2(N-1) ring steps each), which is latency-bound.
EFFICIENCY is fitted to one anchor (V3 4-bit on one M3 Ultra decodes ~20 tok/s with mlx-lm
and llama.cpp, 51% of 819 GB/s) and checked against exo's published cluster numbers in
scripts/predict_distributed.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..models.config import ModelArgs

EFFICIENCY = 0.51  # fraction of memory bandwidth DeepSeek MoE decode reaches (see above)
USABLE_MEMORY = 0.75  # of a Mac's RAM, what the GPU may wire (macOS' recommended working set)


@dataclass(frozen=True)
class Link:
    name: str
    latency: float  # seconds per ring step (a send + receive between neighbours)
    bandwidth: float  # bytes per second, one direction


@dataclass(frozen=True)
class Machine:
    name: str
    bandwidth: float  # memory bandwidth, bytes/s
    memory: float  # bytes of unified memory


LINKS = {
    # RDMA over Thunderbolt 5 (JACCL, macOS 26.2+): ~50-60 Gb/s, single-digit us latency
    "tb5-rdma": Link("Thunderbolt 5, RDMA (JACCL)", 8e-6, 6.0e9),
    # TCP over a Thunderbolt 5 bridge (the ring backend): ~300 us per all_sum of two ranks
    "tb5-tcp": Link("Thunderbolt 5, TCP (ring)", 150e-6, 2.5e9),
    "10gbe": Link("10 GbE, TCP (ring)", 150e-6, 1.1e9),
}
MACHINES = {
    "m3-ultra-512": Machine("M3 Ultra 512 GB", 819e9, 512e9),
    "m4-max-128": Machine("M4 Max 128 GB", 546e9, 128e9),
    "m4-pro-64": Machine("M4 Pro 64 GB", 273e9, 64e9),
}


@dataclass(frozen=True)
class Shape:
    """What the cost model needs of a model (parameter counts per part, widths)."""

    name: str
    hidden: int
    layers: int
    moe_layers: int
    vocab: int
    experts: int
    top_k: int
    shared: int  # shared experts (as routed-expert units)
    expert_params: int  # one routed expert's parameters
    attention_params: int  # per layer, read every token (all heads)
    replicated_params: int  # per layer, held whole by every tensor rank (latent, router)
    dense_params: int  # per dense layer's MLP
    cache_width: int  # latent cache values per token and layer
    residual: int = 2  # hidden-size vectors a pipeline stage sends on: (h, m); V4's mHC: 4

    @property
    def total_params(self) -> int:
        moe = self.moe_layers * (self.experts + self.shared) * self.expert_params
        dense = (self.layers - self.moe_layers) * self.dense_params
        return self.layers * self.attention_params + moe + dense + 2 * self.vocab * self.hidden

    @property
    def active_params(self) -> int:
        """Read per decoded token: attention, k + shared experts, dense MLPs, the head."""
        moe = self.moe_layers * (self.top_k + self.shared) * self.expert_params
        dense = (self.layers - self.moe_layers) * self.dense_params
        return self.layers * self.attention_params + moe + dense + self.vocab * self.hidden

    @classmethod
    def from_args(cls, args: Any, name: str = "") -> Shape:
        """A model from its config: MLA (V2 / V3 / Kimi K2) or DeepSeek V4."""
        if hasattr(args, "hc_mult"):
            return cls.from_v4_args(args, name)
        D, H = args.hidden_size, args.num_attention_heads
        q = D * H * args.qk_head_dim if args.q_lora_rank is None else (
            D * args.q_lora_rank + args.q_lora_rank * H * args.qk_head_dim
        )  # fmt: skip
        kv_a = D * (args.kv_lora_rank + args.qk_rope_head_dim)
        kv_b = args.kv_lora_rank * H * (args.qk_nope_head_dim + args.v_head_dim)
        o = H * args.v_head_dim * D
        E = args.n_routed_experts or 0
        moe_layers = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
        return cls(
            name=name or args.model_type,
            hidden=D,
            layers=args.num_hidden_layers,
            moe_layers=moe_layers,
            vocab=args.vocab_size,
            experts=E,
            top_k=args.num_experts_per_tok or 0,
            shared=args.n_shared_experts or 0,
            expert_params=3 * D * args.moe_intermediate_size,
            attention_params=q + kv_a + kv_b + o,
            replicated_params=(D * (args.q_lora_rank or 0)) + kv_a + E * D,
            dense_params=3 * D * args.intermediate_size,
            cache_width=args.kv_lora_rank + args.qk_rope_head_dim,
        )

    @classmethod
    def from_v4_args(cls, args: Any, name: str = "") -> Shape:
        """DeepSeek V4: attention per layer averaged over the layer kinds (window only,
        compressed, compressed + indexer); hc_mult residual copies cross a pipeline stage."""
        D, H, hd, q = args.hidden_size, args.num_attention_heads, args.head_dim, args.q_lora_rank
        layers = args.num_hidden_layers
        shared = D * q + D * hd  # wq_a, wkv: whole on every tensor rank
        per_head = q * hd + hd * args.o_lora_rank  # wq_b rows, wo_a columns of one head
        attention = 0
        for i in range(layers):
            attention += shared + H * per_head + args.o_groups * args.o_lora_rank * D
            if args.compress_ratio(i):
                overlap = 1 + (args.layer_type(i) == "compressed_sparse_attention")
                attention += 2 * D * overlap * hd
            if args.layer_type(i) == "compressed_sparse_attention":
                ih, ihd = args.index_n_heads, args.index_head_dim
                attention += q * ih * ihd + D * ih + 2 * D * 2 * ihd
        E = args.n_routed_experts
        return cls(
            name=name or args.model_type,
            hidden=D,
            layers=layers,
            moe_layers=layers,
            vocab=args.vocab_size,
            experts=E,
            top_k=args.num_experts_per_tok,
            shared=args.n_shared_experts,
            expert_params=3 * D * args.moe_intermediate_size,
            attention_params=attention // layers,
            replicated_params=shared + E * D,
            dense_params=0,
            cache_width=round(args.cache_values_per_token() / layers),
            residual=args.hc_mult,
        )


def _mla_shape(name: str, **config) -> Shape:
    return Shape.from_args(ModelArgs(**config), name)


def _v4_shape(name: str, hidden, layers, vocab, experts, top_k, moe_inter, active, width) -> Shape:
    """DeepSeek V4 (not MLA): experts exact; attention per layer from the published active
    parameters (what is left after the experts and the head), replicated ~ its latent; four
    residual streams (mHC, hc_mult 4) cross a pipeline stage."""
    expert = 3 * hidden * moe_inter
    attention = (active - layers * (top_k + 1) * expert - vocab * hidden) // layers
    return Shape(name, hidden, layers, layers, vocab, experts, top_k, 1, expert, attention,
                 hidden * 1536 + experts * hidden, 0, width, residual=4)  # fmt: skip


SHAPES = {
    "v3": _mla_shape(
        "DeepSeek V3 / R1 (671B)", model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
        q_lora_rank=1536, kv_lora_rank=512, first_k_dense_replace=3,
    ),
    "kimi-k2": _mla_shape(
        "Kimi K2 (1T)", model_type="deepseek_v3", vocab_size=163840, hidden_size=7168,
        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=64, n_routed_experts=384, num_experts_per_tok=8, n_shared_experts=1,
        q_lora_rank=1536, kv_lora_rank=512, first_k_dense_replace=1,
    ),
    # families-2026.md: Flash 284B / 13B active, Pro 1.6T / 49B active
    "v4-flash": _v4_shape("DeepSeek V4-Flash (284B)", 4096, 43, 129280, 256, 6, 2048, 13.0e9, 80),
    "v4-pro": _v4_shape("DeepSeek V4-Pro (1.6T)", 7168, 61, 129280, 384, 6, 3072, 49.0e9, 80),
}  # fmt: skip


def bytes_per_param(bits: int, group_size: int = 64) -> float:
    """Affine quantization: the packed weight plus a float16 scale and bias per group (16 or
    more bits: unquantized)."""
    return bits / 8 if bits >= 16 else bits / 8 + 4 / group_size


# ---- traffic ---------------------------------------------------------------------------------


def step_bytes(shape: Shape, n: int, kind: str, itemsize: int = 2) -> list[int]:
    """Bytes each rank sends for one decoded token (one row), as comm.py counts them."""
    D, V = shape.hidden, shape.vocab
    if kind == "pipeline":
        logits = 2 * (n - 1) * V * itemsize // n
        return [shape.residual * D * itemsize + logits] * (n - 1) + [logits]
    reduce = 2 * (n - 1) * D * itemsize // n
    width = math.ceil(V / n)
    return [(2 * shape.layers + 1) * reduce + (n - 1) * width * itemsize] * n


def collectives(shape: Shape, n: int, kind: str) -> int:
    """Collectives per decoded token (a pipeline's hops count one each)."""
    return n if kind == "pipeline" else 2 * shape.layers + 2


# ---- time ------------------------------------------------------------------------------------


@cache
def expected_max_share(k: int, n: int) -> float:
    """E[max over n ranks of how many of k uniformly routed experts land on a rank]."""
    total = 0.0

    def walk(left: int, ranks: int, probability: float, largest: int) -> None:
        nonlocal total
        if ranks == 1:
            total += probability * max(largest, left)
            return
        for c in range(left + 1):
            p = math.comb(left, c) * (1 / ranks) ** c * (1 - 1 / ranks) ** (left - c)
            walk(left - c, ranks - 1, probability * p, max(largest, c))

    walk(k, n, 1.0, 0)
    return total


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float
    compute_s: float  # per token: reading weights (and cache)
    comm_s: float  # per token: the collectives
    rank_bytes: float  # weights each rank holds
    fits: bool


def predict(
    shape: Shape,
    bits: int,
    machine: Machine,
    n: int,
    kind: str,
    link: Link,
    context: int = 4096,
    itemsize: int = 2,
) -> Prediction:
    """Decode tok/s of one stream on n identical machines."""
    b = bytes_per_param(bits)
    speed = machine.bandwidth * EFFICIENCY
    cache = context * shape.layers * shape.cache_width * itemsize
    D, V = shape.hidden, shape.vocab
    if kind == "pipeline" or n == 1:
        compute = (shape.active_params * b + cache) / speed
        hops = (n - 1) * (link.latency + shape.residual * D * itemsize / link.bandwidth)
        logits = 2 * (n - 1) * (link.latency + V * itemsize / n / link.bandwidth) if n > 1 else 0
        held = shape.total_params * b / n
        return _done(compute, hops + logits, held, machine)
    routed = shape.moe_layers * shape.expert_params * expected_max_share(shape.top_k, n)
    shared = shape.moe_layers * shape.shared * shape.expert_params / n
    dense = (shape.layers - shape.moe_layers) * shape.dense_params / n
    split_attention = shape.attention_params - shape.replicated_params
    attention = shape.layers * (split_attention / n + shape.replicated_params)
    head = V * D / n
    compute = ((routed + shared + dense + attention + head) * b + cache) / speed
    reduce = 2 * (n - 1) * (link.latency + D * itemsize / n / link.bandwidth)
    gather = (n - 1) * (link.latency + V * itemsize / n / link.bandwidth)
    comm = (2 * shape.layers + 1) * reduce + gather
    held = shape.total_params * b / n + shape.layers * shape.replicated_params * b
    return _done(compute, comm, held, machine)


def _done(compute: float, comm: float, held: float, machine: Machine) -> Prediction:
    fits = held <= machine.memory * USABLE_MEMORY
    return Prediction(1 / (compute + comm), compute, comm, held, fits)


def predict_split(args: ModelArgs, total_bytes: int, n: int, kind: str, link: Link) -> Prediction:
    """The model's prediction for a loaded checkpoint (`auto` compares the two kinds)."""
    shape = Shape.from_args(args)
    bits = max(2, round(8 * total_bytes / max(shape.total_params, 1)))
    return predict(shape, min(bits, 16), MACHINES["m3-ultra-512"], n, kind, link)
