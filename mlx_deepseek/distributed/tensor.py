"""Tensor and expert parallelism: every rank runs every layer on its share of the work.

`shard_model` swaps the model's modules, before the weights are read, for ones that hold
this rank's share (the plan's ranges) and end with the collective that makes their output
whole again, so the model's own code (DeepseekModel, Model, the MTP module) runs unchanged:

- attention: this rank's heads (q_b_proj / q_proj rows, W_uk / W_uv, o_proj columns); the
  latent projections, their norms and so the latent cache are whole on every rank; o_proj's
  partial sums are added across ranks (one all_sum);
- MoE: the router whole (every rank routes every token the same way), this rank's routed
  experts (a contiguous range; the others' slots get weight 0), a share of the shared
  experts' hidden units; routed and shared results are added across ranks in one all_sum;
- dense MLPs: a share of the hidden units, one all_sum;
- embedding and LM head: this rank's vocabulary rows; the lookup adds the rows across ranks,
  the head gathers every rank's logits.
So a layer costs two all_sums (after attention, after the MLP) of [B, L, hidden].
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.switch_layers import SwitchGLU

from .. import ops
from ..models.config import ModelArgs
from ..models.deepseek_v3 import Model
from ..models.deepseek_v4 import MoE as V4MoE
from ..models.mla import MLAttention
from ..models.moe import MLP, MoE, MoEGate
from ..models.v4_attention import V4Attention
from . import comm
from .plan import Plan, Range


class ShardedAttention(MLAttention):
    """MLA over heads [a, b): the output is o_proj's partial sum, added across ranks."""

    def __init__(self, args: ModelArgs, heads: Range, with_bias: bool):
        super().__init__(args)
        H = heads[1] - heads[0]
        D, qk = args.hidden_size, args.qk_head_dim
        self.num_heads = H
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * qk, bias=False)
        self.embed_q = MultiLinear(args.qk_nope_head_dim, self.rank, H)
        self.unembed_out = MultiLinear(self.rank, args.v_head_dim, H)
        # the output bias is added once: by rank 0's share
        self.o_proj = nn.Linear(H * args.v_head_dim, D, bias=args.attention_bias and with_bias)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        return comm.all_sum(super().__call__(x, mask, cache))


class ExpertParallelMoE(MoE):
    """The MoE block with routed experts [a, b) and a share of the shared experts."""

    def __init__(self, args: ModelArgs, experts: Range, shared: Range | None):
        nn.Module.__init__(self)
        self.gate = MoEGate(args)
        self.first_expert, self.num_local = experts[0], experts[1] - experts[0]
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, self.num_local)
        if shared is not None and shared[1] > shared[0]:
            self.shared_experts = MLP(args.hidden_size, shared[1] - shared[0])

    def __call__(self, x: mx.array, x32: mx.array | None = None) -> mx.array:
        inds, weights = self.gate(x, x32)  # [..., k]: the same on every rank
        local = inds.astype(mx.int32) - self.first_expert
        mine = (local >= 0) & (local < self.num_local)
        # another rank's slot: weight 0 on a local expert (static shapes, no host sync)
        local = mx.where(mine, local, 0)
        weights = mx.where(mine, weights, mx.zeros_like(weights))
        y = ops.moe(x, local, weights, self.switch_mlp, self.get("shared_experts"))
        return comm.all_sum(y)


class ShardedMLP(MLP):
    """A dense SwiGLU MLP over a share of its hidden units; partial sums added across ranks."""

    def __call__(self, x: mx.array) -> mx.array:
        return comm.all_sum(ops.mlp(x, self))


class NoMLP(nn.Module):
    """A rank's share of a dense MLP too small to cut (rank 0 runs it whole): zeros, added."""

    def __call__(self, x: mx.array) -> mx.array:
        return comm.all_sum(mx.zeros_like(x))


def _gather_vocab(local: mx.array, vocab: tuple[Range, ...]) -> mx.array:
    """Each rank's logits [..., V_r] -> the whole [..., V] on every rank (all_gather along a
    leading axis; ranges padded to the longest)."""
    width = max(b - a for a, b in vocab)
    lead = local.shape[:-1]
    x = local.reshape(-1, local.shape[-1])
    if x.shape[-1] < width:
        x = mx.pad(x, [(0, 0), (0, width - x.shape[-1])])
    allv = comm.all_gather(x.T)  # [N * width, T]
    if any(b - a != width for a, b in vocab):
        keep = [r * width + i for r, (a, b) in enumerate(vocab) for i in range(b - a)]
        allv = allv[mx.array(keep)]
    return allv.T.reshape(*lead, -1)


class VocabParallelEmbedding(nn.Module):
    """Rows [a, b) of an embedding (`shard`); a lookup is whole on every rank (each adds the
    rows it holds, zeros elsewhere). Not an nn.Embedding, so no fused kernel reads its rows
    as if they were the whole table."""

    def __init__(self, shard: nn.Module, rows: Range, vocab: tuple[Range, ...]):
        super().__init__()
        self.shard = shard
        self.start, self.stop = rows
        self.vocab = vocab

    def __call__(self, tokens: mx.array) -> mx.array:
        local = tokens.astype(mx.int32) - self.start
        mine = (local >= 0) & (local < self.stop - self.start)
        e = self.shard(mx.where(mine, local, 0))
        return comm.all_sum(mx.where(mine[..., None], e, mx.zeros_like(e)))

    def as_linear(self, x: mx.array) -> mx.array:
        """A tied LM head: [..., D] -> logits [..., V]."""
        return _gather_vocab(self.shard.as_linear(x), self.vocab)


class VocabParallelHead(nn.Module):
    """Rows [a, b) of the LM head (`shard`); the logits are whole on every rank."""

    def __init__(self, shard: nn.Module, vocab: tuple[Range, ...]):
        super().__init__()
        self.shard = shard
        self.vocab = vocab

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(self.shard(x), self.vocab)


class ShardedV4Attention(V4Attention):
    """V4 attention over heads [a, b) (whole output groups): this rank's rows of wq_b, its
    sinks, its groups' blocks of wo_a and columns of wo_b; wo_b's partial sums are added
    across ranks. The query LoRA, the shared K=V projection, the compressors and the indexer
    (its top-k needs every indexer head) are whole on every rank, and so is the cache."""

    def __init__(self, args: Any, index: int, heads: Range):
        super().__init__(args, index)
        H = heads[1] - heads[0]
        G = H * args.o_groups // args.num_attention_heads
        hd, r = args.head_dim, args.o_lora_rank
        self.n_heads, self.groups = H, G
        self.wq_b = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        self.wo_a = nn.Linear(H * hd // G, G * r, bias=False)
        self.wo_b = nn.Linear(G * r, args.hidden_size, bias=False)
        self.attn_sink = mx.zeros((H,), dtype=mx.float32)

    def __call__(self, x: mx.array, cache: Any) -> mx.array:
        return comm.all_sum(super().__call__(x, cache))


class ExpertParallelV4MoE(V4MoE):
    """V4's MoE with routed experts [a, b); the router (and a hash layer's table) whole, so
    every rank routes every token alike; the shared expert on rank 0 only. One all_sum."""

    def __init__(self, args: Any, index: int, experts: Range, shared: bool):
        super().__init__(args, index)
        self.first_expert, self.num_local = experts[0], experts[1] - experts[0]
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, self.num_local)
        if not shared:
            self.pop("shared_experts")

    def __call__(self, x: mx.array, ids: mx.array) -> mx.array:
        inds, weights = self.gate(x, ids)
        local = inds.astype(mx.int32) - self.first_expert
        mine = (local >= 0) & (local < self.num_local)
        local = mx.where(mine, local, 0).astype(mx.uint32)
        weights = mx.where(mine, weights, mx.zeros_like(weights))  # another rank's slot: 0
        shared = self.get("shared_experts")
        return comm.all_sum(ops.moe(x, local, weights, self.switch_mlp, shared, self.limit))


def shard_model(model: Model, plan: Plan, rank: int) -> None:
    """Swap `model`'s modules (unloaded, unquantized) for this rank's shares, in place."""
    args = model.args
    if hasattr(args, "hc_mult"):
        _shard_v4(model, plan, rank)
        return
    shared = plan.shared[rank] if plan.shared else None
    for layer in [*model.model.layers, *model.mtp]:
        layer.self_attn = ShardedAttention(args, plan.heads[rank], with_bias=rank == 0)
        if isinstance(layer.mlp, MoE):
            layer.mlp = ExpertParallelMoE(args, plan.experts[rank], shared)
        else:
            a, b = plan.dense[rank]
            layer.mlp = ShardedMLP(args.hidden_size, b - a) if b > a else NoMLP()
    a, b = plan.vocab[rank]
    D = args.hidden_size

    def embedding() -> VocabParallelEmbedding:
        return VocabParallelEmbedding(nn.Embedding(b - a, D), (a, b), plan.vocab)

    def head() -> VocabParallelHead:
        return VocabParallelHead(nn.Linear(D, b - a, bias=False), plan.vocab)

    model.model.embed_tokens = embedding()
    if "lm_head" in model:
        model.lm_head = head()
    for layer in model.mtp:  # the MTP layer's own copies, where the checkpoint has them
        if "embed_tokens" in layer:
            layer.embed_tokens = embedding()
        if "head" in layer.shared_head:
            layer.shared_head.head = head()


def _shard_v4(model: Any, plan: Plan, rank: int) -> None:
    args = model.args
    for index, layer in enumerate([*model.model.layers, *model.mtp]):  # MTP j: index n + j
        layer.attn = ShardedV4Attention(args, index, plan.heads[rank])
        layer.ffn = ExpertParallelV4MoE(args, index, plan.experts[rank], shared=rank == 0)
    a, b = plan.vocab[rank]
    D = args.hidden_size
    model.model.embed_tokens = VocabParallelEmbedding(nn.Embedding(b - a, D), (a, b), plan.vocab)
    model.lm_head = VocabParallelHead(nn.Linear(D, b - a, bias=False), plan.vocab)
