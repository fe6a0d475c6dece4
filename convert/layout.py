"""Which tensors a DeepSeek checkpoint holds, with their shapes, and where each one goes.

Derived from config.json alone, so a missing or mis-shaped tensor is caught before any
output is written. Source names are Hugging Face's; output names are mlx-lm's deepseek
names (the contract in mlx_deepseek/model.py): per-expert weights are stacked into
`mlp.switch_mlp.*` ([E, out, in]), V3's `kv_b_proj` becomes `embed_q` / `unembed_out`, and
MTP layer `num_hidden_layers + j` becomes `mtp.{j}.*`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_deepseek.models.config import ModelArgs

# What each role means to a recipe (PLAIN_ROLES are never quantized).
QUANTIZABLE_ROLES = (
    "embedding",
    "lm_head",
    "attention",
    "attention_latent",  # kv_b_proj, or V3's embed_q / unembed_out split from it
    "dense_mlp",
    "shared_expert",
    "routed_expert",
    "mtp_proj",
)
# kept in the output dtype: V3.2's indexer head weights (small, and they decide the selection),
# V4's hyper-connection mixing and hash-routing tables
PLAIN_ROLES = ("norm", "router", "router_bias", "index_weights", "mixing", "table")


@dataclass(frozen=True)
class Entry:
    """One source tensor and its destination.

    `out` is the output parameter name (e.g. `model.layers.3.mlp.switch_mlp.up_proj.weight`);
    for a routed expert, `expert` is its slot in the stacked output of `n_experts`.
    `kind` is "linear" (a [out, in] weight, maybe quantized), "vector" (norms, biases, the
    router), "kv_b" (split into embed_q / unembed_out) or "table" (V4's token -> experts
    table, integers).
    """

    src: str
    shape: tuple[int, ...]
    out: str
    role: str
    kind: str = "linear"
    expert: int | None = None
    n_experts: int = 0
    optional: bool = False
    keep_float32: bool = False  # a parameter the model keeps in float32 (V4's mixing weights)

    @property
    def module(self) -> str:
        """The output module path (what config.json's quantization overrides are keyed by)."""
        return self.out.rsplit(".", 1)[0]


def mtp_layers(args) -> int:
    """MTP layers a checkpoint of this family carries (V3's and V4's; V2 has none)."""
    return args.num_nextn_predict_layers if args.model_type in ("deepseek_v3", "deepseek_v4") else 0


def expected_entries(args: ModelArgs, keep_mtp: bool = True) -> list[Entry]:
    """Every tensor the checkpoint must hold (MTP copies of embed/head are optional)."""
    D, V = args.hidden_size, args.vocab_size
    entries = [Entry("model.embed_tokens.weight", (V, D), "model.embed_tokens.weight", "embedding")]
    for i in range(args.num_hidden_layers):
        entries += _block(args, f"model.layers.{i}", f"model.layers.{i}", i)
    entries.append(Entry("model.norm.weight", (D,), "model.norm.weight", "norm", "vector"))
    if not args.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", (V, D), "lm_head.weight", "lm_head"))
    if keep_mtp:
        for j in range(mtp_layers(args)):
            i = args.num_hidden_layers + j
            src, out = f"model.layers.{i}", f"mtp.{j}"
            entries += [
                Entry(f"{src}.enorm.weight", (D,), f"{out}.enorm.weight", "norm", "vector"),
                Entry(f"{src}.hnorm.weight", (D,), f"{out}.hnorm.weight", "norm", "vector"),
                Entry(f"{src}.eh_proj.weight", (D, 2 * D), f"{out}.eh_proj.weight", "mtp_proj"),
                Entry(
                    f"{src}.shared_head.norm.weight",
                    (D,),
                    f"{out}.shared_head.norm.weight",
                    "norm",
                    "vector",
                ),
                Entry(
                    f"{src}.embed_tokens.weight",
                    (V, D),
                    f"{out}.embed_tokens.weight",
                    "embedding",
                    optional=True,
                ),
                Entry(
                    f"{src}.shared_head.head.weight",
                    (V, D),
                    f"{out}.shared_head.head.weight",
                    "lm_head",
                    optional=True,
                ),
            ]
            entries += _block(args, src, out, i)
    return entries


def _block(args: ModelArgs, src: str, out: str, index: int) -> list[Entry]:
    D, H = args.hidden_size, args.num_attention_heads
    a, ao = f"{src}.self_attn", f"{out}.self_attn"

    def lin(name: str, shape: tuple[int, ...], role: str) -> Entry:
        return Entry(f"{a}.{name}.weight", shape, f"{ao}.{name}.weight", role)

    def vec(name: str, size: int) -> Entry:
        return Entry(f"{src}.{name}.weight", (size,), f"{out}.{name}.weight", "norm", "vector")

    e = [vec("input_layernorm", D), vec("post_attention_layernorm", D)]
    if args.model_type == "deepseek":  # DeepSeekMoE 16B: multi-head attention
        hd, kv = args.head_dim, args.kv_heads
        e += [
            lin("q_proj", (H * hd, D), "attention"),
            lin("k_proj", (kv * hd, D), "attention"),
            lin("v_proj", (kv * hd, D), "attention"),
            lin("o_proj", (D, H * hd), "attention"),
        ]
    else:
        e += _mla(args, a, ao, lin)
    if args.model_type == "deepseek_v32":
        e += _indexer(args, a, ao)

    m, mo = f"{src}.mlp", f"{out}.mlp"
    if not args.is_moe_layer(index):
        I = args.intermediate_size
        for name, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
            e.append(Entry(f"{m}.{name}.weight", shape, f"{mo}.{name}.weight", "dense_mlp"))
        return e
    E, I = args.n_routed_experts, args.moe_intermediate_size
    e.append(Entry(f"{m}.gate.weight", (E, D), f"{mo}.gate.weight", "router", "vector"))
    if args.topk_method == "noaux_tc":
        e.append(
            Entry(
                f"{m}.gate.e_score_correction_bias",
                (E,),
                f"{mo}.gate.e_score_correction_bias",
                "router_bias",
                "vector",
            )
        )
    shapes = (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I)))
    for x in range(E):
        for name, shape in shapes:
            e.append(
                Entry(
                    f"{m}.experts.{x}.{name}.weight",
                    shape,
                    f"{mo}.switch_mlp.{name}.weight",
                    "routed_expert",
                    expert=x,
                    n_experts=E,
                )
            )
    if args.n_shared_experts:
        S = I * args.n_shared_experts
        for name, shape in (("gate_proj", (S, D)), ("up_proj", (S, D)), ("down_proj", (D, S))):
            e.append(
                Entry(
                    f"{m}.shared_experts.{name}.weight",
                    shape,
                    f"{mo}.shared_experts.{name}.weight",
                    "shared_expert",
                )
            )
    return e


def _mla(args: ModelArgs, a: str, ao: str, lin) -> list[Entry]:
    D, H = args.hidden_size, args.num_attention_heads
    qk, nope, v, rank = args.qk_head_dim, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
    rope = args.qk_rope_head_dim
    e = []
    if args.q_lora_rank is None:
        e.append(lin("q_proj", (H * qk, D), "attention"))
    else:
        q = args.q_lora_rank
        e += [
            lin("q_a_proj", (q, D), "attention"),
            Entry(
                f"{a}.q_a_layernorm.weight", (q,), f"{ao}.q_a_layernorm.weight", "norm", "vector"
            ),
            lin("q_b_proj", (H * qk, q), "attention"),
        ]
    e += [
        lin("kv_a_proj_with_mqa", (rank + rope, D), "attention"),
        Entry(
            f"{a}.kv_a_layernorm.weight", (rank,), f"{ao}.kv_a_layernorm.weight", "norm", "vector"
        ),
        lin("o_proj", (D, H * v), "attention"),
    ]
    kv_b = lin("kv_b_proj", (H * (nope + v), rank), "attention_latent")
    if args.model_type in ("deepseek_v3", "deepseek_v32"):
        # split at conversion time as mlx-lm's deepseek_v3 / v32 sanitize does; mlx-lm's
        # deepseek_v2 model reads kv_b_proj itself, so V2 keeps it
        kv_b = Entry(kv_b.src, kv_b.shape, kv_b.out, "attention_latent", "kv_b")
    e.append(kv_b)
    return e


def _indexer(args: ModelArgs, a: str, ao: str) -> list[Entry]:
    """V3.2's lightning indexer; its head weights (weights_proj, small, decisive for the
    selection) are never quantized."""
    D, Hi, Di = args.hidden_size, args.index_n_heads, args.index_head_dim
    i, io = f"{a}.indexer", f"{ao}.indexer"
    return [
        Entry(f"{i}.wq_b.weight", (Hi * Di, args.q_lora_rank), f"{io}.wq_b.weight", "attention"),
        Entry(f"{i}.wk.weight", (Di, D), f"{io}.wk.weight", "attention"),
        Entry(f"{i}.k_norm.weight", (Di,), f"{io}.k_norm.weight", "norm", "vector"),
        Entry(f"{i}.k_norm.bias", (Di,), f"{io}.k_norm.bias", "norm", "vector"),
        Entry(f"{i}.weights_proj.weight", (Hi, D), f"{io}.weights_proj.weight", "index_weights"),
    ]


def kv_b_outputs(args: ModelArgs, kv_b_out: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The two tensors V3's kv_b_proj becomes: (name, shape) of embed_q and unembed_out."""
    prefix = kv_b_out[: -len(".kv_b_proj.weight")]
    H, nope, v, rank = (
        args.num_attention_heads,
        args.qk_nope_head_dim,
        args.v_head_dim,
        args.kv_lora_rank,
    )
    return (
        (f"{prefix}.embed_q.weight", (H, rank, nope)),  # per head W_uk^T
        (f"{prefix}.unembed_out.weight", (H, v, rank)),  # per head W_uv
    )


def is_ignorable(name: str) -> bool:
    """Tensors real checkpoints carry that the model does not use."""
    return name.endswith("rotary_emb.inv_freq")
