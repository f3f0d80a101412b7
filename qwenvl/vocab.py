"""Vocabularies that come without a ``tokenizer.json``, as a tokenizer.json for the `tokenizers` library.

- Qwen (v1)'s ``qwen.tiktoken`` (base64 token, rank, one per line): the same byte-level BPE as Qwen2
  (``tokenizer.build_qwen2_tokenizer_json``: Qwen's split pattern, NFC), with Qwen (v1)'s special
  tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|extra_0|>`` … ``<|extra_204|>`` from
  id 151643. The BPE merges are derived from the ranks as llama.cpp's converter derives them (each
  token's last merge: tiktoken's BPE run on its bytes with the lower ranks), which makes `tokenizers`
  encode as tiktoken does. The derivation takes seconds, so the result is cached by the file's hash
  under ``<cache>/tokenizers/``.
- SentencePiece ``tokenizer.model`` (Llama and its family), read with `sentencepiece` and its protobuf
  schema, built as transformers 5 builds a LlamaTokenizer from it (``convert_slow_tokenizer``'s
  ``SentencePieceExtractor``): no normalizer, a Metaspace pre-tokenizer (the "▁" prepended to the
  text's first section, or to every section with ``legacy``, or never without ``add_prefix_space``),
  byte fallback, the decoder Replace("▁", " ") → ByteFallback → Fuse → Strip one leading space. A BPE
  model gets BPE merges ordered by the merged piece's id (its rank); a unigram model keeps
  `tokenizers`' Unigram over the pieces' scores (sentencepiece's own segmentation, where transformers 5
  would force BPE). Control pieces become special added tokens, user-defined pieces plain ones.
- A GGUF "llama" vocabulary (tokens, scores, types; no merges): the same, merges ordered by score as
  llama.cpp's SPM tokenizer merges.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ----------------------------------------------------------------------------------------------
# SentencePiece

# sentencepiece's piece types (sentencepiece_model.proto), equal to gguf's TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_UNDERLINE = "\u2581"


@dataclass(frozen=True)
class SentencePieceVocab:
    """What a SentencePiece model holds that tokenization needs."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: str  # "bpe" or "unigram"
    unk_id: int
    bos_id: int = -1
    eos_id: int = -1

    def id_of(self, piece: str) -> int | None:
        try:
            return self.pieces.index(piece)
        except ValueError:
            return None


def read_sentencepiece(path: str | os.PathLike) -> SentencePieceVocab:
    """A ``tokenizer.model``'s pieces; one-line errors naming the file for anything else."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)  # sentencepiece's own checks
        proto = sentencepiece_model_pb2.ModelProto.FromString(data)
    except Exception:  # sentencepiece raises RuntimeError, protobuf DecodeError
        raise ModelFileError(f"{path}: not a SentencePiece model") from None
    if not proto.pieces:
        raise ModelFileError(f"{path}: not a SentencePiece model (it has no pieces)")
    kinds = {1: "unigram", 2: "bpe"}
    model_type = kinds.get(proto.trainer_spec.model_type)
    if model_type is None:
        raise ModelFileError(
            f"{path}: a SentencePiece model of type {proto.trainer_spec.model_type} (qwenvl reads BPE and unigram)"
        )
    return SentencePieceVocab(
        pieces=[p.piece for p in proto.pieces],
        scores=[p.score for p in proto.pieces],
        types=[p.type or NORMAL for p in proto.pieces],
        model_type=model_type,
        unk_id=proto.trainer_spec.unk_id,
        bos_id=proto.trainer_spec.bos_id,
        eos_id=proto.trainer_spec.eos_id,
    )


def generate_merges(vocab: dict[str, int], scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, as a BPE merge: by the merged piece's id (lowest
    first), or with ``scores`` by its score (highest first); ties by the parts' lengths, then ids
    (transformers' ``generate_merges``)."""
    by_score = scores is not None
    rank: dict[str, float] = scores if by_score else vocab  # type: ignore[assignment]
    merges = []
    for merged, value in rank.items():
        local = []
        for index in range(1, len(merged)):
            left, right = merged[:index], merged[index:]
            if left in vocab and right in vocab:
                local.append((left, right, value))
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=by_score)
    return [(left, right) for left, right, _ in merges]


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool
    normalized: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def prefix_scheme(*, legacy: bool, add_prefix_space: bool) -> str:
    """Where transformers 5's LlamaTokenizer puts the "▁" of SentencePiece's dummy prefix."""
    return ("always" if legacy else "first") if add_prefix_space else "never"


def sentencepiece_tokenizer_json(
    vocab: SentencePieceVocab, added: list[AddedToken], *, prefix: str = "first", merge_by_score: bool = False
) -> str:
    """The tokenizer.json transformers 5 builds for a Llama tokenizer from this vocabulary (see the
    module's docstring). ``added``: tokens matched before the model runs, at their ids (the
    vocabulary's own or the next ones). ``prefix``: "first" / "always" / "never" as transformers'
    Metaspace puts a "▁" before the text's first section, every section or none; "fragments" as
    llama.cpp does, before every piece of text between added tokens even if it starts with a space.
    ``merge_by_score``: BPE merges by score (llama.cpp's SPM) rather than by id."""
    ids = {piece: i for i, piece in enumerate(vocab.pieces)}
    if vocab.model_type == "bpe":
        scores = dict(zip(vocab.pieces, vocab.scores)) if merge_by_score else None
        model: dict[str, Any] = {
            "type": "BPE",
            "dropout": None,
            "unk_token": vocab.pieces[vocab.unk_id] if 0 <= vocab.unk_id < len(vocab.pieces) else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": ids,
            "merges": [list(pair) for pair in generate_merges(ids, scores)],
        }
    else:
        model = {"type": "Unigram", "unk_id": vocab.unk_id, "vocab": [list(x) for x in zip(vocab.pieces, vocab.scores)]}
        model["byte_fallback"] = True
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix != "never":
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    pre_tokenizer = {"type": "Metaspace", "replacement": SPIECE_UNDERLINE, "prepend_scheme": prefix, "split": False}
    normalizer = None
    if prefix == "fragments":
        pre_tokenizer = None
        normalizer = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE},
            ],
        }
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token.id,
                "content": token.content,
                "single_word": token.single_word,
                "lstrip": token.lstrip,
                "rstrip": token.rstrip,
                "normalized": token.normalized,
                "special": token.special,
            }
            for token in sorted(added, key=lambda t: t.id)
        ],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }
    return json.dumps(document, ensure_ascii=False)


__all__ = [
    "AddedToken",
    "QWEN_FIRST_SPECIAL_ID",
    "SentencePieceVocab",
    "QWEN_SPECIAL_TOKENS",
    "read_sentencepiece",
    "read_tiktoken",
    "prefix_scheme",
    "sentencepiece_tokenizer_json",
    "tiktoken_merges",
    "tiktoken_tokenizer_json",
]
