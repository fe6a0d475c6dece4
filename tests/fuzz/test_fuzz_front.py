"""Generated bad input at the front door: CLI usage, CLI option values, API arguments, token
ids, session files (crafted bytes, headers, fields, wrong formats) and save targets.

Every case asserts the one-line message (or the exception type and the argument it names)
and that nothing else changed: no file written or altered, the conversation and its cache as
they were. Inputs that crashed the process before (a crafted GGUF given to /load, ids past the
vocabulary) also run in a subprocess, whose return code must not be a signal.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_deepseek.chat.session import ChatSession
from tiny_chat import ScriptedModel, tiny_checkpoint, tiny_model, tokenizer_only

from mlx_deepseek import cli
from mlx_deepseek.decoding import cache_length, make_cache
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.generation import generate

SCRIPT = Path(sys.executable).parent / "mlx-deepseek"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None: a folder)."""
    return {str(p): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# ---- A. CLI usage errors: exit 2, usage line + one error line --------------------------------

GEN = ["generate", "demo", "-p", "x"]
CHAT = ["chat", "demo"]
USAGE: list[tuple[list[str], list[str]]] = []
for cmd in (GEN, CHAT):
    for opt in ("--temp", "--top-p", "--min-p", "--repetition-penalty"):
        for bad in ("abc", "1,5", "0x1g", ""):
            USAGE.append(([*cmd, opt, bad], [opt, repr(bad)]))
    for opt in ("--top-k", "--seed", "--max-tokens", "-m", "--draft-tokens"):
        for bad in ("1.5", "ten", "1e3"):
            USAGE.append(([*cmd, opt, bad], [opt if opt != "-m" else "--max-tokens", repr(bad)]))
    for opt in ("--frobnicate", "-z", "--temperature"):
        USAGE.append(([*cmd, opt], [opt]))
for flag in ("--think", "--raw", "--quiet", "-q", "--mtp", "--no-mtp"):
    for bad in ("true", "0"):
        USAGE.append(([*GEN, flag, bad], [f"{flag} is a flag", repr(bad)]))
for flag in ("--think", "--mtp", "--no-mtp"):
    USAGE.append(([*CHAT, flag, "yes"], [f"{flag} is a flag", "'yes'"]))
for cmd, opt in [(GEN, "--stop"), (GEN, "--system"), (GEN, "-m"), (CHAT, "--system")]:
    USAGE.append(([*cmd, opt], [opt, "requires an argument"]))
USAGE.append((["generate", "demo", "-p"], ["-p", "requires an argument"]))
for opt, bad in [("--recipe", "nonsense"), ("--recipe", "Uniform!"), ("--dtype", "int8")]:
    USAGE.append((["convert", "src", "-o", "dst", opt, bad], [opt, repr(bad)]))
for opt, bad in [("--bits", "four"), ("--group-size", "x")]:
    USAGE.append((["convert", "src", "-o", "dst", opt, bad], [opt, repr(bad)]))
for opt, bad in [("--bits", "abc"), ("--repeats", "x"), ("--bandwidth-gb", "fast")]:
    USAGE.append((["bench", opt, bad], [opt, repr(bad)]))
for name in ("gen", "Chat", "help", "--", "convertt"):
    USAGE.append(([name], [] if name == "--" else [repr(name)]))
USAGE += [
    ([], ["no command given"]),
    (["info"], ["Missing argument"]),
    (["convert", "src"], ["-o"]),
]


def run_main(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mlx-deepseek", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("argv, words", USAGE, ids=lambda v: " ".join(v) if v else "none")
def test_cli_usage_error(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(argv, monkeypatch, capsys)
    lines = err.strip("\n").split("\n")
    assert code == 2 and out == "", err
    assert len(lines) == 2 and lines[0].startswith("Usage: mlx-deepseek"), err
    assert lines[1].startswith("error: ") and all(w in lines[1] for w in words), err
    assert snapshot(tmp_path) == {}  # nothing written


# ---- B. CLI option values: exit 1, one line, the same words in chat and generate -------------

VALUES = [("--temp", v) for v in ("-1", "-0.5", "nan", "inf")]
VALUES += [("--top-p", v) for v in ("0", "1.5", "-0.1", "nan")]
VALUES += [("--min-p", v) for v in ("1", "-0.1", "2")]
VALUES += [("--top-k", v) for v in ("-1", "-100")]
VALUES += [("--repetition-penalty", v) for v in ("0", "-1", "nan")]
VALUES += [("--seed", v) for v in ("-1", str(2**64))]
VALUES += [("-m", v) for v in ("0", "-3")] + [("--draft-tokens", v) for v in ("0", "9")]


@pytest.mark.parametrize("option, value", VALUES, ids=lambda v: str(v))
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_cli_option_value(command, option, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [command, "./no/such/model", option, value]
    if command == "generate":
        argv += ["-p", "hi"]
    code, out, err = run_main(argv, monkeypatch, capsys)
    name = "--max-tokens" if option == "-m" else option
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {name} ") and "must be" in err  # checked before loading
    other = "generate" if command == "chat" else "chat"
    argv2 = [other, "./no/such/model", name, value] + (["-p", "hi"] if other == "generate" else [])
    assert run_main(argv2, monkeypatch, capsys)[2] == err  # the same words
    assert snapshot(tmp_path) == {}


# ---- C. API arguments: TypeError / ValueError naming the argument ----------------------------


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model()
    cache = make_cache(model)
    generate(model, tok, "Hello", 3, prompt_cache=cache)  # a conversation in progress
    return model, tok, cache


V = 322  # the tiny tokenizer's vocabulary (checked in test_vocab_is_what_the_cases_assume)
T, E = TypeError, ValueError
API = [
    ({"prompt": 5}, T, "prompt"),
    ({"prompt": 3.5}, T, "prompt"),
    ({"prompt": None}, T, "prompt"),
    ({"prompt": b"hi"}, T, "prompt"),
    ({"prompt": {"role": "user", "content": "x"}}, T, "prompt"),
    ({"prompt": [{"role": "user"}]}, T, "prompt[0]"),
    ({"prompt": [{"role": 1, "content": "x"}]}, T, "prompt[0]['role']"),
    ({"prompt": [{"role": "user", "content": None}]}, T, "prompt[0]['content']"),
    ({"prompt": [{"role": "user", "content": "a"}, "b"]}, T, "prompt[1]"),
    ({"prompt": "caf\udce9"}, E, "prompt"),
    ({"prompt": "\ud800"}, E, "prompt"),
    ({"prompt": [{"role": "user", "content": "x\udcff"}]}, E, "prompt[0]['content']"),
    ({"prompt": [1, "2"]}, T, "prompt"),
    ({"prompt": [1, None]}, T, "prompt"),
    ({"prompt": [True, 2]}, T, "prompt"),
    ({"prompt": [1.0]}, T, "prompt"),
    ({"prompt": mx.array([1.5])}, T, "prompt"),
    ({"prompt": mx.array([True])}, T, "prompt"),
    ({"prompt": np.array([1.0, 2.0])}, T, "prompt"),
    ({"prompt": []}, E, "prompt is empty"),
    ({"stop": 1}, T, "stop"),
    ({"stop": [1]}, T, "stop[0]"),
    ({"stop": ["a", None]}, T, "stop[1]"),
    ({"stop": [b"x"]}, T, "stop[0]"),
    ({"stop": b"x"}, T, "stop"),
    ({"stop": {"a"}}, T, "stop"),
    ({"stop": "\udce9"}, E, "stop"),
    ({"stop": ["ok", "\ud800x"]}, E, "stop[1]"),
    ({"system": 3}, T, "system"),
    ({"system": "\udce9"}, E, "system"),
]
API += [({"max_tokens": v}, T, "max_tokens") for v in ("5", 2.0, True, None)]
API += [({"max_tokens": v}, E, "max_tokens") for v in (0, -1)]
API += [({"temperature": v}, T, "temperature") for v in ("0.5", None, True)]
API += [({"temperature": v}, E, "temperature") for v in (-1, math.nan, math.inf)]
API += [({"top_p": v}, E, "top_p") for v in (0, 1.5)] + [({"top_p": "1"}, T, "top_p")]
API += [({"top_k": v}, T, "top_k") for v in (1.5, "3", True)] + [({"top_k": -1}, E, "top_k")]
API += [({"min_p": v}, E, "min_p") for v in (1, -0.1)] + [({"min_p": "0"}, T, "min_p")]
API += [({"repetition_penalty": v}, E, "repetition_penalty") for v in (0, -1)]
API += [({"repetition_penalty": "1"}, T, "repetition_penalty")]
API += [({"repetition_context_size": 0}, E, "repetition_context_size")]
API += [({"repetition_context_size": 1.5}, T, "repetition_context_size")]
API += [({"seed": v}, E, "seed") for v in (-1, 2**64)] + [
    ({"seed": v}, T, "seed") for v in (1.5, "1")
]
API += [({"thinking": v}, T, "thinking") for v in ("yes", 1, None)]
API += [({"mtp": v}, T, "mtp") for v in ("no", 1)]
API += [({"draft_tokens": v}, E, "draft_tokens") for v in (0, 9)]
API += [({"draft_tokens": v}, T, "draft_tokens") for v in (1.5, "2")]
API += [({"prefill_step_size": v}, E, "prefill_step_size") for v in (0, -1)]
API += [({"prefill_step_size": v}, T, "prefill_step_size") for v in (1.5, "8", True)]
API += [({"prior_tokens": v}, E, "prior_tokens") for v in ([V], [-1])]
API += [({"prior_tokens": v}, T, "prior_tokens") for v in (["a"], 5)]


def test_vocab_is_what_the_cases_assume(tiny):
    assert tiny[0].args.vocab_size == V


@pytest.mark.parametrize("kwargs, kind, name", API, ids=lambda v: repr(v)[:40])
def test_api_argument(kwargs, kind, name, tiny):
    model, tok, cache = tiny
    before = (cache_length(cache), mx.random.state[0].tolist())
    kwargs = {"prompt": "Hello", "max_tokens": 2, **kwargs}
    with pytest.raises(kind) as e:
        generate(model, tok, prompt_cache=cache, **kwargs)
    assert isinstance(e.value, DeepSeekError)  # the CLI prints it as one line too
    message = str(e.value)
    assert name in message and "\n" not in message
    assert (cache_length(cache), mx.random.state[0].tolist()) == before  # nothing ran


# ---- D. token ids outside [0, vocab) ---------------------------------------------------------

BAD_IDS = [V, V + 1, V + 1000, 2**31 - 1, 2**31, 2**63 - 1, -1, -V]
CONTAINERS = {
    "list": lambda ids: ids,
    "tuple": tuple,
    "mx-int64": lambda ids: mx.array(ids, dtype=mx.int64),
    "numpy-int64": lambda ids: np.array(ids, dtype=np.int64),
}


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("container", list(CONTAINERS))
def test_token_ids_outside_the_vocabulary(bad, container, tiny):
    model, tok, cache = tiny
    before = cache_length(cache)
    ids = CONTAINERS[container]([5, 6, bad, 7])
    with pytest.raises(ValueError) as e:
        generate(model, tok, ids, 2, prompt_cache=cache)
    assert f"token id {bad} at position 2 is outside the model's vocabulary [0, {V})" in str(
        e.value
    )
    assert cache_length(cache) == before


def test_ids_just_inside_the_vocabulary_still_work(tiny):
    model, tok, _ = tiny
    assert isinstance(generate(model, tok, [0, V - 1], 2), str)


ISOLATED_IDS = [[V], [V + 1], [10**6], [2**31], [-1], [1, 2, V + 5]]
ISOLATED_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from tiny_chat import tiny_model
from mlx_deepseek import stream_generate
model, tok = tiny_model()
for ids in json.loads(sys.argv[1]):
    try:
        for _ in stream_generate(model, tok, ids, 2):
            pass
        print("accepted")
    except ValueError as e:
        print("refused", str(e).splitlines()[0])
"""


@pytest.fixture(scope="module")
def isolated_ids():
    script = ISOLATED_SCRIPT.format(tests=str(Path(__file__).parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(ISOLATED_IDS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc


@pytest.mark.parametrize("i", range(len(ISOLATED_IDS)))
def test_ids_past_the_vocabulary_in_a_process_of_their_own(i, isolated_ids):
    proc = isolated_ids
    assert proc.returncode == 0, f"return code {proc.returncode}: {proc.stderr[-500:]}"
    lines = proc.stdout.strip().split("\n")
    assert len(lines) == len(ISOLATED_IDS) and lines[i].startswith("refused "), proc.stdout
    assert "outside the model's vocabulary" in lines[i]


# ---- E. session files: crafted bytes, headers, fields ----------------------------------------


def chat_session(replies=("Four.", "Once.", "Bye.")) -> ChatSession:
    tok = tokenizer_only()
    return ChatSession(ScriptedModel(tok, list(replies)), tok, name="tiny-v3", system="Sys.")


def talk(s: ChatSession, text: str) -> None:
    for _ in s.respond(text):
        pass


@pytest.fixture(scope="module")
def valid_session(tmp_path_factory) -> bytes:
    s = chat_session()
    talk(s, "What is two plus two?")
    talk(s, "Tell me a story")
    return s.save(tmp_path_factory.mktemp("valid") / "chat").read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def edit_header(change):
    def make(data: bytes) -> bytes:
        header, body = split(data)
        change(header)
        return join(header, body)

    return make


def edit_state(change):
    def make(data: bytes) -> bytes:
        header, body = split(data)
        state = json.loads(header["__metadata__"]["0.session"])
        change(state)
        header["__metadata__"]["0.session"] = json.dumps(state)
        return join(header, body)

    return make


def tensor(header: dict, name: str) -> dict:
    return header[name]


def gguf(n_dims: int, dims: list[int], kind: int) -> bytes:
    """A GGUF header with one tensor: MLX's parser aborts on n_dims past its maximum."""
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"a"
    return (
        head
        + struct.pack("<I", n_dims)
        + b"".join(struct.pack("<Q", d) for d in dims)
        + (struct.pack("<IQ", kind, 0))
    )


def _npz() -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3))
    return buf.getvalue()


def _npy() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    return buf.getvalue()


def _set(key, value):
    def change(d):
        d[key] = value

    return change


CRAFTED = {
    "empty": lambda d: b"",
    "7 bytes": lambda d: d[:7],
    "header only": lambda d: d[:8],
    "header cut": lambda d: d[: 8 + struct.unpack("<Q", d[:8])[0] // 2],
    "one byte short": lambda d: d[:-1],
    "half": lambda d: d[: len(d) // 2],
    "header length 0": lambda d: struct.pack("<Q", 0) + d[8:],
    "header length = size": lambda d: struct.pack("<Q", len(d)) + d[8:],
    "header length 2**63": lambda d: struct.pack("<Q", 2**63) + d[8:],
    "header length 2**64-1": lambda d: b"\xff" * 8 + d[8:],
    "header not json": lambda d: struct.pack("<Q", 5) + b"{oops" + d[13:],
    "header not utf-8": lambda d: struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
    "header a list": lambda d: struct.pack("<Q", 2) + b"[]",
    "header null": lambda d: struct.pack("<Q", 4) + b"null",
    "gguf 64 dims": lambda d: gguf(64, [1] * 8, 0),
    "gguf huge dims": lambda d: gguf(4, [2**62] * 4, 0),
    "gguf bad type": lambda d: gguf(2, [3, 3], 99),
    "npz": lambda d: _npz(),
    "npy": lambda d: _npy(),
    "text": lambda d: b"hello, I am not a session\n" * 3,
    "dtype unknown": edit_header(lambda h: tensor(h, "0.0").update(dtype="F99")),
    "dtype missing": edit_header(lambda h: tensor(h, "0.0").pop("dtype")),
    "shape negative": edit_header(lambda h: tensor(h, "0.0").update(shape=[1, 1, -256, 4])),
    "shape bool": edit_header(lambda h: tensor(h, "0.0").update(shape=[True, 1, 256, 4])),
    "shape too big": edit_header(lambda h: tensor(h, "0.0").update(shape=[1, 1, 512, 4])),
    "offsets reversed": edit_header(
        lambda h: tensor(h, "0.0").update(data_offsets=tensor(h, "0.0")["data_offsets"][::-1])
    ),
    "offsets past the end": edit_header(
        lambda h: tensor(h, "0.1").update(
            data_offsets=[x + 10**6 for x in tensor(h, "0.1")["data_offsets"]]
        )
    ),
    "offsets negative": edit_header(lambda h: tensor(h, "0.2").update(data_offsets=[-4, 0])),
    "tensors overlap": edit_header(
        lambda h: tensor(h, "1.1").update(data_offsets=tensor(h, "1.0")["data_offsets"])
    ),
    "metadata not strings": edit_header(lambda h: h["__metadata__"].update({"x": 1})),
    "metadata a list": edit_header(lambda h: h.update(__metadata__=["x"])),
    "format missing": edit_header(lambda h: h["__metadata__"].pop("0.format")),
    "format other": edit_header(lambda h: h["__metadata__"].update({"0.format": "gguf/2"})),
    "session not json": edit_header(lambda h: h["__metadata__"].update({"0.session": "{"})),
    "session a list": edit_header(lambda h: h["__metadata__"].update({"0.session": "[]"})),
    "class other": edit_header(lambda h: h["__metadata__"].update({"1.1": "RotatingKVCache"})),
    "layer missing": edit_header(lambda h: h["__metadata__"].pop("1.1")),
    "keys missing": edit_header(lambda h: h.pop("1.0")),
    "scalar kind odd": edit_header(lambda h: h["__metadata__"].update({"2.1.1": "pickle"})),
    "arch other": edit_state(lambda s: s["arch"].update(hidden_size=99)),
    "tokens past vocab": edit_state(lambda s: s["tokens"].__setitem__(3, V)),
    "tokens negative": edit_state(lambda s: s["tokens"].__setitem__(0, -1)),
    "tokens text": edit_state(lambda s: s["tokens"].__setitem__(1, "a")),
    "tokens float": edit_state(lambda s: s["tokens"].__setitem__(1, 1.5)),
    "tokens null": edit_state(_set("tokens", None)),
    "tokens beyond cache": edit_state(lambda s: s["tokens"].extend([5] * 300)),
    "messages not a list": edit_state(_set("messages", "hi")),
    "role unknown": edit_state(lambda s: s["messages"][0].update(role="hacker")),
    "content a number": edit_state(lambda s: s["messages"][0].update(content=5)),
    "content lone surrogate": edit_state(lambda s: s["messages"][0].update(content="\udce9")),
    "system a number": edit_state(_set("system", 5)),
    "reasoning keys": edit_state(_set("reasoning", {"x": "y"})),
    "settings range": edit_state(lambda s: s["settings"].update(temperature=-1)),
    "settings unknown": edit_state(lambda s: s["settings"].update(bogus=1)),
    "settings a string": edit_state(_set("settings", "greedy")),
    "max_tokens 0": edit_state(_set("max_tokens", 0)),
    "max_tokens text": edit_state(_set("max_tokens", "5")),
    "thinking text": edit_state(_set("thinking", "yes")),
    "totals negative": edit_state(lambda s: s["totals"].update(turns=-1)),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_load_of_a_crafted_file(case, valid_session, tmp_path):
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(CRAFTED[case](valid_session))
    s = chat_session()
    talk(s, "Hello")
    before = (list(s.messages), list(s.tokens), cache_length(s.cache), s.settings, s.system)
    files = snapshot(tmp_path)
    with pytest.raises(DeepSeekError) as e:
        s.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    after = (list(s.messages), list(s.tokens), cache_length(s.cache), s.settings, s.system)
    assert after == before and snapshot(tmp_path) == files


@pytest.mark.parametrize("name", ["chat.gguf", "chat.npy", "chat.npz", "chat", "chat.v2"])
def test_a_session_under_any_name_is_read_as_safetensors(name, valid_session, tmp_path):
    (tmp_path / name).write_bytes(valid_session)
    s = chat_session()
    s.load(tmp_path / name)
    assert len(s.messages) == 4 and cache_length(s.cache) == len(s.tokens) > 0


# ---- F. save targets: folders and read-only places -------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write to, holding an earlier session file where the
    system allows one to be put there."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "chat.safetensors").write_bytes(b"an earlier session")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        yield folder  # root ignores permission bits, not an immutable folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:  # root without chattr (a container): sysfs is read-only even for root
        yield Path("/sys/kernel")


SAVE_TARGETS = {
    "existing folder": lambda t, ro: str(t / "dir"),
    "folder/": lambda t, ro: str(t / "dir") + "/",
    "folder/.": lambda t, ro: str(t / "dir") + "/.",
    "suffixed name is a folder": lambda t, ro: str(t / "box"),
    "under a regular file": lambda t, ro: str(t / "file.txt" / "chat"),
    "missing parent": lambda t, ro: str(t / "no" / "such" / "chat"),
    "a new file in a read-only folder": lambda t, ro: str(ro / "new"),
    "over a file in a read-only folder": lambda t, ro: str(ro / "chat.safetensors"),
    "over the same name without suffix": lambda t, ro: str(ro / "chat"),
}


@pytest.mark.parametrize("case", list(SAVE_TARGETS))
def test_save_target(case, tmp_path, read_only):
    (tmp_path / "dir").mkdir()
    (tmp_path / "box.safetensors").mkdir()
    (tmp_path / "file.txt").write_text("notes")
    s = chat_session()
    talk(s, "Hello")
    before = (list(s.messages), list(s.tokens), cache_length(s.cache))
    files = snapshot(tmp_path)
    with pytest.raises(DeepSeekError) as e:
        s.save(SAVE_TARGETS[case](tmp_path, read_only))
    assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == files  # nothing written, the earlier session untouched
    assert (list(s.messages), list(s.tokens), cache_length(s.cache)) == before


# ---- G. the real chat, in its own process, given crafted files -------------------------------

CHAT_LOADS = ["gguf 64 dims", "gguf huge dims", "header length 2**63", "half", "npz", "empty"]


@pytest.fixture(scope="module")
def chat_run(valid_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loads")
    names = []
    for i, case in enumerate(CHAT_LOADS):
        name = f"f{i}.gguf" if case.startswith("gguf") else f"f{i}.safetensors"
        (folder / name).write_bytes(CRAFTED[case](valid_session))
        names.append(name)
    script = "".join(f"/load {n}\n" for n in names) + "Hello\n/exit\n"
    files = snapshot(folder)
    proc = subprocess.run(
        [str(SCRIPT), "chat", str(tiny_checkpoint()), "-m", "3", "--temp", "0"],
        input=script.encode(),
        capture_output=True,
        cwd=folder,
        env={**os.environ, "COLUMNS": "500"},
        timeout=600,
    )
    return proc, names, snapshot(folder) == files


@pytest.mark.parametrize("i", range(len(CHAT_LOADS)), ids=CHAT_LOADS)
def test_chat_load_of_a_crafted_file_in_its_own_process(i, chat_run):
    proc, names, untouched = chat_run
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, f"return code {proc.returncode}: {proc.stderr[-300:]!r}"
    errors = [line for line in out.splitlines() if "error: " in line]
    assert len(errors) == len(names) and f"error: {names[i]}: not a chat session" in errors[i]
    assert "prefill " in out.split(errors[-1])[1]  # the chat went on and answered
    assert "Traceback" not in out + proc.stderr.decode("utf-8", "replace") and untouched


def test_random_bytes_never_load(tmp_path):
    rng = random.Random(0)
    s = chat_session()
    for size in (8, 9, 64, 1000, 4096):
        path = tmp_path / f"r{size}.safetensors"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(size)))
        with pytest.raises(DeepSeekError):
            s.load(path)
    assert s.messages == [] and s.tokens == []
