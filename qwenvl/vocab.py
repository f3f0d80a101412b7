"""Vocabularies that come without a ``tokenizer.json``, as a tokenizer.json for the `tokenizers` library.

- Qwen (v1)'s ``qwen.tiktoken`` (base64 token, rank, one per line): the same byte-level BPE as Qwen2
  (``tokenizer.build_qwen2_tokenizer_json``: Qwen's split pattern, NFC), with Qwen (v1)'s special
  tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` … ``<|extra_204|>`` from
  id 151643. The BPE merges are derived from the ranks as llama.cpp's converter derives them (each
  token's last merge: tiktoken's BPE run on its bytes with the lower ranks), which makes `tokenizers`
  encode as tiktoken does. The derivation takes seconds, so the result is cached by the file's hash
  under ``<cache>/tokenizers/``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from pathlib import Path

from .errors import ModelFileError

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
QWEN_FIRST_SPECIAL_ID = 151643
_CACHE_VERSION = "1"


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def as_byte_level(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[byte] for byte in token)


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """A tiktoken BPE file's ranks; one-line errors naming the file for anything else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read ({error.strerror or error})") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (binascii.Error, ValueError):
            raise ModelFileError(
                f"{path}: line {number} is not 'base64-token rank': not a tiktoken vocabulary"
            ) from None
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise ModelFileError(f"{path}: ranks are not 0 … n-1 over all 256 bytes: not a tiktoken BPE vocabulary")
    return ranks


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair whose merge makes ``token`` (llama.cpp's ``QwenModel.bpe``): merge its bytes by rank,
    using only ranks below its own, until two parts are left; None if it is not made of two."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return None
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def tiktoken_merges(ranks: dict[bytes, int], where: str = "vocabulary") -> list[tuple[bytes, bytes]]:
    """The BPE merges, by rank, that reproduce tiktoken's encoding of ``ranks``."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        pair = last_merge(token, ranks)
        if pair is None:
            raise ModelFileError(f"{where}: token {token!r} is not the merge of two lower-ranked tokens")
        merges.append(pair)
    return merges


def tiktoken_tokenizer_json(
    path: str | os.PathLike,
    special_tokens: tuple[str, ...] = QWEN_SPECIAL_TOKENS,
    first_special_id: int = QWEN_FIRST_SPECIAL_ID,
) -> str:
    """A tokenizer.json encoding as tiktoken does over ``path``'s ranks, Qwen's split pattern and
    these special tokens (ids from ``first_special_id``); cached by content."""
    from .defaults import cache_dir
    from .tokenizer import build_qwen2_tokenizer_json

    path = Path(path)
    ranks = read_tiktoken(path)
    if first_special_id < len(ranks):
        raise ModelFileError(f"{path}: {len(ranks)} ranks overlap the special tokens' ids from {first_special_id}")
    key = hashlib.sha256(path.read_bytes())
    key.update(repr((special_tokens, first_special_id, _CACHE_VERSION)).encode())
    cached = cache_dir() / "tokenizers" / f"tiktoken-{key.hexdigest()[:32]}.json"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    vocab = {as_byte_level(token): rank for token, rank in ranks.items()}
    merges = [(as_byte_level(a), as_byte_level(b)) for a, b in tiktoken_merges(ranks, str(path))]
    added = [(first_special_id + i, token, True) for i, token in enumerate(special_tokens)]
    document = build_qwen2_tokenizer_json(vocab, merges, added)
    _write_cache(cached, document)
    return document


def _write_cache(path: Path, text: str) -> None:
    """Best effort: a read-only cache only costs the derivation next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass


__all__ = [
    "QWEN_FIRST_SPECIAL_ID",
    "QWEN_SPECIAL_TOKENS",
    "read_tiktoken",
    "tiktoken_merges",
    "tiktoken_tokenizer_json",
]
