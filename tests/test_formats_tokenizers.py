"""Tokenizers: DeepSeek's real tokenizer shape (one BOS on raw prompts, chat_format with a
plain transformers tokenizer and mlx-lm's wrapper), Kimi's tiktoken files read as data
(round trips, special tokens, streaming, EOS ids, chat format) without ever running
tokenization_kimi.py, and one-line errors for broken tokenizer folders."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
from tiny_chat import BOS, build_deepseek_tokenizer, build_tokenizer
from transformers import AutoTokenizer

from mlx_deepseek.errors import CheckpointError
from mlx_deepseek.formats import chat_format
from mlx_deepseek.formats.tiktoken_tokenizer import KIMI_PATTERN, read_code_constants
from mlx_deepseek.generation import encode_prompt, wrap_tokenizer
from mlx_deepseek.loading import load_tokenizer

MSGS = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ds-tok")
    build_deepseek_tokenizer(path)
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "eos_token_id": 1}))
    return path


def test_deepseeks_tokenizer_adds_no_bos_itself_and_raw_prompts_get_exactly_one(
    deepseek_dir, tmp_path
):
    hf = AutoTokenizer.from_pretrained(deepseek_dir)
    bos = hf.bos_token_id
    assert hf.encode("Hello")[0] != bos  # transformers 5: add_bos_token is False
    tok = load_tokenizer(deepseek_dir)
    for t in (hf, tok):
        for text in ("Hello", f"{BOS}Hello", ""):
            ids = encode_prompt(t, text)
            assert ids[0] == bos and ids.count(bos) == 1, (type(t).__name__, text)
    # a tokenizer that does add BOS itself (tiny_chat's post-processor) still gets one
    build_tokenizer(tmp_path)
    adds = load_tokenizer(tmp_path)
    assert adds.encode("Hello")[0] == bos
    assert encode_prompt(adds, "Hello").count(bos) == 1


def test_chat_format_with_plain_transformers_tokenizer_and_the_wrapper(deepseek_dir):
    hf = AutoTokenizer.from_pretrained(deepseek_dir)
    wrapped = load_tokenizer(deepseek_dir)
    a = chat_format(hf, {"model_type": "deepseek_v3"}, "DeepSeek-V3")
    b = chat_format(wrapped, {"model_type": "deepseek_v3"}, "DeepSeek-V3")
    assert (
        a.render(hf, MSGS)
        == b.render(wrapped, MSGS)
        == f"{BOS}S<｜User｜>Hello, how are you?<｜Assistant｜>"
    )
    ids = encode_prompt(hf, MSGS, chat_format=a)
    assert ids == encode_prompt(wrapped, MSGS, chat_format=b) and ids.count(hf.bos_token_id) == 1
    # DeepSeek's special tokens are one id each
    for special in ("<｜tool▁calls▁begin｜>", "<｜User｜>", "</think>"):
        assert len(hf.encode(special, add_special_tokens=False)) == 1


# ---- Kimi's tiktoken tokenizer -------------------------------------------------------------

MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world"]
SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>"]
PATTERN = r"""[\p{L}]+| ?[\p{L}]+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+(?!\S)|\s+"""


def kimi_dir(path: Path, code: str | None = "default", marker: Path | None = None) -> Path:
    ranks = [bytes([b]) for b in range(256)] + MERGES
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(ranks)]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    base = len(ranks)
    decoder = {str(base + i): {"content": s, "special": True} for i, s in enumerate(SPECIALS)}
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "tokenizer_class": "TikTokenTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(
        json.dumps({"model_type": "kimi_k2", "eos_token_id": base + 2, "bos_token_id": base})
    )
    if code == "default":
        code = (
            "import pathlib\n"
            f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
            "class TikTokenTokenizer:\n"
            "    num_reserved_special_tokens = 5\n"
            f"    pat_str = '|'.join([{', '.join(repr(p) for p in PATTERN.split('|'))}])\n"
            "    def __init__(self):\n"
            f"        pathlib.Path({str(marker)!r}).write_text('ran')\n"
        )
    if code is not None:
        (path / "tokenization_kimi.py").write_text(code)
    return path


def test_kimi_tokenizer_is_read_as_data_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    folder = (
        kimi_dir(tmp_path / "kimi", marker=marker) if (tmp_path / "kimi").mkdir() is None else None
    )
    tok = load_tokenizer(folder)
    hf = tok._tokenizer
    assert hf.is_tiktoken and not marker.exists()
    base = 256 + len(MERGES)
    assert hf.special_tokens["[BOS]"] == base and hf.special_tokens["<|im_middle|>"] == base + 5
    # 5 reserved + 2 ids, the one without a name in tokenizer_config.json as Kimi names it
    assert (
        len(hf.special_tokens) == 7
        and hf.special_tokens[f"<|reserved_token_{base + 6}|>"] == base + 6
    )
    for text in ("hello world", "Héllo, wörld! 123 日本語\n\n  x", "🙂 emoji"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    ids = tok.encode("hello<|im_user|>world", add_special_tokens=False)
    assert ids.count(base + 3) == 1 and ids[0] == 259  # "hello" merged, the special is one id
    assert tok.decode(ids, skip_special_tokens=True) == "helloworld"
    assert tok.eos_token_ids >= {base + 1, base + 2}  # tokenizer's [EOS] and config's eos
    detok = tok.detokenizer
    detok.reset()
    text = "hello wörld 🙂 and more"
    for t in tok.encode(text, add_special_tokens=False):
        detok.add_token(t)
    detok.finalize()
    assert detok.text == text
    # the chat format of a Kimi checkpoint, even one labelled deepseek_v3
    fmt = chat_format(tok, {"model_type": "deepseek_v3"})
    assert fmt.family == "kimi" and fmt.temperature == 0.6
    prompt = fmt.render(tok, MSGS)
    assert prompt.startswith("<|im_system|>system<|im_middle|>S<|im_end|><|im_user|>user")
    ids = encode_prompt(tok, MSGS, chat_format=fmt)
    assert tok.decode(ids) == prompt and ids.count(base + 5) == 3  # system, user, generation
    assert not marker.exists()


def test_kimi_pattern_comes_from_the_file_else_the_published_one(tmp_path, caplog):
    assert read_code_constants("pat_str = 'a' + 'b'\nnum_reserved_special_tokens = 9") == {
        "pat_str": "ab",
        "num_reserved_special_tokens": 9,
    }
    assert read_code_constants("pat_str = compute()") == {}  # not a literal: ignored
    (tmp_path / "k").mkdir()
    folder = kimi_dir(tmp_path / "k", code=None)
    with caplog.at_level(logging.WARNING, logger="mlx_deepseek"):
        tok = load_tokenizer(folder)
    assert "published pattern" in caplog.text
    assert tok._tokenizer.model._pat_str == KIMI_PATTERN
    assert tok.decode(tok.encode("hello world 日本")) == "hello world 日本"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "tiktoken.model").write_text("not base64 at all\n"), "line 1"),
        (lambda p: (p / "tiktoken.model").write_text("aGk= 0\n"), "has no rank"),
        (lambda p: (p / "tokenizer_config.json").write_text("{oops"), "not valid JSON"),
        (lambda p: (p / "tokenizer_config.json").write_text("[1, 2]"), "JSON array, not an object"),
    ],
)
def test_broken_kimi_files_are_one_line(tmp_path, damage, message):
    (tmp_path / "k").mkdir()
    folder = kimi_dir(tmp_path / "k", code=None)
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as e:
        load_tokenizer(folder)
    assert "\n" not in str(e.value)


def test_wrapped_tokenizer_passes_through(deepseek_dir):
    tok = load_tokenizer(deepseek_dir)
    assert wrap_tokenizer(tok) is tok
