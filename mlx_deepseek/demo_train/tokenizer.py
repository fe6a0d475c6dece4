"""The demo's byte-level BPE tokenizer: DeepSeek's special tokens and V3.1's chat template
(the V4 demo's: V4's DSML markers, no template: the formats package's V4 encoder renders).

Saved as tokenizer.json + tokenizer_config.json, loadable by transformers' AutoTokenizer
and mlx-lm. Digits are split one per token (arithmetic is learnable that way); everything
else is byte-level BPE merges learnt from rendered demo conversations. The chat template is
mlx_deepseek.formats' V3.1 template itself, so the formats package detects the family
(thinking switch, V3.1 tool calls) and renders what the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mlx_deepseek.formats import BUILTIN_TEMPLATES

from .config import MAX_CONTEXT, VOCAB_SIZE

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
# Ids 0..4 in this order (BOS 0 and EOS 1, as in DeepSeek-V3's own tokenizer).
SPECIAL = [BOS, EOS, PAD, USER, ASSISTANT]
# Ordinary added tokens (they decode as text, as in DeepSeek's tokenizers): the reasoning
# markers and V3.1's tool-call markers, which the output parser reads from the text.
TOOL_TOKENS = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
]
ADDED = [THINK, END_THINK, *TOOL_TOKENS]
MARKERS = SPECIAL + ADDED
# the V4 demo's (train --arch v4): V4's DSML tool-call markers and its tool-result blocks
DSML_TOKENS = [
    "<｜DSML｜tool_calls>",
    "</｜DSML｜tool_calls>",
    "<｜DSML｜invoke",
    "</｜DSML｜invoke>",
    "<｜DSML｜parameter",
    "</｜DSML｜parameter>",
    "<tool_result>",
    "</tool_result>",
]
ADDED_V4 = [THINK, END_THINK, *DSML_TOKENS]

CHAT_TEMPLATE = BUILTIN_TEMPLATES["v3.1"]


class TemplateTokenizer:
    """What mlx_deepseek.formats.chat_format reads from a tokenizer (its chat template and
    special tokens), for rendering while the real tokenizer is being trained. V4 has no
    template (chat_template None): the formats package's own encoder renders it."""

    bos_token = BOS
    eos_token = EOS
    pad_token = PAD

    def __init__(self, chat_template: str | None = CHAT_TEMPLATE, name: str = "demo"):
        self.chat_template, self.name_or_path = chat_template, name


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = VOCAB_SIZE, added: list[str] = ADDED
) -> Tokenizer:
    """The byte-level BPE trained on `texts` (packing.corpus()), plus the special tokens and
    the `added` ones."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(added)
    bos_id = tok.token_to_id(BOS)
    # Plain encode() prepends BOS, as DeepSeek's tokenizers do (add_bos_token).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def tokenizer_config(chat_template: str | None = CHAT_TEMPLATE) -> dict:
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": MAX_CONTEXT,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def save_tokenizer(
    tok: Tokenizer, out_dir: Path, chat_template: str | None = CHAT_TEMPLATE
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(chat_template), f, ensure_ascii=False, indent=2)
        f.write("\n")
