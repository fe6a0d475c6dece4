"""Where each part of the model lives: the placement plan of a split model.

- pipeline: contiguous layer ranges, one per rank, sized so that each rank's share of the
  weights is proportional to its memory (rank 0 also holds the embedding; the last rank the
  final norm, the LM head and the MTP module, with the embedding rows MTP reads);
- tensor: every rank holds every layer, with its share of the attention heads (uneven counts
  allowed: 128 heads on 3 ranks are 43 + 43 + 42), of the routed experts (expert parallel),
  of the shared experts' and dense MLPs' hidden units, and of the vocabulary rows of the
  embedding and the head; the router, the norms and the latent projections are replicated.

Plans are computed on rank 0 (`make_plan`) from the checkpoint's tensor sizes and each
rank's memory, and shared with the others as JSON, so every rank holds the same plan.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import DeepSeekError
from ..models.config import ModelArgs
from ..models.deepseek_v4 import FLOAT32_PARAMS as V4_FLOAT32
from .checkpoint import TensorInfo
from .costs import LINKS, Shape, predict_split

KINDS = ("pipeline", "tensor")
Range = tuple[int, int]
Pick = tuple[str, Range | None, Range | None]  # (name, rows, columns) a rank reads
Selector = Callable[[str, TensorInfo], Pick | None]  # None: another rank's tensor
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def local_expert(prefix: str, index: int, leaf: str, experts: Range) -> str | None:
    """Routed expert `index`'s tensor `leaf` under this rank's numbering (its experts
    [e0, e1) become 0..), or None when another rank holds that expert."""
    e0, e1 = experts
    return f"{prefix}.experts.{index - e0}.{leaf}" if e0 <= index < e1 else None


def tensor_selector(
    vocab: Range,
    layer: re.Pattern,
    select_layer: Callable[[str, TensorInfo, re.Match], Pick | None],
) -> Selector:
    """A tensor-parallel rank's selector: rows `vocab` of the embedding and the head,
    select_layer(name, info, match) for a tensor whose name `layer` matches, others whole."""

    def select(name: str, info: TensorInfo) -> Pick | None:
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            return name, vocab, None
        m = layer.match(name)
        return select_layer(name, info, m) if m else (name, None, None)

    return select


class PlanError(DeepSeekError):
    """The model cannot be split that way over these ranks."""


@dataclass(frozen=True)
class Plan:
    """A split of one model over `size` ranks; ranges are [start, stop) per rank."""

    kind: str
    size: int
    layers: tuple[Range, ...] = ()  # pipeline
    heads: tuple[Range, ...] = ()  # tensor: attention heads
    experts: tuple[Range, ...] = ()  # tensor: routed experts
    vocab: tuple[Range, ...] = ()  # tensor: rows of the embedding and the LM head
    shared: tuple[Range, ...] = ()  # tensor: hidden units of the shared experts' MLP
    dense: tuple[Range, ...] = ()  # tensor: hidden units of the dense layers' MLP
    rank_bytes: tuple[int, ...] = field(default=(), compare=False)  # planned weight bytes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        ranges = {k: tuple(tuple(r) for r in data.get(k, ())) for k in _RANGE_FIELDS}
        return cls(data["kind"], int(data["size"]), **ranges,
                   rank_bytes=tuple(data.get("rank_bytes", ())))  # fmt: skip

    def describe(self, rank: int) -> str:
        """What `rank` holds, in words."""
        if self.kind == "pipeline":
            a, b = self.layers[rank]
            extra = [" + embedding"] if rank == 0 else []
            extra += [" + head"] if rank == self.size - 1 else []
            return f"layers {a}-{b - 1}" + "".join(extra)
        parts = [("heads", self.heads), ("experts", self.experts), ("vocab", self.vocab)]
        return ", ".join(f"{name} {r[rank][0]}-{r[rank][1] - 1}" for name, r in parts if r)


_RANGE_FIELDS = ("layers", "heads", "experts", "vocab", "shared", "dense")


# ---- sizes ---------------------------------------------------------------------------------


def weight_bytes(info: TensorInfo, compute_itemsize: int) -> int:
    """Bytes a tensor takes once loaded: floats (and V4's FP8 weights, decoded) in the compute
    dtype; the router's and V4's mixing parameters in float32."""
    if info.dtype not in ("F32", "F16", "BF16", "F8_E4M3"):
        return info.nbytes
    if info.name.endswith(("mlp.gate.weight", "e_score_correction_bias")) or any(
        key in info.name for key in V4_FLOAT32
    ):
        return info.nbytes // info.itemsize * 4
    return info.nbytes // info.itemsize * compute_itemsize


@dataclass
class Sizes:
    """Loaded bytes of each decoder layer and of the parts around them."""

    layers: list[int]
    embed: int = 0
    head: int = 0  # final norm + LM head
    mtp: int = 0  # the MTP layer(s) with their own copies
    mtp_embed: bool = False  # the last rank needs the embedding (MTP without a copy, tied head)

    @property
    def total(self) -> int:
        return sum(self.layers) + self.embed + self.head + self.mtp

    @property
    def last_extra(self) -> int:
        """What a pipeline's last rank holds beside its layers."""
        return self.head + self.mtp + (self.embed if self.mtp_embed else 0)


def sizes(args: ModelArgs, tensors: dict[str, TensorInfo], compute_itemsize: int) -> Sizes:
    out = Sizes([0] * args.num_hidden_layers)
    for name, info in tensors.items():
        n = weight_bytes(info, compute_itemsize)
        m = _LAYER.match(name)
        if m and int(m.group(1)) < args.num_hidden_layers:
            out.layers[int(m.group(1))] += n
        elif m or name.startswith("mtp."):
            out.mtp += n
        elif name.startswith("model.embed_tokens."):
            out.embed += n
        elif name.startswith(("lm_head.", "model.norm.")):
            out.head += n
    copy = any(n.endswith("embed_tokens.weight") and n != "model.embed_tokens.weight"
               for n in tensors)  # fmt: skip
    out.mtp_embed = args.tie_word_embeddings or (out.mtp > 0 and not copy)
    return out


# ---- pipeline ------------------------------------------------------------------------------


def split_layers(
    layer_bytes: list[int], first_extra: int, last_extra: int, memory: list[int]
) -> list[Range]:
    """Contiguous layer ranges, one per rank (each at least one layer), minimising the largest
    ratio of a rank's bytes to its memory (an exact dynamic programme)."""
    L, N = len(layer_bytes), len(memory)
    if N > L:
        raise PlanError(f"{N} ranks for {L} layers: a pipeline needs a layer per rank at least")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def load(r: int, a: int, b: int) -> float:
        extra = (first_extra if r == 0 else 0) + (last_extra if r == N - 1 else 0)
        return (prefix[b] - prefix[a] + extra) / max(memory[r], 1)

    inf = float("inf")
    # best[r][i]: least max-load placing layers [0, i) on ranks [0, r]; cut[r][i]: where r starts
    best = [[inf] * (L + 1) for _ in range(N)]
    cut = [[0] * (L + 1) for _ in range(N)]
    for i in range(1, L - N + 2):
        best[0][i] = load(0, 0, i)
    for r in range(1, N):
        for i in range(r + 1, L - (N - 1 - r) + 1):
            for a in range(r, i):
                value = max(best[r - 1][a], load(r, a, i))
                if value < best[r][i]:
                    best[r][i], cut[r][i] = value, a
    ranges, stop = [], L
    for r in range(N - 1, 0, -1):
        a = cut[r][stop]
        ranges.append((a, stop))
        stop = a
    ranges.append((0, stop))
    return ranges[::-1]


# ---- tensor --------------------------------------------------------------------------------


def even(total: int, n: int, unit: int = 1, what: str = "") -> list[Range]:
    """[0, total) in n near-equal ranges whose ends are multiples of `unit` (bar the last)."""
    units = -(-total // unit)
    if units < n:
        raise PlanError(
            f"{what or 'a dimension'} of {total} cannot be split over {n} ranks"
            + (f" in blocks of {unit}" if unit > 1 else "")
            + ": use fewer ranks or --parallel pipeline"
        )
    base, extra = divmod(units, n)
    out, start = [], 0
    for r in range(n):
        stop = min(start + (base + (r < extra)) * unit, total)
        out.append((start, stop))
        start = stop
    return out


def even_or_first(total: int, n: int, unit: int) -> list[Range]:
    """`even`, or all of [0, total) on rank 0 when there are fewer blocks than ranks (a shared
    expert of one quantization group cannot be cut; rank 0 runs it whole)."""
    if -(-total // unit) < n:
        return [(0, total)] + [(total, total)] * (n - 1)
    return even(total, n, unit)


def tensor_plan(args: ModelArgs, n: int, unit: int = 1) -> Plan:
    """Heads, experts, vocabulary and MLP hidden units split evenly over n ranks (`unit`: the
    quantization group size, so that column slices keep whole groups)."""
    shared = (args.moe_intermediate_size or 0) * (args.n_shared_experts or 0)
    # o_proj's input columns are cut at head boundaries: whole quantization groups
    head_unit = math.lcm(args.v_head_dim, unit) // args.v_head_dim
    return Plan(
        "tensor",
        n,
        heads=tuple(even(args.num_attention_heads, n, head_unit, "num_attention_heads")),
        experts=tuple(even(args.n_routed_experts, n, 1, "n_routed_experts"))
        if args.n_routed_experts
        else (),
        vocab=tuple(even(args.vocab_size, n, 1, "vocab_size")),
        shared=tuple(even_or_first(shared, n, unit)) if shared else (),
        dense=tuple(even_or_first(args.intermediate_size, n, unit)),
    )


def v4_tensor_plan(args: Any, n: int) -> Plan:
    """DeepSeek V4: heads in whole output groups (wo_a projects each group's heads on its
    own, so a rank's groups make a partial sum of wo_b's output), routed experts and the
    vocabulary split evenly; the rest (wq_a, wkv, compressors, indexer, router, the shared
    expert on rank 0) is not split."""
    per_group = args.num_attention_heads // args.o_groups
    return Plan(
        "tensor",
        n,
        heads=tuple(even(args.num_attention_heads, n, per_group, "num_attention_heads")),
        experts=tuple(even(args.n_routed_experts, n, 1, "n_routed_experts")),
        vocab=tuple(even(args.vocab_size, n, 1, "vocab_size")),
    )


def tensor_bytes(args: ModelArgs, s: Sizes, n: int) -> list[int]:
    """Roughly what each rank of a tensor split holds: 1/n of everything but the replicated
    parts (router, norms, latent projections), which every rank holds whole."""
    replicated = 0
    if hasattr(args, "hc_mult"):  # V4: costs.py's count of what is not split, in float32
        replicated = 4 * args.num_hidden_layers * Shape.from_args(args).replicated_params
    for i in range(0 if replicated else args.num_hidden_layers):
        replicated += _replicated_per_layer(args) * (4 if args.is_moe_layer(i) else 2)
    share = max(s.total - replicated, 0) // n
    return [share + replicated] * n


def _replicated_per_layer(args: ModelArgs) -> int:
    """Elements replicated in a layer (q_a, kv_a projections; router in float32 counted x2)."""
    D = args.hidden_size
    q_a = D * (args.q_lora_rank or 0)
    kv_a = D * (args.kv_lora_rank + args.qk_rope_head_dim)
    return q_a + kv_a + (args.n_routed_experts or 0) * D // 2


# ---- the plan ------------------------------------------------------------------------------


def make_plan(
    kind: str,
    args: ModelArgs,
    s: Sizes,
    memory: list[int],
    unit: int = 1,
    backend: str = "ring",
) -> Plan:
    """The plan for `kind` (pipeline | tensor | auto) over len(memory) ranks."""
    n = len(memory)
    if kind == "auto":
        kind = choose(args, s, memory, unit, backend)
    if kind == "pipeline":
        layers = split_layers(s.layers, s.embed, s.last_extra, memory)
        need = [
            sum(s.layers[a:b]) + (s.embed if r == 0 else 0) + (s.last_extra if r == n - 1 else 0)
            for r, (a, b) in enumerate(layers)
        ]
        plan = Plan("pipeline", n, layers=tuple(layers), rank_bytes=tuple(need))
    elif kind == "tensor":
        split = v4_tensor_plan(args, n) if hasattr(args, "hc_mult") else tensor_plan(args, n, unit)
        plan = replace(split, rank_bytes=tuple(tensor_bytes(args, s, n)))
    else:
        raise PlanError(f"--parallel {kind}: choose one of pipeline, tensor, auto")
    for r, (need, have) in enumerate(zip(plan.rank_bytes, memory, strict=True)):
        if have and need > have:
            hint = "add ranks"
            if plan.kind == "tensor":
                hint += ", use --parallel pipeline (it sizes layer ranges by memory)"
            raise PlanError(
                f"rank {r} would hold {need / 1e9:.1f} GB of weights ({plan.kind} over {n} "
                f"ranks) but has {have / 1e9:.1f} GB available: {hint}, or use a lower-bit "
                "conversion"
            )
    return plan


def choose(args: ModelArgs, s: Sizes, memory: list[int], unit: int, backend: str) -> str:
    """`auto`: tensor parallel when every rank can hold an even share and the cost model says
    it decodes faster over this link; else pipeline (which also sizes ranges by memory)."""
    n = len(memory)
    try:
        v4_tensor_plan(args, n) if hasattr(args, "hc_mult") else tensor_plan(args, n, unit)
    except PlanError:
        return "pipeline"
    share = tensor_bytes(args, s, n)
    if any(have and need > have for need, have in zip(share, memory, strict=True)):
        return "pipeline"
    link = LINKS["tb5-rdma" if backend == "jaccl" else "tb5-tcp"]
    rates = {k: predict_split(args, s.total, n, k, link).tokens_per_s for k in KINDS}
    return "tensor" if rates["tensor"] >= rates["pipeline"] else "pipeline"
