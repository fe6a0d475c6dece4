"""The benchmark's models: synthetic DeepSeek checkpoints, each quantized by both tools.

A synthetic model is written ONCE as a bf16 Hugging Face checkpoint (per-expert tensors,
`kv_b_proj`: DeepSeek's own layout) with random weights, then quantized from those same
bytes by mlx-lm (`mlx_lm.utils` load/quantize/save, what `mlx_lm.convert -q` does) and by
mlx-deepseek (`mlx-deepseek convert`). Everything lives in a cache folder keyed by the
config, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.tiny import RELEASES, WIDTHS_64, YARN_V2, YARN_V3, tiny_config, tiny_v4_config

DEFAULT_CACHE = Path("~/.cache/mlx_deepseek/bench").expanduser()
GENERATOR_VERSION = 1  # bump when the synthetic weights change meaning

# what every synthetic shape sets: bf16 weights, V2 / V3's 163840 positions, no MTP unless said
_COMMON: dict[str, Any] = dict(
    torch_dtype="bfloat16", max_position_embeddings=163840, num_nextn_predict_layers=0
)


def _release(name: str, routing: str, **scaled: Any) -> dict[str, Any]:
    """The release's config (tiny.RELEASES: its per-layer shapes exactly) with `scaled` fields,
    as a synthetic shape's config.json; one dense layer first unless said."""
    fields = {**RELEASES[name], "first_k_dense_replace": 1, **_COMMON, **scaled}
    return tiny_config(routing, **fields)


@dataclass(frozen=True)
class Shape:
    """A synthetic model: its Hugging Face config and what was scaled from the real one."""

    name: str
    title: str
    config: dict[str, Any]
    scaled: list[str] = field(default_factory=list)  # "field: bench (real)" lines
    # "mla": a bf16 source quantized by both tools; "v4": DeepSeek's FP8/FP4 release layout
    # converted by mlx-deepseek alone (mlx-lm has no V4 model)
    family: str = "mla"

    @property
    def key(self) -> str:
        text = json.dumps({"v": GENERATOR_VERSION, **self.config}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def v2_lite_shape(moe_layers: int = 3, vocab: int = 16384) -> Shape:
    """DeepSeek-V2-Lite's per-layer shapes exactly; fewer layers and a smaller vocabulary."""
    config = _release(  # the greedy preset is V2-Lite's routing
        "V2-Lite",
        "v2_greedy",
        vocab_size=vocab,
        num_hidden_layers=1 + moe_layers,
        rope_scaling=dict(YARN_V2),
    )
    scaled = [
        f"layers: {1 + moe_layers} = 1 dense + {moe_layers} MoE (real 27 = 1 + 26)",
        f"vocab_size: {vocab} (real 102400)",
    ]
    return Shape("v2-lite", "V2-Lite-shaped", config, scaled)


def attention_shape(layers: int = 2, vocab: int = 4096) -> Shape:
    """A V2-Lite-shaped model whose attention dominates: V2-Lite's MLA (16 heads, latent rank
    512, no q LoRA), small experts (8 x 256 wide, top 2 + 1 shared), every layer MoE, a small
    vocabulary: decode time goes to the latent cache at long contexts."""
    config = _release(
        "V2-Lite",
        "v2_greedy",
        vocab_size=vocab,
        num_hidden_layers=layers,
        first_k_dense_replace=0,
        intermediate_size=256,
        moe_intermediate_size=256,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        rope_scaling=dict(YARN_V2),
    )
    scaled = [
        f"layers: {layers} MoE (real V2-Lite 27)",
        "experts: 8 x 256 wide, top 2, 1 shared (real 64 x 1408, top 6, 2 shared)",
        f"vocab_size: {vocab} (real 102400)",
    ]
    return Shape("attn", "attention-heavy (V2-Lite attention, small experts)", config, scaled)


def v3_shape(
    moe_layers: int = 1, experts: int = 32, vocab: int = 16384, mtp_layers: int = 1
) -> Shape:
    """DeepSeek-V3's per-layer shapes (MLA with q LoRA, 2048-wide experts, noaux_tc routing
    over 8 groups), its MTP layer; fewer layers, fewer routed experts and a smaller
    vocabulary."""
    config = _release(
        "V3",
        "v3_noaux",
        vocab_size=vocab,
        num_hidden_layers=1 + moe_layers,
        n_routed_experts=experts,
        rope_scaling=dict(YARN_V3),
    )
    config["num_nextn_predict_layers"] = mtp_layers  # random: its drafts are rarely right
    scaled = [
        f"layers: {1 + moe_layers} = 1 dense + {moe_layers} MoE (real 61 = 3 + 58)",
        f"n_routed_experts: {experts}, {experts // 8} per group (real 256, 32 per group)",
        f"vocab_size: {vocab} (real 129280)",
        f"MTP layers: {mtp_layers} with random weights (real 1, trained)",
    ]
    return Shape("v3", "V3-shaped", config, scaled)


def v32_shape(
    moe_layers: int = 1, experts: int = 16, moe_intermediate: int = 512, vocab: int = 16384
) -> Shape:
    """DeepSeek-V3.2's attention exactly (MLA 128 heads, q LoRA 1536, latent 512 + 64, the
    indexer's 64 heads of 128 and top-2048); few layers, few and narrow experts, a narrow
    dense layer and a small vocabulary (the MLP does not change with the context)."""
    config = dict(v3_shape(moe_layers, experts, vocab).config)
    config.update(
        architectures=["DeepseekV32ForCausalLM"],
        model_type="deepseek_v32",
        index_n_heads=64,
        index_head_dim=128,
        index_topk=2048,
        intermediate_size=2048,
        moe_intermediate_size=moe_intermediate,
    )
    scaled = [
        f"layers: {1 + moe_layers} = 1 dense + {moe_layers} MoE (real 61 = 3 + 58)",
        f"n_routed_experts: {experts} of {moe_intermediate} (real 256 of 2048), 8 active",
        "dense layer intermediate_size: 2048 (real 18432)",
        f"vocab_size: {vocab} (real 129280)",
        "MTP layer: none (real 1; not used)",
    ]
    return Shape("v3.2", "V3.2-shaped", config, scaled)


def tiny_shape(model_type: str = "deepseek_v2") -> Shape:
    """A model of a few MB with every structural feature (tests, a harness smoke run)."""
    v3 = model_type in ("deepseek_v3", "deepseek_v32")
    fields = dict(
        WIDTHS_64,
        torch_dtype="bfloat16",
        q_lora_rank=64 if v3 else None,
        n_shared_experts=1,
        n_group=2 if v3 else 1,
        topk_group=1,
        # mlx-lm's deepseek_v2 needs a rope_scaling section
        rope_scaling={**YARN_V2, "factor": 4, "original_max_position_embeddings": 1024},
        num_nextn_predict_layers=1 if v3 else 0,
    )
    if model_type == "deepseek_v32":  # top-8 of 16 indexer heads: sparse from 8 positions on
        fields.update(index_n_heads=16, index_head_dim=32, index_topk=8)
    config = tiny_config(model_type, **fields)
    name = {"deepseek_v2": "tiny-v2", "deepseek_v3": "tiny-v3", "deepseek_v32": "tiny-v32"}
    return Shape(name[model_type], f"tiny {model_type}", config, ["everything (a test model)"])


def v4_flash_shape(ratios: tuple[int, ...] = (0, 4, 128), experts: int = 16,
                   vocab: int = 16384) -> Shape:  # fmt: skip
    """DeepSeek-V4-Flash's per-layer shapes (512-d shared K=V over 64 heads, q / o LoRA 1024 in
    8 groups, 2048-wide FP4 experts, 6 active, the indexer's 64 x 128 heads and top-512,
    window 128, 4 hyper-connection copies); few layers of each attention kind, fewer routed
    experts and a smaller vocabulary."""
    from .v4 import flash_config

    config = flash_config(list(ratios), experts, vocab)
    kinds = {0: "sliding", 4: "compressed sparse"}
    scaled = [
        f"layers: {len(ratios)} = "
        + " + ".join(kinds.get(r, f"heavily compressed (ratio {r})") for r in ratios)
        + " (real 43 = 2 sliding + 21 compressed sparse + 20 heavily compressed)",
        f"n_routed_experts: {experts} (real 256)",
        f"vocab_size: {vocab} (real 129280)",
        "hash-routed layers: 1 (real 3); MTP layer: none (real 1; decode does not read it)",
    ]
    return Shape("v4-flash", "V4-Flash-shaped", config, scaled, family="v4")


def tiny_v4_shape() -> Shape:
    """A V4 model of a few MB with a sliding, a compressed sparse and a heavily compressed
    layer (tests, a harness smoke run)."""
    config = tiny_v4_config([0, 4, 16])
    return Shape("tiny-v4", "tiny deepseek_v4", config, ["everything (a test model)"], "v4")


SHAPES: dict[str, Callable[[], Shape]] = {
    "v2-lite": v2_lite_shape,
    "v3": v3_shape,
    "attn": attention_shape,
    "v3.2": v32_shape,
    "v4-flash": v4_flash_shape,
    "tiny-v2": lambda: tiny_shape("deepseek_v2"),
    "tiny-v3": lambda: tiny_shape("deepseek_v3"),
    "tiny-v32": lambda: tiny_shape("deepseek_v32"),
    "tiny-v4": tiny_v4_shape,
}


@dataclass
class Checkpoints:
    """One model's checkpoints: the bf16 source and each runtime's 4-bit quantization."""

    source: Path
    ours: Path
    mlx_lm: Path | None
    notes: list[str] = field(default_factory=list)
    ours_quantized_by: str = "mlx-deepseek convert"


def prepare(
    shape: Shape,
    cache_dir: Path = DEFAULT_CACHE,
    *,
    bits: int = 4,
    group_size: int = 64,
    log: Callable[[str], None] = print,
) -> Checkpoints:
    """Write (once) the bf16 source and both quantized checkpoints of `shape` under cache_dir."""
    root = Path(cache_dir).expanduser() / shape.key
    q = f"q{bits}g{group_size}"
    if shape.family == "v4":
        return _prepare_v4(shape, root, q, bits, group_size, log)
    source = _once(root / "bf16", lambda p: _write_source(shape, p), log, "bf16 source")
    lm = _once(
        root / f"mlx-lm-{q}",
        lambda p: quantize_with_mlx_lm(source, p, bits, group_size),
        log,
        f"mlx-lm {bits}-bit",
    )
    notes: list[str] = []
    try:
        ours = _converted(source, root / f"mlx-deepseek-{q}", bits, group_size, log)
        by = "mlx-deepseek convert"
    except Exception as e:  # the converter is young: never let it stop the benchmark
        notes.append(
            f"mlx-deepseek convert failed ({type(e).__name__}: {e}); mlx-deepseek runs "
            "mlx-lm's quantized checkpoint instead (its loader reads it exactly)"
        )
        ours, by = lm, "mlx-lm (mlx-deepseek convert unavailable)"
    return Checkpoints(source, ours, lm, notes, by)


def _prepare_v4(
    shape: Shape, root: Path, q: str, bits: int, group_size: int, log: Callable[[str], None]
) -> Checkpoints:
    """DeepSeek's release layout (FP8 / FP4), converted by mlx-deepseek: the FP4 experts
    stay mxfp4 bit for bit, the FP8 linears become `bits`-bit affine."""
    from .v4 import write_source

    source = _once(
        root / "release", lambda p: write_source(shape.config, p), log, "FP8/FP4 release source"
    )
    ours = _converted(source, root / f"mlx-deepseek-{q}", bits, group_size, log, " (experts mxfp4)")
    note = "mlx-lm has no deepseek_v4 model: mlx-deepseek is measured alone"
    return Checkpoints(source, ours, None, [note], "mlx-deepseek convert (FP8/FP4 release)")


def _converted(
    source: Path, out: Path, bits: int, group_size: int, log: Callable[[str], None], note: str = ""
) -> Path:
    """`mlx-deepseek convert`'s `bits`-bit checkpoint of `source` at `out` (once)."""
    what = f"mlx-deepseek {bits}-bit{note}"
    return _once(out, lambda p: quantize_with_ours(source, p, bits, group_size), log, what)


def _once(folder: Path, make: Callable[[Path], None], log: Callable[[str], None], what: str):
    """Build `folder` through a staging folder renamed at the end: a crash leaves no half."""
    done = folder / ".complete"
    if done.exists():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    log(f"writing {what} -> {folder} (once; cached for later runs)")
    try:
        make(staging)
        (staging / ".complete").write_text("")
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_source(shape: Shape, folder: Path) -> None:
    import numpy as np

    from mlx_deepseek.convert.synthetic import random_tensor, write_checkpoint

    rng = np.random.default_rng(0)
    # a callable streams tensor by tensor (a dict or None would hold every weight in memory)
    nbytes = _param_count(shape.config) * 2
    write_checkpoint(
        folder,
        shape.config,
        lambda name, shp: random_tensor(name, shp, rng),
        fmt="bf16",
        shards=max(1, -(-nbytes // (4 * 10**9))),
    )


def _param_count(config: dict[str, Any]) -> int:
    import math

    from mlx_deepseek.convert.synthetic import source_shapes

    return sum(math.prod(s) for s in source_shapes(config).values())


def quantize_with_mlx_lm(source: Path, out: Path, bits: int, group_size: int) -> None:
    """What `mlx_lm.convert --quantize` writes (tokenizer files copied as they are)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    # mlx-lm drops a real V3's MTP layer by its index (61); a synthetic one sits elsewhere,
    # so its tensors are left out the same way: not strict
    mtp = json.loads((Path(source) / "config.json").read_text()).get("num_nextn_predict_layers")
    model, config = load_model(Path(source), lazy=True, strict=not mtp)
    model, config = quantize_model(model, config, group_size=group_size, bits=bits)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, donate_model=True)
    save_config(config, out / "config.json")
    for f in Path(source).iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)


def quantize_with_ours(source: Path, out: Path, bits: int, group_size: int) -> None:
    from mlx_deepseek.convert.pipeline import convert
    from mlx_deepseek.convert.plan import Options

    convert(source, out, Options(bits=bits, group_size=group_size, recipe="uniform"), force=True)
