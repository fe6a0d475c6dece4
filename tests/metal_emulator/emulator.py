"""`metal_kernel`: a drop-in for `mx.fast.metal_kernel` that runs the kernel on the CPU.

The call mirrors MLX's: `kernel(inputs=..., output_shapes=..., output_dtypes=..., grid=...,
threadgroup=..., template=[...])`; it returns mx arrays when given mx arrays or mx dtypes, and
NumPy arrays otherwise (bfloat16 outputs then come back widened to float32). Outputs start as
NaN, so an element the kernel never writes, or one computed from threadgroup memory read
before it was written (a missing barrier), is reported as an error.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from . import compiler
from .compiler import MetalEmulatorError
from .signature import Arg, TemplateArg, emulator_source, shape_infos, write_signature

# canonical dtype name -> (MLX's Metal type name, NumPy storage dtype)
DTYPES = {
    "float32": ("float", np.float32),
    "float16": ("float16_t", np.float16),
    "bfloat16": ("bfloat16_t", np.uint16),  # NumPy has no bfloat16: its bits
    "bool": ("bool", np.bool_),
    # the integers: `<name>_t` in Metal, NumPy's dtype of the same name
    **{
        name: (f"{name}_t", getattr(np, name))
        for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    },
}
FLOATS = ("float32", "float16", "bfloat16")
MAX_THREADS_PER_THREADGROUP = 1024


def _mx():
    import mlx.core as mx

    return mx


def dtype_name(d) -> str:
    """Canonical name of an mx.Dtype, NumPy dtype/type or string."""
    if isinstance(d, str):
        name = d
    elif type(d).__module__.startswith("mlx"):
        name = str(d).rsplit(".", 1)[-1]
    else:
        name = np.dtype(d).name
    name = {"bool_": "bool"}.get(name, name)
    if name not in DTYPES:
        raise MetalEmulatorError(f"dtype {d!r} is not supported by the emulator")
    return name


def _to_numpy(a) -> tuple[np.ndarray, str, bool]:
    """(row-contiguous storage array, canonical dtype, came from mlx)."""
    if type(a).__module__.startswith("mlx"):
        mx = _mx()
        name = dtype_name(a.dtype)
        arr = np.array(a.view(mx.uint16) if name == "bfloat16" else a)
        return np.array(arr, order="C"), name, True
    arr = np.asarray(a)
    return np.array(arr, order="C"), dtype_name(arr.dtype), False


def _has_nan(arr: np.ndarray, name: str) -> np.ndarray:
    if name == "bfloat16":
        return (arr & 0x7FFF) > 0x7F80
    return np.isnan(arr)


def _template_args(template) -> list[TemplateArg]:
    out = []
    for name, value in template or ():
        if isinstance(value, bool):
            out.append(TemplateArg(name, "bool", "1" if value else "0"))
        elif isinstance(value, int | np.integer):
            out.append(TemplateArg(name, "int", str(int(value))))
        else:
            out.append(TemplateArg(name, "typename", DTYPES[dtype_name(value)][0]))
    return out


@dataclass
class _Buffer:
    name: str
    data: np.ndarray  # storage
    dtype: str
    is_output: bool
    ptr: int = 0


class EmulatedKernel:
    """One `metal_kernel` definition; compiled per distinct template/dtype instantiation."""

    def __init__(
        self,
        name,
        input_names,
        output_names,
        source,
        header="",
        ensure_row_contiguous=True,
        atomic_outputs=False,
        compile_options=None,
    ):
        if not output_names:
            raise MetalEmulatorError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.atomic_outputs = atomic_outputs
        # Inputs are always copied row-contiguous here; with ensure_row_contiguous=False the
        # kernel then sees contiguous strides, one valid case of what MLX may pass.
        self.ensure_row_contiguous = ensure_row_contiguous

    def sources(self, inputs, output_dtypes, template=None) -> tuple[str, str]:
        """(the Metal source MLX would compile, the C++ the emulator compiles)."""
        arrays = [_to_numpy(a)[:2] for a in inputs]
        return self._sources(arrays, output_dtypes, template)

    def _sources(self, arrays, output_dtypes, template) -> tuple[str, str]:
        ins = [
            Arg(n, DTYPES[dt][0], arr.ndim, arr.size)
            for n, (arr, dt) in zip(self.input_names, arrays, strict=True)
        ]
        outs = [
            Arg(n, DTYPES[dtype_name(d)][0])
            for n, d in zip(self.output_names, output_dtypes, strict=True)
        ]
        targs = _template_args(template)
        args = (ins, outs, targs, self.atomic_outputs)
        metal = write_signature(f"custom_kernel_{self.name}", self.header, self.source, *args)
        cpp = emulator_source(self.name, self.header, self.source, *args)
        return metal, cpp

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
        check_nan=True,
        schedule="forward",
    ):
        """Runs the kernel; `check_nan` and `schedule` ("forward" or "reverse": the order in
        which threads run between rendezvous points) are the emulator's own."""
        n_out = len(self.output_names)
        if len(inputs) != len(self.input_names):
            raise MetalEmulatorError(
                f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} "
                f"but got size {len(inputs)}."
            )
        if len(output_shapes) != n_out or len(output_dtypes) != n_out:
            raise MetalEmulatorError("[metal_kernel] output_shapes/output_dtypes do not match.")
        grid, tg = tuple(int(g) for g in grid), tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(tg) != 3 or min(grid + tg) < 1:
            raise MetalEmulatorError(f"grid {grid} and threadgroup {tg} need 3 positive sizes")
        threads = np.prod([min(t, g) for t, g in zip(tg, grid, strict=True)])  # MLX clamps
        if threads > MAX_THREADS_PER_THREADGROUP:
            raise MetalEmulatorError(
                f"threadgroup {tg} has {threads} threads; Metal allows at most "
                f"{MAX_THREADS_PER_THREADGROUP}"
            )
        converted = [_to_numpy(a) for a in inputs]
        want_mx = any(c[2] for c in converted)
        want_mx |= any(type(d).__module__.startswith("mlx") for d in output_dtypes)
        metal, cpp = self._sources([c[:2] for c in converted], output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{metal}\n```")
        lib = compiler.load(compiler.compile_kernel(cpp, self.name))

        buffers: list[_Buffer] = []
        infos = shape_infos(self.source, self.input_names)
        for n, (arr, dt, _), (sh, st, nd) in zip(self.input_names, converted, infos, strict=True):
            buffers.append(_Buffer(n, arr, dt, False))
            if arr.ndim > 0:
                strides = [s // arr.itemsize for s in arr.strides]
                extra = (
                    (sh, "_shape", np.array(arr.shape, np.int32)),
                    (st, "_strides", np.array(strides, np.int64)),
                    (nd, "_ndim", np.array(arr.ndim, np.int32)),
                )
                for wanted, suffix, val in extra:
                    if wanted:
                        buffers.append(_Buffer(n + suffix, val, dtype_name(val.dtype), False))
        for n, shape, d in zip(self.output_names, output_shapes, output_dtypes, strict=True):
            dt = dtype_name(d)
            store = DTYPES[dt][1]
            if init_value is None:  # NaN in every float type
                nbytes = int(np.prod(shape)) * np.dtype(store).itemsize
                arr = np.frombuffer(b"\xff" * nbytes, store).reshape(tuple(shape)).copy()
            else:
                arr = _from_float(np.full(tuple(shape), init_value, np.float32), dt)
            buffers.append(_Buffer(n, arr, dt, True))

        self._run(lib, buffers, grid, tg, schedule)
        if check_nan:
            self._check_nan(buffers)
        return [_convert_out(b.data, b.dtype, want_mx) for b in buffers if b.is_output]

    def _check_nan(self, buffers: list[_Buffer]) -> None:
        floats = [b for b in buffers if b.dtype in FLOATS]
        if any(_has_nan(b.data, b.dtype).any() for b in floats if not b.is_output):
            return  # NaN may legitimately flow from the inputs
        for b in floats:
            bad = _has_nan(b.data, b.dtype) if b.is_output else None
            if bad is not None and bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise MetalEmulatorError(
                    f"kernel '{self.name}': output '{b.name}' has {int(bad.sum())} of "
                    f"{b.data.size} elements NaN (first at {first}). Outputs and threadgroup "
                    "memory start as NaN: an element was never written, or was computed from "
                    "threadgroup memory read before it was written (a missing "
                    "threadgroup_barrier?)"
                )

    def _run(self, lib, buffers: list[_Buffer], grid, tg, schedule: str) -> None:
        ptrs = (ctypes.c_void_p * max(1, len(buffers)))()
        try:
            for i, b in enumerate(buffers):
                b.ptr = lib.msl_alloc_guarded(b.data.nbytes)
                if not b.ptr:
                    raise MemoryError("msl_alloc_guarded")
                ctypes.memmove(b.ptr, b.data.ctypes.data, b.data.nbytes)
                ptrs[i] = b.ptr
            err = ctypes.create_string_buffer(2048)
            fault = ctypes.c_size_t(0)
            rc = lib.msl_run(
                ptrs,
                (ctypes.c_uint * 3)(*grid),
                (ctypes.c_uint * 3)(*tg),
                int(schedule == "reverse"),
                err,
                len(err),
                ctypes.byref(fault),
            )
            message = err.value.decode(errors="replace")
            if rc == 2:
                message = _describe_fault(message, fault.value, buffers)
            if rc:
                raise MetalEmulatorError(f"kernel '{self.name}': {message}")
            for b in buffers:
                if b.is_output:
                    ctypes.memmove(b.data.ctypes.data, b.ptr, b.data.nbytes)
        finally:
            for b in buffers:
                if b.ptr:
                    lib.msl_free_guarded(b.ptr, b.data.nbytes)
                    b.ptr = 0


def _describe_fault(message: str, addr: int, buffers: list[_Buffer]) -> str:
    for b in buffers:
        padded = (b.data.nbytes + 15) // 16 * 16
        if b.ptr <= addr < b.ptr + padded + 4096:
            kind = "output" if b.is_output else "input"
            prefix = message.split("invalid memory access")[0]
            return (
                f"{prefix}{kind} '{b.name}' accessed out of bounds at byte {addr - b.ptr} "
                f"(the buffer holds {b.data.nbytes} bytes: {b.data.size} x {b.dtype})"
            )
    return message


def _from_float(arr: np.ndarray, dt: str) -> np.ndarray:
    if dt == "bfloat16":
        u = arr.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return arr.astype(DTYPES[dt][1])


def _convert_out(arr: np.ndarray, dt: str, want_mx: bool):
    if want_mx:
        mx = _mx()
        out = mx.array(arr)
        return out.view(mx.bfloat16) if dt == "bfloat16" else out
    if dt == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def metal_kernel(
    name: str,
    input_names,
    output_names,
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options=None,
) -> EmulatedKernel:
    """Same arguments as `mx.fast.metal_kernel`; the kernel runs in the CPU emulator."""
    return EmulatedKernel(
        name,
        input_names,
        output_names,
        source,
        header,
        ensure_row_contiguous,
        atomic_outputs,
        compile_options,
    )
