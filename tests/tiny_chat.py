"""Test fixtures for generation and chat: a tiny checkpoint folder and a scripted model.

- `tiny_checkpoint()`: a random tiny DeepSeek-V3 (mlx_deepseek's own Model, saved in the
  mlx-lm layout) with a byte-level BPE tokenizer using DeepSeek's special tokens, without a
  chat template (so the built-in V3 one is used). The lm_head rows of EOS, <think> and
  </think> are zero, so greedy answers run to max tokens and never switch reasoning on/off.
- `ScriptedModel`: the mlx-lm model protocol over a real KVCache, answering each user turn
  with a fixed token script (e.g. reasoning, `</think>`, an answer, EOS), so chat logic
  (reasoning split, stop, cache bookkeeping) is tested exactly.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.demo_train.tokenizer import (
    ASSISTANT,
    BOS,
    END_THINK,
    EOS,
    SPECIAL,
    THINK,
    TOOL_TOKENS,
    USER,
)
from mlx_deepseek.models.tiny import tiny_config

# DeepSeek's special tokens (ids 0..4: SPECIAL) and tool-call markers are the demo tokenizer's
ADDED = [THINK, END_THINK]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "Tell me a story about a dragon who lived in a cave.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small village by the sea.",
    "Café, naïve, 日本語, and an emoji 🙂 are all text.",
    "You are a helpful assistant. Answer briefly.",
    "What is two plus two? Two plus two is four.",
]

CONFIG = tiny_config(
    "v3_noaux_noqlora",
    num_hidden_layers=2,
    num_attention_heads=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    num_nextn_predict_layers=0,
    max_position_embeddings=2048,
    rope_scaling=None,
    torch_dtype="float32",
)

_ROOT = Path(tempfile.mkdtemp(prefix="mlx-deepseek-chat-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def _train_bpe(vocab: int, special: list[str]):
    """A byte-level BPE tokenizer over CORPUS with DeepSeek's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if special:
        tok.add_special_tokens([AddedToken(t, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, normalized=False) for t in ADDED])
    return tok


def build_tokenizer(out_dir: Path, chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json, DeepSeek-style (BOS prepended by encode())."""
    from tokenizers import processors

    tok = _train_bpe(320, [])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": SPECIAL[2],
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))


def vocab_size(out_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab_size()


@functools.cache
def tiny_checkpoint(name: str = "tiny-deepseek-v3", chat_template: str | None = None) -> Path:
    """A loadable checkpoint folder (config.json, model.safetensors, tokenizer files)."""
    from mlx.utils import tree_flatten

    from mlx_deepseek.models.config import ModelArgs
    from mlx_deepseek.models.deepseek_v3 import Model

    path = _ROOT / name
    build_tokenizer(path, chat_template)
    config = {**CONFIG, "vocab_size": vocab_size(path)}
    mx.random.seed(7)
    model = Model(ModelArgs.from_dict(config))
    # Greedy decoding never ends early and never opens or closes a thinking block itself:
    # those rows are zero, and two ordinary rows are opposite, so some logit is always > 0.
    head = model.lm_head.weight
    head[101] = -head[100]
    for token in [config["eos_token_id"], config["vocab_size"] - 2, config["vocab_size"] - 1]:
        head[token] = 0.0
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@functools.cache
def tiny_model(name: str = "tiny-deepseek-v3"):
    """(model, tokenizer) loaded through mlx_deepseek.load, shared by the tests."""
    return mlx_deepseek.load(tiny_checkpoint(name))


@functools.cache
def tokenizer_only(chat_template: str | None = None):
    """An mlx-lm TokenizerWrapper without a model (for ScriptedModel tests)."""
    from mlx_lm.utils import load_tokenizer

    key = abs(hash(chat_template)) if chat_template else "none"
    path = _ROOT / f"tok-{key}"
    build_tokenizer(path, chat_template)
    return load_tokenizer(path)


class _Args:
    def __init__(self, vocab: int, context: int):
        self.model_type = "deepseek_v3"
        self.vocab_size = vocab
        self.max_position_embeddings = context
        self.hidden_size = 8
        self.num_hidden_layers = 2
        self.kv_lora_rank = 4


def _find_all(seq: list[int], sub: list[int]) -> list[int]:
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if seq[i : i + n] == sub]


class ScriptedModel:
    """Answers user turn k (counted by user markers in the context) with replies[k-1].

    The reply continues from whatever of it is already at the end of the context after the
    last assistant marker, then ends with EOS. Markers default to DeepSeek-V3's special
    tokens; V2's are "User:" and "Assistant:". The model sees its context through a real
    KVCache (offsets and trims behave as for the real model) and records every call's input
    length in `calls`.
    """

    def __init__(
        self,
        tokenizer,
        replies: list[str],
        context: int = 4096,
        layers: int = 2,
        markers: tuple[str, str] = (USER, ASSISTANT),
    ):
        self.tok = tokenizer
        self.replies = [tokenizer.encode(r, add_special_tokens=False) for r in replies]
        self.user, self.assistant = (tokenizer.encode(m, add_special_tokens=False) for m in markers)
        self.eos_id = tokenizer.eos_token_id
        self.vocab = len(tokenizer)
        self.args = _Args(self.vocab, context)
        self.layers = [object() for _ in range(layers)]
        self.context: list[int] = []
        self.calls: list[int] = []

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def _next(self, context: list[int]) -> int:
        turn = len(_find_all(context, self.user))
        starts = _find_all(context, self.assistant)
        if turn == 0 or not starts:
            return self.eos_id
        reply = self.replies[(turn - 1) % len(self.replies)] + [self.eos_id]
        after = context[starts[-1] + len(self.assistant) :]
        done = max(
            k
            for k in range(min(len(after), len(reply)) + 1)
            if after[len(after) - k :] == reply[:k]
        )
        return reply[done] if done < len(reply) else self.eos_id

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        ids = inputs.reshape(-1).tolist()
        self.calls.append(len(ids))
        offset = cache[0].offset
        self.context = self.context[:offset] + ids
        n = len(ids)
        for c in cache:  # one dummy latent per token keeps offsets/trim exactly like the model's
            c.update_and_fetch(mx.zeros((1, 1, n, 4)), mx.zeros((1, 1, n, 2)))
        logits = mx.zeros((1, n, self.vocab))
        logits[0, -1, self._next(self.context)] = 30.0
        return logits


def build_deepseek_tokenizer(out_dir: Path, chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json in the shape DeepSeek ships them: a ByteLevel
    post-processor (no BOS template in tokenizer.json), `add_bos_token: true` and
    `tokenizer_class: LlamaTokenizerFast` in the config, tokens as AddedToken objects.
    transformers 5 loads this with add_bos_token False: encode() adds no BOS."""
    from tokenizers import processors

    tok = _train_bpe(400, TOOL_TOKENS)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))

    def added(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added(EOS),
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": added(EOS),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))


@functools.cache
def tiny_hf_checkpoint(family: str = "v3_noaux", **overrides) -> Path:
    """A raw Hugging Face checkpoint (per-expert tensors, kv_b_proj; transformers' own
    classes) with this module's tokenizer, so the CLI can run it; EOS is never the greedy
    choice (its lm_head row is zero), so answers run to max tokens."""
    import torch
    from checkpoints import build_hf_model, save_hf_checkpoint

    key = "-".join([family, *(f"{k}{v}" for k, v in sorted(overrides.items()))])
    path = _ROOT / f"hf-{key}"
    build_tokenizer(path)
    model = build_hf_model(family, seed=3, vocab_size=vocab_size(path), **overrides)
    with torch.no_grad():
        model.lm_head.weight[CONFIG["eos_token_id"]] = 0.0
    save_hf_checkpoint(model, path)
    return path
