"""A conversion from start to finish: resolve SRC, plan, stream every tensor into DST.

Tensors are processed in source order (shard by shard, by offset: sequential reads), each
in row chunks of at most CHUNK_ELEMENTS source elements: read -> FP8 / FP4 dequantize
(float32) -> cast to the output dtype -> quantize -> written at its final offset. FP4
weights kept as MLX mxfp4 (V4's routed experts) skip all of it: their bytes are written as
read. A routed expert is written into its slice of the stacked [E, out, in] tensor, so no
layer is ever held whole; memory stays at a few chunks whatever the model's size.
Quantizing per expert or per row chunk gives the same bytes as quantizing the stacked tensor
(groups run along rows). One reader thread fetches the next chunk while the current one is
converted and written.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_deepseek.errors import CheckpointError, DeepSeekError
from mlx_deepseek.models.compressed_tensors import dequantize as dequantize_packed
from mlx_deepseek.models.compressed_tensors import to_affine
from mlx_deepseek.models.v4_weights import e8m0_to_float

from .destination import (
    Staging,
    check_destination,
    check_not_source,
    real_path,
    signals_interrupt,
)
from .fp8 import dequantize_fp8
from .plan import E8M0, FP4_GROUP, Job, Options, Plan, make_plan
from .reader import SourceCheckpoint, to_mlx
from .writer import ShardWriter, plan_shards

CHUNK_ELEMENTS = 1 << 24  # source elements per read (64 MB as float32)
COPY_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.json",
    "*.jinja",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
)

Progress = Callable[[int], None]


@dataclass
class Summary:
    src: Path
    dst: Path
    seconds: float
    read_bytes: int
    write_bytes: int
    params: int
    files: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return self.write_bytes * 8 / self.params

    @property
    def rate(self) -> float:
        """Source bytes converted per second."""
        return self.read_bytes / max(self.seconds, 1e-9)


def convert(
    src: str | Path,
    dst: str | Path,
    options: Options | None = None,
    *,
    force: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    on_progress: Progress | None = None,
) -> Summary:
    """Convert a Hugging Face DeepSeek checkpoint (folder or hub id) into an MLX one at `dst`.

    Raises DeepSeekError (one line, naming the problem and the fix) on bad input; on any
    error, Ctrl-C, SIGTERM or SIGHUP (raised as destination.Interrupted), `dst` is untouched
    and no staging folder is left behind. `dst` may not be, contain or lie inside the source.
    """
    options = options or Options()
    start = time.perf_counter()
    dst = real_path(dst)  # symlinks and `..` resolved: compared with SRC as the OS sees them
    check_destination(dst, force)
    src_path = resolve_source(src)
    check_not_source(dst, src_path)
    with signals_interrupt(), SourceCheckpoint(src_path) as source:
        check_not_source(dst, src_path, source.files)  # a cache snapshot's blobs too
        metadata_files(source.folder)  # refused now rather than after the conversion
        plan = make_plan(source, options)
        shards = plan_shards(plan.tensors, options.shard_size)
        _check_space(dst, sum(s.size for s in shards))
        if on_plan is not None:
            on_plan(plan)
        with Staging(dst, force) as stage:
            writer = ShardWriter(stage.path, shards)
            try:
                run_jobs(source, plan, writer, on_progress or (lambda n: None))
                writer.finish()
            finally:
                writer.close()
            write_metadata(stage.path, source.folder, plan.config, source_label(src), dst.name)
            check_checkpoint(stage.path)  # what the loader checks before it builds a model
            stage.commit()
    return Summary(
        src_path,
        dst,
        time.perf_counter() - start,
        plan.read_bytes,
        plan.write_bytes,
        plan.params,
        [s.name for s in shards],
        stage.notes + plan.notes,
    )


def source_label(src: str | Path) -> str:
    """How the model card names the source: a hub id as given, a local folder by its name
    only (the card is published; the machine's paths are nobody's business)."""
    path = Path(src).expanduser()
    return real_path(path).name if path.exists() else str(src)


def resolve_source(src: str | Path) -> Path:
    """A local folder, or a hub repo id (fetched, or found offline in the local cache)."""
    from mlx_deepseek.loading import resolve_model_path

    return Path(resolve_model_path(src)).absolute()


def check_checkpoint(folder: Path) -> None:
    """The loader's checks (config, files, headers, layers) on the output before it is
    published: nothing is written that `load` would refuse."""
    from mlx_deepseek.loading import check_checkpoint as loader_checks

    loader_checks(folder)


@dataclass(frozen=True)
class Chunk:
    """Rows [r0, r1) of one job's source tensor (the whole tensor for a kv_b split)."""

    job: Job
    r0: int
    r1: int


def chunks(plan: Plan) -> Iterator[Chunk]:
    for job in plan.jobs:
        info = job.src
        if job.entry.kind == "kv_b" or len(info.shape) < 2:
            yield Chunk(job, 0, info.rows)
            continue
        step = max(1, CHUNK_ELEMENTS // info.shape[-1])
        if job.fmt == "fp8" and job.packed is None:
            br = plan.block[0]
            step = max(br, step // br * br)  # FP8 chunks start on block rows
        for r0 in range(0, info.rows, step):
            yield Chunk(job, r0, min(info.rows, r0 + step))


def run_jobs(source: SourceCheckpoint, plan: Plan, writer: ShardWriter, progress: Progress) -> None:
    """Convert every chunk in order; a reader thread fetches the next chunk meanwhile."""
    previous = mx.set_cache_limit(256 << 20)  # freed chunks go back to the OS, not a cache
    todo = list(chunks(plan))
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="convert-read") as reader:
            pending = reader.submit(_read, source, plan, todo[0]) if todo else None
            for i, chunk in enumerate(todo):
                w, scale = pending.result()
                if i + 1 < len(todo):  # the only thread that reads the source from here on
                    pending = reader.submit(_read, source, plan, todo[i + 1])
                if chunk.job.entry.kind == "kv_b":
                    _split_kv_b(plan, chunk.job, w, scale, writer)
                else:
                    _convert_rows(plan, chunk, w, scale, writer)
                progress(w.nbytes + (scale.nbytes if scale is not None else 0))
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()


def _read(
    source: SourceCheckpoint, plan: Plan, chunk: Chunk
) -> tuple[np.ndarray, np.ndarray | None]:
    job = chunk.job
    w = source.read_raw(job.src, chunk.r0, chunk.r1)
    if job.scale is None:
        return w, None
    if job.packed is not None or job.fmt == "fp4":  # one row of scales per weight row
        return w, source.read_raw(job.scale, chunk.r0, chunk.r1)
    br = plan.block[0]
    return w, source.read_raw(job.scale, chunk.r0 // br, -(-chunk.r1 // br))


def _convert_rows(
    plan: Plan, chunk: Chunk, raw: np.ndarray, scale: np.ndarray | None, writer: ShardWriter
) -> None:
    job, e = chunk.job, chunk.job.entry
    module, spec = next(iter(job.specs.items())) if job.specs else (None, None)
    row = chunk.r0 + (e.expert * job.src.rows if e.expert is not None else 0)  # in [E*out, in]
    if job.packed is not None and spec is not None:  # the packed words as they are
        s = to_mlx(scale, job.scale.dtype).astype(job.dtype)  # exact (plan.check_scale_dtype)
        q, s, b = to_affine(to_mlx(raw, job.src.dtype), s, job.packed)
        _write_quantized(writer, module, (q, s, b), row)
        return
    if e.kind == "table":
        writer.write(e.out, _table(plan, job, raw), chunk.r0)
        return
    if job.fmt == "fp4" and spec is not None and spec.mode == "mxfp4":
        # FP4 e2m1 two per byte, low nibble first, + E8M0 per 32 IS MLX's mxfp4: as read
        writer.write(f"{module}.weight", mx.array(raw.view(np.uint8)).view(mx.uint32), row)
        writer.write(f"{module}.scales", mx.array(scale), row)
        return
    w = _decoded(plan, job, raw, scale)
    if spec is None or spec.mode == "affine":
        w = w.astype(job.dtype)  # mxfp8 / mxfp4 quantize the exact float32 values
    if spec is None:
        mx.eval(w)
        writer.write(e.out if module is None else f"{module}.weight", w, row)
        return
    _write_quantized(
        writer, module, mx.quantize(w, spec.group_size, spec.bits, mode=spec.mode), row
    )


def _decoded(plan: Plan, job: Job, raw: np.ndarray, scale: np.ndarray | None) -> mx.array:
    """A chunk's values: FP8 / FP4 / packed integers decoded to float32, floating point as
    stored."""
    w = to_mlx(raw, job.src.dtype)
    if scale is None:
        return w
    s = to_mlx(scale, job.scale.dtype)
    if job.packed is not None:
        return dequantize_packed(w, s, job.packed)
    if job.fmt == "fp4":
        packed = mx.array(raw.view(np.uint8)).view(mx.uint32)
        return mx.dequantize(packed, s, group_size=FP4_GROUP, bits=4, mode="mxfp4",
                             dtype=mx.float32)  # fmt: skip
    if job.scale.dtype in E8M0:
        s = e8m0_to_float(s)
    return dequantize_fp8(w, s, plan.block)


def _write_quantized(writer: ShardWriter, module: str, parts, row: int) -> None:
    """mx.quantize's (weight, scales[, biases]) evaluated and written at `row`."""
    mx.eval(*parts)
    for name, part in zip(("weight", "scales", "biases"), parts, strict=False):
        writer.write(f"{module}.{name}", part, row)


def _table(plan: Plan, job: Job, raw: np.ndarray) -> mx.array:
    """V4's token -> experts table as int32, every entry an expert of the layer."""
    E = plan.args.n_routed_experts
    bad = (raw < 0) | (raw >= E)
    if bad.any():
        value = int(raw[bad].flat[0])
        raise CheckpointError(
            f"{job.src.file.name}: tensor {job.src.name} routes to expert {value}, but "
            f"config.json says n_routed_experts={E}: the checkpoint and config do not match"
        )
    return mx.array(raw.astype(np.int32))


def _split_kv_b(
    plan: Plan, job: Job, raw: np.ndarray, scale: np.ndarray | None, writer: ShardWriter
) -> None:
    """V3's kv_b_proj [H*(nope+v), rank] -> embed_q [H, rank, nope] and unembed_out [H, v, rank]."""
    args = plan.args
    w = _decoded(plan, job, raw, scale)
    nope = args.qk_nope_head_dim
    w = w.astype(job.dtype).reshape(args.num_attention_heads, nope + args.v_head_dim, -1)
    parts = (mx.contiguous(w[:, :nope, :].swapaxes(-1, -2)), mx.contiguous(w[:, nope:, :]))
    for (module, spec), t in zip(job.specs.items(), parts, strict=True):
        if spec is None:
            mx.eval(t)
            writer.write(f"{module}.weight", t)
        else:
            parts = mx.quantize(t, spec.group_size, spec.bits, mode=spec.mode)
            _write_quantized(writer, module, parts, 0)


def _check_space(dst: Path, need: int) -> None:
    where = dst.parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise DeepSeekError(
            f"{where} has {free / 1e9:.1f} GB free, but the output needs {need / 1e9:.1f} GB: "
            "free some space or choose another -o location"
        )


def metadata_files(src: Path) -> list[Path]:
    """The tokenizer, chat template and generation config files to copy; a symlink to a file
    outside the checkpoint is refused (it would be copied into DST, and maybe uploaded)."""
    from mlx_deepseek.checkpoint_files import checkpoint_root

    root = checkpoint_root(src)
    files = []
    for pattern in COPY_PATTERNS:
        for f in sorted(src.glob(pattern)):
            real = real_path(f)
            if f.is_symlink() and root not in real.parents:
                raise DeepSeekError(
                    f"{f}: a symlink to {real}, outside the checkpoint's folder: refused (it "
                    "would be copied into the output); copy the file into the folder"
                )
            if f.is_file():
                files.append(f)
    return files


def write_metadata(folder: Path, src: Path, config: dict, src_name: str, title: str) -> None:
    """config.json (mlx-lm's writer: sorted, quantization mirrored into quantization_config),
    the tokenizer, chat template and generation config, and a model card."""
    from mlx_lm.utils import save_config

    save_config(dict(config), folder / "config.json")
    for f in metadata_files(src):
        shutil.copy2(f, folder / f.name)
    q = config.get("quantization")
    how = f"{q['bits']}-bit affine, group size {q['group_size']}" if q else "unquantized"
    modes = {v["mode"] for v in (q or {}).values() if isinstance(v, dict) and "mode" in v}
    if modes - {"affine"}:
        how += "; " + " and ".join(sorted(modes - {"affine"})) + " where the source was FP4/FP8"
    (folder / "README.md").write_text(
        "---\nlibrary_name: mlx\ntags:\n- mlx\n- deepseek\npipeline_tag: text-generation\n---\n\n"
        f"# {title}\n\n"
        f"Converted from `{src_name}` with `mlx-deepseek convert` ({how}).\n\n"
        "```bash\npip install mlx-deepseek\nmlx-deepseek chat <this repo>\n```\n"
    )


def upload(folder: Path, repo: str) -> str:
    """Upload a converted folder to the Hugging Face hub; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_large_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as e:  # auth, network, permissions: the conversion itself is kept
        raise DeepSeekError(
            f"upload to {repo} failed ({type(e).__name__}: {e}); the conversion is kept at "
            f"{folder}: run `huggingface-cli login` and upload it with huggingface-cli upload"
        ) from None
    return f"https://huggingface.co/{repo}"
