"""Kimi's tokenizer (a `tiktoken.model` BPE file + `tokenization_kimi.py`), read as data.

Kimi K2 / K2.5 / Moonlight checkpoints ship their tokenizer as remote code: a Python class
that builds a `tiktoken.Encoding` from the ranks file, a regex pattern and a special-token
table. mlx-deepseek never imports or runs that file. It reads:

- the BPE ranks from `tiktoken.model` (one "base64-token rank" pair per line);
- the pre-tokenizer pattern (`pat_str`) and `num_reserved_special_tokens` from the TEXT of
  tokenization_kimi.py, parsed with `ast` (literal strings, `+` and `"|".join([...])`
  only; nothing is evaluated). When the file is missing or holds no such literal, Kimi's
  published pattern is used and a warning says so;
- the special tokens (ids right after the ranks) from tokenizer_config.json's
  `added_tokens_decoder`, unnamed ids as `<|reserved_token_{id}|>` (as Kimi's class does),
  and bos/eos/pad/unk names from the same file; the chat template from chat_template.jinja
  or tokenizer_config.json.

The result has the methods generation needs (encode, decode, get_vocab, the special-token
attributes) and plugs into mlx-lm's TokenizerWrapper with its naive streaming
detokenizer.
"""

from __future__ import annotations

import ast
import base64
import binascii
import functools
import logging
from pathlib import Path
from typing import Any

from mlx_deepseek.checkpoint_files import read_json_object
from mlx_deepseek.errors import CheckpointError

log = logging.getLogger("mlx_deepseek")

RANKS_FILE = "tiktoken.model"
CODE_FILE = "tokenization_kimi.py"

# Kimi's published pre-tokenizer pattern (tokenization_kimi.py in moonshotai/Kimi-K2-Instruct)
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
KIMI_RESERVED = 256  # num_reserved_special_tokens (+2: the table is 258 ids long)


def _literal(node: ast.AST) -> Any:
    """A string / int literal, `a + b` of strings, or `"sep".join([...])`; else ValueError."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left), _literal(node.right)
        if isinstance(left, str) and isinstance(right, str):
            return left + right
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "join"
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], (ast.List, ast.Tuple))
    ):
        sep = _literal(node.func.value)
        items = [_literal(e) for e in node.args[0].elts]
        if isinstance(sep, str) and all(isinstance(i, str) for i in items):
            return sep.join(items)
    raise ValueError("not a literal")


def read_code_constants(source: str) -> dict[str, Any]:
    """`pat_str` and `num_reserved_special_tokens` assigned in the text of a Python file
    (module or class level), without running it."""
    found: dict[str, Any] = {}
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return found
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for t in targets:
            if isinstance(t, ast.Name) and t.id in ("pat_str", "num_reserved_special_tokens"):
                try:
                    found.setdefault(t.id, _literal(value))
                except ValueError:
                    pass
    return found


def read_ranks(path: Path) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file, checked (every byte ranked, ranks unique)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise CheckpointError(
                f"{path}: line {n} is not 'base64-token rank' ({line[:40]!r}): the file is "
                "damaged; re-download it"
            ) from None
    if not ranks:
        raise CheckpointError(f"{path}: no BPE ranks in it; re-download it")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(
            f"{path}: byte 0x{missing[0]:02x} has no rank ({len(missing)} bytes missing); the "
            "file is incomplete: re-download it"
        )
    if len(set(ranks.values())) != len(ranks):
        raise CheckpointError(f"{path}: two tokens share a rank; the file is damaged")
    return ranks


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "[BOS]", "__type": "AddedToken", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes (how byte-level vocabularies spell tokens)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = dict(zip(keep, keep, strict=True)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


class TiktokenTokenizer:
    """A tiktoken BPE tokenizer with the HF-tokenizer methods generation uses."""

    is_tiktoken = True

    def __init__(self, path: str | Path):
        import tiktoken

        path = Path(path)
        self.name_or_path = str(path)
        file = path / "tokenizer_config.json"
        config = read_json_object(file) if file.exists() else {}
        code = path / CODE_FILE
        constants = read_code_constants(code.read_text(errors="replace")) if code.exists() else {}
        pattern = constants.get("pat_str")
        if not isinstance(pattern, str):
            log.warning(
                "%s: no pre-tokenizer pattern in %s; using Kimi's published pattern",
                path.name,
                CODE_FILE,
            )
            pattern = KIMI_PATTERN
        reserved = constants.get("num_reserved_special_tokens", KIMI_RESERVED)
        if not isinstance(reserved, int) or not 0 <= reserved <= 1 << 20:
            reserved = KIMI_RESERVED
        ranks = read_ranks(path / RANKS_FILE)
        base = len(ranks)
        if max(ranks.values()) != base - 1:
            raise CheckpointError(f"{path / RANKS_FILE}: ranks are not 0..{base - 1}; damaged")
        names: dict[int, str] = {}
        for key, value in (config.get("added_tokens_decoder") or {}).items():
            name = _token_name(value)
            if name is not None and str(key).isdigit():
                names[int(key)] = name
        self.special_tokens = {
            names.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + reserved + 2)
        }
        try:
            self.model = tiktoken.Encoding(
                name=path.name or "kimi",
                pat_str=pattern,
                mergeable_ranks=ranks,
                special_tokens=self.special_tokens,
            )
        except Exception as e:  # noqa: BLE001 (tiktoken's regex or table errors)
            raise CheckpointError(
                f"{path}: cannot build the tiktoken tokenizer ({type(e).__name__}: {e})"
            ) from None
        self.n_vocab = self.model.n_vocab
        self._base = base
        self._vocab_cache: dict[str, int] | None = None
        self._id_of = dict(self.special_tokens)
        for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
            name = _token_name(config.get(attr))
            setattr(self, attr, name if name in self.special_tokens else None)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        jinja = path / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8", errors="replace") if jinja.exists() else None
        self.chat_template = template or config.get("chat_template")
        self.init_kwargs = config

    # ---- ids ---------------------------------------------------------------------------

    def _special_id(self, name: str | None) -> int | None:
        return self.special_tokens.get(name) if name else None

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id(self.pad_token)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.special_tokens.values())

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    def __len__(self) -> int:
        return self.n_vocab

    def get_vocab(self) -> dict[str, int]:
        """Token strings (byte-level spelling, as HF tokenizers show them) -> ids."""
        return dict(self._vocab())

    def _vocab(self) -> dict[str, int]:
        if self._vocab_cache is None:
            b2u = _bytes_to_unicode()
            vocab = {
                "".join(b2u[b] for b in self.model.decode_single_token_bytes(i)): i
                for i in range(self._base)
            }
            self._vocab_cache = {**vocab, **self.special_tokens}
        return self._vocab_cache

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._vocab().get(token)

    # ---- text --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        """Ids of `text`; special-token strings in it are special tokens (as Kimi's class
        does). BOS first when add_special_tokens and the config's add_bos_token say so."""
        ids = self.model.encode(text, allowed_special="all")
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None:
            ids = [bos, *ids]
        return ids

    def decode(
        self, token_ids: int | list[int], skip_special_tokens: bool = False, **_: Any
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        specials = set(self.special_tokens.values()) if skip_special_tokens else ()
        ids = [t for t in ids if 0 <= t < self.n_vocab and t not in specials]
        return self.model.decode(ids, errors="replace")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The checkpoint's template through mlx-deepseek's sandbox (for mlx-lm callers)."""
        from .chat import chat_format

        fmt = chat_format(self, {"model_type": "kimi_k2"})
        thinking = bool(kwargs.get("thinking", kwargs.get("enable_thinking", False)))
        text = fmt.render(self, messages, add_generation_prompt, thinking, tools)
        return self.encode(text, add_special_tokens=False) if tokenize else text
