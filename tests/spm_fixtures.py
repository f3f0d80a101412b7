"""Tiny SentencePiece models trained by the tests (Llama's settings: BPE or unigram, byte fallback,
no normalization, <unk> <s> </s> at 0 1 2), and the files transformers reads beside them."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over a lazy dog while tensors flow through layers of attention heads "
    "language models read tokens and write answers one piece at a time image video picture describe "
    "hello world python code function return value 你好 世界 模型 语言 数据 12 345 6789 3.14 "
    "Mr. Smith's café naïve résumé — ! ? , ; : ( ) [ ] { } < > = + - * / # @"
).split()
# As LLaMA-VID's Vicuna-7B ships it (seed 004)
LLAMA_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
}


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 16))) for _ in range(lines)]


def train_sentencepiece(prefix: Path, model_type: str = "bpe", vocab_size: int = 600) -> Path:
    """``<prefix>.model``, trained with Llama's tokenizer settings."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(prefix),
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    return prefix.with_suffix(".model")


def write_tokenizer_files(directory: Path, model: Path, config: dict | None = None, **extra_files: dict) -> Path:
    """tokenizer.model + tokenizer_config.json (+ special_tokens_map.json / added_tokens.json ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(LLAMA_TOKENIZER_CONFIG if config is None else config))
    for name, content in extra_files.items():
        (directory / f"{name}.json").write_text(json.dumps(content))
    return directory
