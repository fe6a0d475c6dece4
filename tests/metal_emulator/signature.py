"""The kernel source MLX builds around a `mx.fast.metal_kernel` body, and its emulator twin.

`write_signature` reproduces MLX's `write_signature` (mlx/backend/metal/custom_kernel.cpp):
header, template list, `[[kernel]] void name(...)` with inputs in `device` (or `constant` when
they have fewer than 8 elements, `&` for scalars), `<input>_shape/_strides/_ndim` buffers only
when the body names them, outputs, then the Metal attributes the body names, then the body.
`emulator_source` is the same text made compilable by clang: `#include "msl.h"`, `#line`
markers so errors point at the body, threadgroup arrays moved into the runtime's arena, and an
entry point that calls the kernel with one thread's attribute values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CONSTANT_ARRAY_SIZE = 8  # inputs with fewer elements are passed in `constant`

# (attribute, type, how the emulator's msl_ids provides it), in MLX's order.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint", "id->dnqg"),
    ("dispatch_simdgroups_per_threadgroup", "uint", "id->dnsg"),
    ("dispatch_threads_per_threadgroup", "uint3", "id->dtptg"),
    ("grid_origin", "uint3", "zero"),
    ("grid_size", "uint3", "id->grid"),
    ("quadgroup_index_in_threadgroup", "uint", "id->qgid"),
    ("quadgroups_per_threadgroup", "uint", "id->nqg"),
    ("simdgroup_index_in_threadgroup", "uint", "id->sgid"),
    ("simdgroups_per_threadgroup", "uint", "id->nsg"),
    ("thread_execution_width", "uint", "32u"),
    ("thread_index_in_quadgroup", "uint", "id->qlane"),
    ("thread_index_in_simdgroup", "uint", "id->lane"),
    ("thread_index_in_threadgroup", "uint", "id->tiitg"),
    ("thread_position_in_grid", "uint3", "id->tpig"),
    ("thread_position_in_threadgroup", "uint3", "id->tpitg"),
    ("threadgroup_position_in_grid", "uint3", "id->tgpig"),
    ("threadgroups_per_grid", "uint3", "id->tgpg"),
    ("threads_per_grid", "uint3", "id->grid"),
    ("threads_per_simdgroup", "uint", "32u"),
    ("threads_per_threadgroup", "uint3", "id->tptg"),
)


@dataclass(frozen=True)
class Arg:
    """One kernel input or output as the signature sees it."""

    name: str
    type_name: str  # MLX's spelling: float, float16_t, bfloat16_t, uint32_t, ...
    ndim: int = 1
    size: int = 8


@dataclass(frozen=True)
class TemplateArg:
    name: str
    kind: str  # "typename", "int" or "bool"
    text: str  # the value as MLX prints it: a type name, a decimal, 1 or 0


def attributes_used(source: str) -> list[tuple[str, str, str]]:
    # MLX looks for the attribute names as plain substrings of the body.
    return [a for a in METAL_ATTRIBUTES if a[0] in source]


def shape_infos(source: str, input_names: list[str]) -> list[tuple[bool, bool, bool]]:
    return [
        (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
        for n in input_names
    ]


def _params(
    inputs: list[Arg], outputs: list[Arg], source: str, atomic_outputs: bool
) -> tuple[list[str], list[tuple[str, str]]]:
    """Parameter lines as MLX writes them, and how the emulator entry fills each one."""
    lines: list[str] = []
    fills: list[tuple[str, str]] = []  # (kind, C type) per buffer; kind: ptr, ref
    infos = shape_infos(source, [a.name for a in inputs])
    index = 0
    for arg, (has_shape, has_strides, has_ndim) in zip(inputs, infos, strict=True):
        space = "constant" if arg.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arg.ndim == 0 else "*"
        lines.append(f"  const {space} {arg.type_name}{ref} {arg.name} [[buffer({index})]]")
        fills.append(("ref" if ref == "&" else "ptr", f"const {space} {arg.type_name}"))
        index += 1
        if arg.ndim > 0:
            for wanted, ctype, suffix, kind in (
                (has_shape, "int", "_shape", "ptr"),
                (has_strides, "int64_t", "_strides", "ptr"),
                (has_ndim, "int", "_ndim", "ref"),
            ):
                if wanted:
                    ref = "&" if kind == "ref" else "*"
                    lines.append(
                        f"  const constant {ctype}{ref} {arg.name}{suffix} [[buffer({index})]]"
                    )
                    fills.append((kind, f"const constant {ctype}"))
                    index += 1
    for arg in outputs:
        t = f"atomic<{arg.type_name}>" if atomic_outputs else arg.type_name
        lines.append(f"  device {t}* {arg.name} [[buffer({index})]]")
        fills.append(("ptr", f"device {t}"))
        index += 1
    return lines, fills


def _signature(
    func_name: str,
    source: str,
    inputs: list[Arg],
    outputs: list[Arg],
    template: list[TemplateArg],
    atomic_outputs: bool,
) -> str:
    text = ""
    if template:
        text += "template <" + ", ".join(f"{t.kind} {t.name}" for t in template) + ">\n"
    text += f"[[kernel]] void {func_name}(\n"
    lines, _ = _params(inputs, outputs, source, atomic_outputs)
    attrs = attributes_used(source)
    # MLX closes the list after the output whose *buffer index* reaches inputs + outputs - 1
    # (shape buffers included); reproduced as is.
    n_in, n_out = len(inputs), len(outputs)
    first_output = len(lines) - n_out
    for i, line in enumerate(lines):
        text += line
        if i < first_output:
            text += ",\n"
        elif i < n_in + n_out - 1 or attrs:
            text += ",\n"
        else:
            text += ") {\n"
    for i, (name, type_name, _) in enumerate(attrs):
        text += f"  {type_name} {name} [[{name}]]"
        text += ",\n" if i < len(attrs) - 1 else ") {\n"
    return text


def write_signature(
    func_name: str,
    header: str,
    source: str,
    inputs: list[Arg],
    outputs: list[Arg],
    template: list[TemplateArg],
    atomic_outputs: bool = False,
) -> str:
    """The full Metal source MLX compiles for this call (without MLX's prepended utils.h)."""
    sig = _signature(func_name, source, inputs, outputs, template, atomic_outputs)
    return header + sig + source + "\n}\n"


_TG_DECL = re.compile(
    r"((?:^|[;{}])[ \t]*)threadgroup[ \t]+([A-Za-z_][\w:<>, \t]*?)[ \t]+([A-Za-z_]\w*)[ \t]*"
    r"((?:\[[^\]\n]+\][ \t]*)*);",
    re.M,
)  # at the start of a line or after ; { }


def rewrite_threadgroup_arrays(text: str, first_site: int = 0) -> tuple[str, int]:
    """`threadgroup T name[N];` -> a reference into the per-threadgroup arena (same line)."""
    site = first_site

    def repl(m: re.Match) -> str:
        nonlocal site
        indent, type_name, name, dims = m.groups()
        alias = f"msl_tg_t{site}"
        out = (
            f"{indent}using {alias} = {type_name.strip()}{dims.strip()}; "
            f"threadgroup {alias}& {name} = *(threadgroup {alias}*)msl_tg_alloc({site}, "
            f'sizeof({alias}), alignof({alias}), "{name}", __FILE__, __LINE__);'
        )
        site += 1
        return out

    return _TG_DECL.sub(repl, text), site


def emulator_source(
    name: str,
    header: str,
    source: str,
    inputs: list[Arg],
    outputs: list[Arg],
    template: list[TemplateArg],
    atomic_outputs: bool = False,
) -> str:
    """C++ for clang: the MLX source plus the entry point the runtime calls per thread."""
    func = f"custom_kernel_{name}"
    header2, sites = rewrite_threadgroup_arrays(header)
    body2, _ = rewrite_threadgroup_arrays(source, sites)
    sig = _signature(func, source, inputs, outputs, template, atomic_outputs)
    _, fills = _params(inputs, outputs, source, atomic_outputs)
    args = []
    for i, (kind, ctype) in enumerate(fills):
        args.append(f"*({ctype}*)b[{i}]" if kind == "ref" else f"({ctype}*)b[{i}]")
    for _, type_name, expr in attributes_used(source):
        if type_name == "uint3":
            args.append(
                "uint3(0u, 0u, 0u)" if expr == "zero" else f"uint3({expr}[0], {expr}[1], {expr}[2])"
            )
        else:
            args.append(f"(uint)({expr})")
    targs = "<" + ", ".join(t.text for t in template) + ">" if template else ""
    call = ",\n      ".join(args)
    return (
        '#include "msl.h"\n'
        f'#line 1 "{name}.header"\n{header2}\n'
        f'#line 1 "{name}.signature"\n{sig}'
        f'#line 1 "{name}.metal"\n{body2}\n}}\n'
        f'#line 1 "{name}.entry"\n'
        'extern "C" __attribute__((visibility("hidden")))\n'
        "void msl_thread_main(void* const* b, const msl_ids* id) {\n"
        f"  (void)id;\n  {func}{targs}(\n      {call});\n}}\n"
    )
