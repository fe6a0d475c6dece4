"""Mutators for the untrusted-files fuzz suite (test_fuzz_files.py).

Each mutator turns one part of a good tiny checkpoint into one bad input: a safetensors
header's bytes, an index entry, a config.json field. Cases are (id, mutate, expected
message part); the tests build them from here, so adding a mutator adds cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ---- the workspace before / after -----------------------------------------------------------


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every entry under `root` (symlinks not followed) -> what it is: "dir", "link:TARGET",
    "fifo", or its mode and sha256. Two digests differ iff something was added, removed or
    changed; `skip` drops top-level names (an expected output)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel.split(os.sep)[0] in skip:
                continue
            st = p.lstat()
            if p.is_symlink():
                out[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_fifo():
                out[rel] = "fifo"
            else:
                out[rel] = f"{st.st_mode:o}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


# ---- safetensors files --------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict[str, Any] | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def gguf_that_crashes_mlx() -> bytes:
    """88 bytes of GGUF whose first key claims 2**62 bytes: MLX's GGUF parser reads past
    the end of the file (SIGSEGV on mlx 0.32.4). Must never reach mx.load."""
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62)
    return (head + b"a" * 88)[:88]


def _first(h: dict[str, Any]) -> str:
    return next(k for k in h if k != "__metadata__")


def _two(h: dict[str, Any]) -> tuple[str, str]:
    names = [k for k in h if k != "__metadata__"]
    return names[0], names[1]


def _entry(**changes: Any) -> Callable[[dict, bytes], bytes]:
    def mutate(h: dict, body: bytes) -> bytes:
        h[_first(h)].update(changes)
        return join_safetensors(h, body)

    return mutate


def _whole(make: Callable[[dict, bytes], bytes]) -> Callable[[dict, bytes], bytes]:
    return make


def _overlap(partial: bool) -> Callable[[dict, bytes], bytes]:
    def mutate(h: dict, body: bytes) -> bytes:
        a, b = _two(h)
        # b takes a's bytes (partial: from the middle of a), keeping its own size
        start = h[a]["data_offsets"][0] + (
            (h[a]["data_offsets"][1] - h[a]["data_offsets"][0]) // 2 if partial else 0
        )
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [start, start + size]
        return join_safetensors(h, body)

    return mutate


def _shape_scaled(factor: int) -> Callable[[dict, bytes], bytes]:
    def mutate(h: dict, body: bytes) -> bytes:
        e = h[_first(h)]
        e["shape"] = [e["shape"][0] * factor, *e["shape"][1:]] if factor else [0, *e["shape"][1:]]
        return join_safetensors(h, body)

    return mutate


def _duplicate_name(h: dict, body: bytes) -> bytes:
    text = json.dumps(h)
    name = _first(h)
    entry = json.dumps(h[name])
    return join_safetensors(("{" + f'"{name}": {entry}, ' + text[1:]).encode(), body)


def _raw(header: bytes) -> Callable[[dict, bytes], bytes]:
    return lambda h, body: join_safetensors(header, body)


# (id, mutate(header, data section) -> file bytes, part of the one-line message)
HEADER_CASES: list[tuple[str, Callable[[dict, bytes], bytes], str]] = [
    ("empty-file", lambda h, b: b"", "too short for a safetensors file"),
    ("seven-bytes", lambda h, b: b"\x07" * 7, "too short for a safetensors file"),
    ("length-zero", lambda h, b: struct.pack("<Q", 0) + b"{}" + b, "not a safetensors file"),
    (
        "length-past-end",
        lambda h, b: struct.pack("<Q", 10**6) + json.dumps(h).encode(),
        "not a safetensors file, or truncated",
    ),
    ("length-2**63", lambda h, b: struct.pack("<Q", 2**63) + b, "not a safetensors file"),
    ("gguf-bytes", lambda h, b: gguf_that_crashes_mlx(), "not a safetensors file"),
    ("header-not-utf8", _raw(b'{"\xff\xfe": 1}'), "not UTF-8"),
    ("header-cut-json", _raw(b'{"a": {"dtype": "F32"'), "not valid JSON"),
    ("header-trailing-garbage", _raw(b"{} }"), "not valid JSON"),
    ("header-array", _raw(b"[1, 2]"), "JSON array, not an object"),
    ("header-string", _raw(b'"weights"'), "JSON string, not an object"),
    ("header-null", _raw(b"null"), "JSON null, not an object"),
    ("header-number", _raw(b"88"), "JSON number, not an object"),
    ("header-deep-nesting", _raw(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    ("header-5000-digit-int", _raw(b'{"t": {"shape": [' + b"9" * 5000 + b"]}}"), "not valid JSON"),
    ("duplicate-name", _duplicate_name, "twice"),
    ("entry-array", _whole(lambda h, b: join_safetensors({**h, _first(h): [1, 2]}, b)), "entry"),
    ("entry-null", _whole(lambda h, b: join_safetensors({**h, _first(h): None}, b)), "entry"),
    (
        "entry-without-shape",
        _whole(lambda h, b: join_safetensors({**h, _first(h): {"dtype": "F32"}}, b)),
        "entry",
    ),
    ("entry-extra-key", _entry(offset=0), "entry"),
    ("dtype-unknown", _entry(dtype="F9"), "unknown dtype"),
    ("dtype-lowercase", _entry(dtype="f32"), "unknown dtype"),
    ("dtype-number", _entry(dtype=4), "unknown dtype"),
    ("dtype-subbyte-F4", _entry(dtype="F4"), "unknown dtype"),
    ("dtype-null", _entry(dtype=None), "unknown dtype"),
    ("shape-negative", _entry(shape=[-1, 4]), "has shape"),
    ("shape-float", _entry(shape=[2.0, 4]), "has shape"),
    ("shape-string", _entry(shape=["2", "4"]), "has shape"),
    ("shape-bool", _entry(shape=[True, 4]), "has shape"),
    ("shape-2**40", _entry(shape=[2**40]), "has shape"),
    ("shape-not-list", _entry(shape=5), "has shape"),
    ("shape-null", _entry(shape=None), "has shape"),
    ("shape-wraps-int64", _entry(shape=[2**31 - 1] * 3), "needs"),
    ("shape-too-big-for-bytes", _shape_scaled(2), "needs"),
    ("shape-zero-for-bytes", _shape_scaled(0), "needs"),
    ("offsets-negative", _entry(data_offsets=[-64, 0]), "negative"),
    ("offsets-reversed", _entry(data_offsets=[64, 0]), "negative, or end before begin"),
    ("offsets-past-data", _entry(data_offsets=[0, 2**40]), "ends at byte"),
    ("offsets-three", _entry(data_offsets=[0, 4, 8]), "not [begin, end]"),
    ("offsets-strings", _entry(data_offsets=["0", "4"]), "not [begin, end]"),
    ("offsets-floats", _entry(data_offsets=[0.0, 4.0]), "not [begin, end]"),
    ("offsets-null", _entry(data_offsets=None), "not [begin, end]"),
    ("overlap-same-bytes", _overlap(partial=False), "share bytes"),
    ("overlap-partial", _overlap(partial=True), "share bytes"),
    (
        "metadata-number-value",
        lambda h, b: join_safetensors({**h, "__metadata__": {"format": 1}}, b),
        "__metadata__ must map strings to strings",
    ),
    (
        "metadata-array",
        lambda h, b: join_safetensors({**h, "__metadata__": ["pt"]}, b),
        "__metadata__ must map strings to strings",
    ),
    ("data-truncated", lambda h, b: join_safetensors(h, b[: len(b) // 2]), "ends at byte"),
]

# mutations a valid file survives: the checkpoint still loads and converts
HEADER_CONTROLS: list[tuple[str, Callable[[dict, bytes], bytes]]] = [
    ("metadata-null", lambda h, b: join_safetensors({**h, "__metadata__": None}, b)),
    ("trailing-bytes", lambda h, b: join_safetensors(h, b + b"\0" * 24)),
    ("header-padded", lambda h, b: join_safetensors(json.dumps(h).encode() + b"  \n ", b)),
]

# ---- config.json ----------------------------------------------------------------------------


def config_field_cases(fields: dict[str, Any]) -> list[tuple[str, str, Any, str]]:
    """(id, field, bad value, message part) for every field rule: a string where a number or
    boolean belongs, a value below the range, a float for an integer, a boolean for a
    number, a too-large size, a scalar where an object belongs."""
    from mlx_deepseek.models.config_fields import Bool, Int, Number, Obj, Str

    cases = []
    for i, (name, rule) in enumerate(fields.items()):
        if isinstance(rule, Int):
            bad = [("string", "64"), ("below", rule.low - 1)]
            bad.append([("float", 2.5), ("bool", True), ("huge", 2**40), ("list", [2])][i % 4])
        elif isinstance(rule, Number):
            bad = [("string", "1.5"), ("below", rule.low if rule.low > -1e308 else None)]
            bad.append(("bool", False))
        elif isinstance(rule, Bool):
            bad = [("string-false", "false"), ("int", 1), ("null", None)]
        elif isinstance(rule, Str):
            bad = [("number", 3), ("array", ["x"])]
        elif isinstance(rule, Obj):
            bad = [("string", "yarn"), ("array", [1])]
        else:  # pragma: no cover - a new rule kind needs its cases
            raise AssertionError(rule)
        for label, value in bad:
            if label == "below" and value is None:
                continue
            if value is None and getattr(rule, "nullable", False):
                continue
            cases.append((f"{name}-{label}", name, value, name))
    return cases


def _pump(out: Any, lines: queue.Queue) -> None:
    for line in out:
        lines.put(line)
    lines.put(None)


def _feed(stdin: Any, text: str) -> None:
    try:
        stdin.write(text)
        stdin.close()
    except OSError:  # the child died: its cases are reported from stdout
        pass


def run_worker(script: str, cases: list[dict[str, Any]], per_case: float = 120) -> dict[str, dict]:
    """Run `cases` (dicts with an "id") through a child process (script beside this file,
    one JSON line per case on stdin), so that a crash (a signal) or a hang (no answer within
    `per_case` seconds) costs that case, not the test run. Returns id -> the child's
    result, {"signal": N} or {"hung": True}."""
    worker = Path(__file__).with_name(script)
    results: dict[str, dict] = {}
    todo = list(cases)
    while todo:
        proc = subprocess.Popen(
            [sys.executable, str(worker)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        text = "".join(json.dumps(c) + "\n" for c in todo)
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        threading.Thread(target=_feed, args=(proc.stdin, text), daemon=True).start()
        started = None
        try:
            while (line := lines.get(timeout=per_case + 600 * (started is None))) is not None:
                msg = json.loads(line)
                if "started" in msg:
                    started = msg["id"]
                else:
                    results[msg.pop("id")] = msg
                    started = None
            proc.wait()
            if started is not None:  # the case the child died in
                results[started] = {"signal": -proc.returncode}
            elif proc.returncode != 0:
                raise RuntimeError(f"{script} failed with exit code {proc.returncode}")
        except queue.Empty:
            if started is None:
                raise RuntimeError(f"{script} did not start") from None
            results[started] = {"hung": True}
        finally:
            proc.kill()
            proc.wait()
        todo = [c for c in todo if c["id"] not in results]
    return results


# ---- index entries (model.safetensors.index.json) -----------------------------------------

INDEX = "model.safetensors.index.json"


def _index(folder: Path) -> dict[str, Any]:
    return json.loads((folder / INDEX).read_text())


def _write_index(folder: Path, index: Any) -> None:
    (folder / INDEX).write_text(json.dumps(index))


def _shards(folder: Path) -> list[str]:
    return sorted(set(_index(folder)["weight_map"].values()))


def _point(folder: Path, value: Any, which: int = 0) -> None:
    """Every tensor of shard `which` now names `value` as its file."""
    index = _index(folder)
    old = _shards(folder)[which]
    index["weight_map"] = {k: (value if v == old else v) for k, v in index["weight_map"].items()}
    _write_index(folder, index)


def _moved(where: Callable[[Path, Path], Path], name: Callable[[Path, Path, str], Any]):
    """Move shard 0 to where(folder, outside) and name it in the index as name(...)."""

    def mutate(folder: Path, outside: Path) -> None:
        shard = _shards(folder)[0]
        target = where(folder, outside) / shard
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder / shard, target)
        _point(folder, name(folder, outside, shard))

    return mutate


def _named(value: Any) -> Callable[[Path, Path], None]:
    return lambda folder, outside: _point(folder, value)


def _renamed(new_name: str, content: bytes | None = None) -> Callable[[Path, Path], None]:
    """Shard 0 saved as `new_name` (its own bytes, or `content`) and named so in the index."""

    def mutate(folder: Path, outside: Path) -> None:
        shard = folder / _shards(folder)[0]
        data = shard.read_bytes() if content is None else content
        shard.unlink()
        (folder / new_name).write_bytes(data)
        _point(folder, new_name)

    return mutate


def _replaced(make: Callable[[Path, Path, Path], None]) -> Callable[[Path, Path], None]:
    """Shard 0's path replaced by what make(path, folder, outside) puts there."""

    def mutate(folder: Path, outside: Path) -> None:
        shard = folder / _shards(folder)[0]
        shard.unlink()
        make(shard, folder, outside)

    return mutate


def _symlink_out(path: Path, folder: Path, outside: Path) -> None:
    outside.mkdir(exist_ok=True)
    (outside / path.name).write_bytes(b"")  # the symlink's target exists elsewhere
    path.symlink_to(outside / path.name)


def _symlink_gguf(path: Path, folder: Path, outside: Path) -> None:
    (folder / "evil.gguf").write_bytes(gguf_that_crashes_mlx())
    path.symlink_to("evil.gguf")


def _wrong_shard(folder: Path, outside: Path) -> None:
    index = _index(folder)
    first, second = _shards(folder)[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = second
    _write_index(folder, index)


def _edit_index(edit: Callable[[dict], Any]) -> Callable[[Path, Path], None]:
    return lambda folder, outside: _write_index(folder, edit(_index(folder)))


# (id, mutate(checkpoint folder, a folder outside it), part of the one-line message)
INDEX_CASES: list[tuple[str, Callable[[Path, Path], None], str]] = [
    (
        "dotdot-path",
        _moved(lambda f, o: o, lambda f, o, s: f"../{o.name}/{s}"),
        "not a plain file name",
    ),
    ("dotdot", _named(".."), "not a plain file name"),
    ("dot", _named("."), "not a plain file name"),
    (
        "absolute-path-to-the-shard",
        _moved(lambda f, o: o, lambda f, o, s: str(o / s)),
        "not a plain file name",
    ),
    ("absolute-etc-passwd", _named("/etc/passwd"), "not a plain file name"),
    ("subfolder", _moved(lambda f, o: f / "sub", lambda f, o, s: f"sub/{s}"), "not a plain file"),
    ("backslash", _named("..\\evil.safetensors"), "not a plain file name"),
    ("nul-byte", _named("model\x00.safetensors"), "not a plain file name"),
    ("empty-name", _named(""), "not a plain file name"),
    ("name-number", _named(7), "not a plain file name"),
    ("name-null", _named(None), "not a plain file name"),
    ("name-array", _named(["model.safetensors"]), "not a plain file name"),
    ("gguf", _renamed("model.gguf", gguf_that_crashes_mlx()), "is not a .safetensors file"),
    ("pytorch-bin", _renamed("pytorch_model.bin"), "is not a .safetensors file"),
    ("numpy-npz", _renamed("weights.npz"), "is not a .safetensors file"),
    ("no-suffix", _renamed("model"), "is not a .safetensors file"),
    ("symlink-outside", _replaced(_symlink_out), "outside the checkpoint's folder"),
    (
        "symlink-dev-zero",
        _replaced(lambda p, f, o: p.symlink_to("/dev/zero")),
        "outside the checkpoint's folder",
    ),
    (
        "symlink-dangling-outside",
        _replaced(lambda p, f, o: p.symlink_to(o / "nothing.safetensors")),
        "outside the checkpoint's folder",
    ),
    ("symlink-to-gguf-inside", _replaced(_symlink_gguf), "not a safetensors file"),
    ("fifo", _replaced(lambda p, f, o: os.mkfifo(p)), "not a regular file"),
    ("directory", _replaced(lambda p, f, o: p.mkdir()), "not a regular file"),
    ("weight-map-array", _edit_index(lambda i: {**i, "weight_map": []}), "weight_map"),
    ("weight-map-missing", _edit_index(lambda i: {"metadata": {}}), "weight_map"),
    ("weight-map-empty", _edit_index(lambda i: {**i, "weight_map": {}}), "weight_map"),
    ("index-array", _edit_index(lambda i: [i]), "JSON array, not an object"),
    (
        "index-not-utf8",
        lambda f, o: (f / INDEX).write_bytes(b'{"weight_map": {"\xff": 1}}'),
        "not UTF-8",
    ),
    ("index-cut-json", lambda f, o: (f / INDEX).write_text('{"weight_map": {'), "not valid JSON"),
    ("tensor-in-the-wrong-shard", _wrong_shard, "says it holds tensor"),
    ("missing-shard", lambda f, o: (f / _shards(f)[1]).unlink(), "is missing"),
]


def _symlink_inside(folder: Path, outside: Path) -> None:
    shard = folder / _shards(folder)[0]
    (folder / "blobs").mkdir()
    os.replace(shard, folder / "blobs" / shard.name)
    shard.symlink_to(Path("blobs") / shard.name)


# layouts that are fine: a shard symlinked within the folder
INDEX_CONTROLS: list[tuple[str, Callable[[Path, Path], None]]] = [
    ("symlink-within-the-folder", _symlink_inside),
]


def hf_cache_layout(checkpoint: Path, cache: Path, repo: str = "owner/tiny") -> Path:
    """The checkpoint as the Hugging Face cache stores it: files in blobs/, the snapshot
    made of relative symlinks to them. Returns the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / "0123abcd"
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")
    for f in sorted(checkpoint.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs" / blob).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)
    return snapshot
