"""Which tensors a DeepSeek V4 checkpoint holds, with their shapes, and where each one goes.

From config.json alone (mlx_deepseek/models/v4_config.py), in either published layout:
- DeepSeek's: `embed.weight`, `head.weight`, `norm.weight`, `hc_head_{fn,base,scale}`,
  `layers.N.*`, the MTP modules `mtp.J.*` (FP8 linears and FP4 routed experts with a `.scale`
  beside each weight);
- transformers' save_pretrained: the same under `model.` (`model.embed_tokens.weight`,
  `model.hc_head.hc_{fn,base,scale}`, `model.layers.N.*`), `head.weight`, no MTP.
Outputs are the model's parameter names (models/deepseek_v4.py): routed experts stacked as
`ffn.switch_mlp.{gate,up,down}_proj` [E, out, in], the shared expert's w1 / w3 / w2 as
`ffn.shared_experts.{gate,up,down}_proj`, the head's collapse as `model.norm.hc_*`,
MTP module j as `mtp.j.*` (its collapse as `mtp.j.norm.hc_*`). Shapes are the logical
[out, in]: an FP4 weight holds [out, in / 2] bytes (plan.py checks both).
"""

from __future__ import annotations

from dataclasses import replace

from mlx_deepseek.models.v4_config import CSA, ModelArgs

from .layout import Entry

OFFICIAL, TRANSFORMERS = "deepseek", "transformers"
_PROJ = (("w1", "gate_proj", False), ("w3", "up_proj", False), ("w2", "down_proj", True))


def source_layout(names) -> str:
    """Which layout a checkpoint's tensor names are in (DeepSeek's unless transformers')."""
    return TRANSFORMERS if "model.embed_tokens.weight" in names else OFFICIAL


def transformers_name(name: str) -> str:
    """A DeepSeek-layout name -> the one transformers' save_pretrained writes."""
    top = {
        "embed.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base",
        "hc_head_scale": "model.hc_head.hc_scale",
    }
    if name in top:
        return top[name]
    return f"model.{name}" if name.startswith("layers.") else name


def expected_entries(args: ModelArgs, keep_mtp: bool, layout: str = OFFICIAL) -> list[Entry]:
    """Every tensor the checkpoint must hold, named as `layout` names them."""
    D, V, hc = args.hidden_size, args.vocab_size, args.hc_mult
    e = [
        Entry("embed.weight", (V, D), "model.embed_tokens.weight", "embedding"),
        Entry("head.weight", (V, D), "lm_head.weight", "lm_head"),
        _vec("norm.weight", D, "model.norm.weight"),
        *_collapse("hc_head_", "model.norm.hc_", hc, D),
    ]
    for i in range(args.num_hidden_layers):
        e += _block(args, f"layers.{i}", f"model.layers.{i}", i)
    if keep_mtp:
        for j in range(args.num_nextn_predict_layers):
            src, out = f"mtp.{j}", f"mtp.{j}"
            e += [
                Entry(f"{src}.e_proj.weight", (D, D), f"{out}.e_proj.weight", "mtp_proj"),
                Entry(f"{src}.h_proj.weight", (D, D), f"{out}.h_proj.weight", "mtp_proj"),
                _vec(f"{src}.enorm.weight", D, f"{out}.enorm.weight"),
                _vec(f"{src}.hnorm.weight", D, f"{out}.hnorm.weight"),
                _vec(f"{src}.norm.weight", D, f"{out}.norm.weight"),
                *_collapse(f"{src}.hc_head_", f"{out}.norm.hc_", hc, D),
            ]
            e += _block(args, src, out, args.num_hidden_layers + j)
    if layout == TRANSFORMERS:
        e = [replace(x, src=transformers_name(x.src)) for x in e]
    return e


def _vec(src: str, size: int, out: str) -> Entry:
    return Entry(src, (size,), out, "norm", "vector")


def _f32(src: str, shape: tuple[int, ...], out: str, role: str = "mixing") -> Entry:
    """A parameter the model keeps in float32 (mixing weights, sinks, position biases, the
    router)."""
    return Entry(src, shape, out, role, "vector", keep_float32=True)


def _collapse(src: str, out: str, hc: int, D: int) -> list[Entry]:
    """A head's collapse of the hc copies: fn [hc, hc * D], base [hc], scale [1]."""
    return [
        _f32(f"{src}fn", (hc, hc * D), f"{out}fn"),
        _f32(f"{src}base", (hc,), f"{out}base"),
        _f32(f"{src}scale", (1,), f"{out}scale"),
    ]


def _block(args: ModelArgs, src: str, out: str, index: int) -> list[Entry]:
    D, H, hd, hc = args.hidden_size, args.num_attention_heads, args.head_dim, args.hc_mult
    q, G, o = args.q_lora_rank, args.o_groups, args.o_lora_rank
    mix = (2 + hc) * hc

    def lin(name: str, shape: tuple[int, int], role: str = "attention") -> Entry:
        return Entry(f"{src}.{name}.weight", shape, f"{out}.{name}.weight", role)

    e = [_vec(f"{src}.attn_norm.weight", D, f"{out}.attn_norm.weight")]
    e.append(_vec(f"{src}.ffn_norm.weight", D, f"{out}.ffn_norm.weight"))
    for site in ("attn", "ffn"):
        e += [
            _f32(f"{src}.hc_{site}_fn", (mix, hc * D), f"{out}.hc_{site}_fn"),
            _f32(f"{src}.hc_{site}_base", (mix,), f"{out}.hc_{site}_base"),
            _f32(f"{src}.hc_{site}_scale", (3,), f"{out}.hc_{site}_scale"),
        ]
    e += [
        lin("attn.wq_a", (q, D)),
        _vec(f"{src}.attn.q_norm.weight", q, f"{out}.attn.q_norm.weight"),
        lin("attn.wq_b", (H * hd, q)),
        lin("attn.wkv", (hd, D)),
        _vec(f"{src}.attn.norm.weight", hd, f"{out}.attn.norm.weight"),
        lin("attn.wo_a", (G * o, H * hd // G)),
        lin("attn.wo_b", (D, G * o)),
        _f32(f"{src}.attn.attn_sink", (H,), f"{out}.attn.attn_sink"),
    ]
    ratio = args.compress_ratio(index)
    if ratio:
        e += _compressor(args, f"{src}.attn.compressor", f"{out}.attn.compressor", ratio, hd,
                         args.layer_type(index) == CSA)  # fmt: skip
    if args.layer_type(index) == CSA:
        ih, idim = args.index_n_heads, args.index_head_dim
        e += [
            lin("attn.indexer.wq_b", (ih * idim, q)),
            lin("attn.indexer.weights_proj", (ih, D)),
            *_compressor(
                args, f"{src}.attn.indexer.compressor", f"{out}.attn.indexer.compressor",
                ratio, idim, True,
            ),
        ]  # fmt: skip
    E, I = args.n_routed_experts, args.moe_intermediate_size
    f, fo = f"{src}.ffn", f"{out}.ffn"
    e.append(_f32(f"{f}.gate.weight", (E, D), f"{fo}.gate.weight", "router"))
    if args.is_hash_layer(index):
        k = args.num_experts_per_tok
        e.append(Entry(f"{f}.gate.tid2eid", (args.vocab_size, k), f"{fo}.gate.tid2eid",
                       "table", "table"))  # fmt: skip
    else:
        e.append(_f32(f"{f}.gate.bias", (E,), f"{fo}.gate.bias", "router_bias"))
    for w, proj, down in _PROJ:
        shape = (D, I) if down else (I, D)
        e += [
            Entry(f"{f}.experts.{x}.{w}.weight", shape, f"{fo}.switch_mlp.{proj}.weight",
                  "routed_expert", expert=x, n_experts=E)
            for x in range(E)
        ]  # fmt: skip
        e.append(Entry(f"{f}.shared_experts.{w}.weight", shape,
                       f"{fo}.shared_experts.{proj}.weight", "shared_expert"))  # fmt: skip
    return e


def _compressor(
    args: ModelArgs, src: str, out: str, ratio: int, dim: int, overlap: bool
) -> list[Entry]:
    D, width = args.hidden_size, (1 + overlap) * dim
    return [
        Entry(f"{src}.wkv.weight", (width, D), f"{out}.wkv.weight", "attention"),
        Entry(f"{src}.wgate.weight", (width, D), f"{out}.wgate.weight", "attention"),
        _f32(f"{src}.ape", (ratio, width), f"{out}.ape"),
        _vec(f"{src}.norm.weight", dim, f"{out}.norm.weight"),
    ]
