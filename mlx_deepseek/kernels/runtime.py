"""The Metal kernel runtime: what every kernel family builds on.

- `KernelSpec`: one `mx.fast.metal_kernel` launch (source, template, geometry, outputs);
  `launch(spec, inputs)` runs it, each source compiled once per template instantiation.
  `row_kernel(...)` builds the spec of the common shape: one threadgroup per row (token).
- `Launch`: what a family's planner returns for given arrays: the variant (everything the
  compiled kernel depends on, for the first-use self-check) and `run()`; a planner raises
  `Unsupported` when its kernels do not apply (the dispatcher, mlx_deepseek/ops/metal.py,
  then uses MLX's path and logs why at debug level).
- `pretend_metal(make_outputs)` lets a machine without Metal build the graph a Mac would run
  (for counting primitives): each launch's outputs come from `make_outputs(spec, inputs)`.
- Checks shared by the planners: `affine` (MLX's affine-quantized layer), `quant_format`
  (affine or mxfp4), `token_count`.

Sources live in the top-level metal_kernels/ folder (package data `mlx_deepseek.metal_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

import mlx.core as mx
import mlx.nn as nn

MAX_TOKENS = 8  # the decode kernels take 1-8 tokens (decode, speculative verification)
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
COMMON_HEADERS = ("moe_common.h", "fused_common.h")

MakeKernel = Callable[..., Callable[..., list]]
MakeOutputs = Callable[["KernelSpec", Sequence[mx.array]], list[mx.array]]


class Unsupported(Exception):
    """A kernel does not apply to these arguments (the reason is logged at debug level)."""


@dataclass(frozen=True)
class KernelSpec:
    """One kernel launch: what `mx.fast.metal_kernel` and its call take."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: tuple[tuple[str, object], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]
    ensure_row_contiguous: bool = True

    def definition(self) -> dict:
        return {
            "name": self.name,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "source": self.source,
            "header": self.header,
            "ensure_row_contiguous": self.ensure_row_contiguous,
        }

    def launch(self) -> dict:
        return {
            "grid": self.grid,
            "threadgroup": self.threadgroup,
            "template": list(self.template),
            "output_shapes": [list(s) for s in self.output_shapes],
            "output_dtypes": list(self.output_dtypes),
        }


@dataclass(frozen=True)
class Launch:
    """A planned fused call: `run()` gives the outputs; `variant` keys the self-check."""

    variant: Hashable
    run: Callable[[], list[mx.array]]
    dtype: mx.Dtype  # the activations' (the self-check's tolerance depends on it)
    # the self-check's comparison (got, reference) -> (max error, scale); None: elementwise
    compare: Callable[[list, list], tuple[float, float]] | None = None


_sources: dict[str, str] = {}


def source(filename: str) -> str:
    """The text of a file in metal_kernels/ (read once)."""
    if filename not in _sources:
        files = resources.files("mlx_deepseek.metal_kernels")
        _sources[filename] = files.joinpath(filename).read_text()
    return _sources[filename]


def header(*files: str) -> str:
    """The shared headers a kernel needs, concatenated (passed as `header`)."""
    return "".join(source(f) + "\n" for f in files)


def threads_for(n: int) -> int:
    """Threads per threadgroup for a row of n values: ~4 values each, 32 to 1024."""
    return min(1024, 32 * max(1, -(-n // 128)))


def row_kernel(
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    source_text: str,
    template: Sequence[tuple[str, object]],
    rows: int,
    width: int,
    output_shapes: Sequence[tuple[int, ...]],
    output_dtypes: Sequence[mx.Dtype],
) -> KernelSpec:
    """A kernel with one threadgroup per row (token) of `width` values, NTH threads each
    (NTH is appended to the template), with the common headers."""
    nth = threads_for(width)
    return KernelSpec(
        name=name,
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        source=source_text,
        header=header(*COMMON_HEADERS),
        grid=(nth, rows, 1),
        threadgroup=(nth, 1, 1),
        template=(*template, ("NTH", nth)),
        output_shapes=tuple(output_shapes),
        output_dtypes=tuple(output_dtypes),
    )


_kernels: dict[tuple, Callable] = {}


def _kernel(make_kernel: MakeKernel, spec: KernelSpec) -> Callable:
    # One kernel object per source; MLX compiles (and caches) each template instantiation.
    key = (make_kernel, spec.name, spec.source, spec.header, spec.ensure_row_contiguous)
    if key not in _kernels:
        _kernels[key] = make_kernel(**spec.definition())
    return _kernels[key]


class _State:
    pretend: MakeOutputs | None = None  # set by pretend_metal()


def launch(
    spec: KernelSpec, inputs: Sequence[mx.array], make_kernel: MakeKernel | None = None
) -> list[mx.array]:
    """One dispatch of `spec`; make_kernel defaults to mx.fast.metal_kernel (tests pass the CPU
    emulator's drop-in). Inside pretend_metal() the outputs are its stand-ins."""
    if make_kernel is None and _State.pretend is not None:
        return list(_State.pretend(spec, inputs))
    make_kernel = make_kernel or mx.fast.metal_kernel
    return _kernel(make_kernel, spec)(inputs=list(inputs), **spec.launch())


def available() -> bool:
    """Whether this machine can run the kernels at all (MLX's Metal back-end)."""
    return mx.metal.is_available()


def pretending() -> bool:
    """Inside pretend_metal(): launches give stand-in outputs and nothing is self-checked."""
    return _State.pretend is not None


@contextmanager
def pretend_metal(make_outputs: MakeOutputs) -> Iterator[None]:
    """Build graphs as on a Mac with the kernels: every launch's outputs are
    make_outputs(spec, inputs) (e.g. one placeholder node). Graphs built inside are for
    inspection: they do not compute the kernels' results. Use with ops.use("metal")."""
    if _State.pretend is not None:
        raise RuntimeError("pretend_metal() does not nest")
    _State.pretend = make_outputs
    try:
        yield
    finally:
        _State.pretend = None


# ---- checks the planners share ---------------------------------------------------------------


def affine(layer: nn.Module, what: str) -> tuple[int, int]:
    """(bits, group size) of an affine-quantized layer without a bias, else Unsupported."""
    if "scales" not in layer:
        raise Unsupported(f"{what} is not quantized")
    if getattr(layer, "mode", "affine") != "affine" or layer.get("biases") is None:
        raise Unsupported(f"{what} is not affine-quantized")
    if getattr(layer, "global_scale", None) is not None or "bias" in layer:
        raise Unsupported(f"{what} has a global scale or a bias")
    bits, group = int(layer.bits), int(layer.group_size)
    if bits not in SUPPORTED_BITS or group not in SUPPORTED_GROUP_SIZES:
        raise Unsupported(f"{what}: bits={bits} group_size={group} not supported")
    return bits, group


def quant_format(layer: nn.Module, what: str) -> tuple[int, int, str]:
    """(bits, group size, mode) of a layer quantized in MLX's affine format or as mxfp4
    (DeepSeek V4's routed experts: E2M1 values, an E8M0 scale per 32, no biases), else
    Unsupported."""
    mode = getattr(layer, "mode", "affine") if "scales" in layer else None
    if mode != "mxfp4":
        return (*affine(layer, what), "affine")
    if layer.get("biases") is not None or "bias" in layer:
        raise Unsupported(f"{what} (mxfp4) has biases")
    if int(layer.bits) != 4 or int(layer.group_size) != 32:
        raise Unsupported(f"{what}: mxfp4 with bits={layer.bits} group_size={layer.group_size}")
    if layer.scales.dtype != mx.uint8:
        raise Unsupported(f"{what}: mxfp4 scales of dtype {layer.scales.dtype}")
    return 4, 32, "mxfp4"


def check_shape(a: mx.array, shape: tuple[int, ...], what: str) -> None:
    if tuple(a.shape) != shape:
        raise Unsupported(f"{what} has shape {tuple(a.shape)}, expected {shape}")


def check_quantized(layer: nn.Module, lead: tuple[int, ...], out: int, k: int, q, what: str):
    """The weight/scales/biases of a quantized [*lead, out, k] matrix have their shapes
    (q: (bits, group size) or (bits, group size, mode); mxfp4 has no biases)."""
    bits, group = q[:2]
    check_shape(layer.weight, (*lead, out, k * bits // 32), f"{what}.weight")
    check_shape(layer.scales, (*lead, out, k // group), f"{what}.scales")
    if len(q) < 3 or q[2] == "affine":
        check_shape(layer.biases, (*lead, out, k // group), f"{what}.biases")


def token_count(x: mx.array) -> int:
    """Tokens in x [..., D], or Unsupported when the decode kernels do not take that many."""
    n = x.size // x.shape[-1] if x.ndim and x.shape[-1] else 0
    if not 1 <= n <= MAX_TOKENS:
        raise Unsupported(f"{n} tokens (the kernels take 1 to {MAX_TOKENS})")
    return n


def float_params(*values: float) -> mx.array:
    return mx.array(values, dtype=mx.float32)
