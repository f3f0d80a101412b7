"""Qwen's byte-level BPE tokenizer on top of the `tokenizers` library, plus a streaming detokenizer.

Loads the `tokenizer.json` that HF checkpoints ship (or one built from GGUF metadata with
`build_qwen2_tokenizer_json`), reads the special tokens and the chat template next to it, and turns
generated ids back into text one token at a time without ever emitting half a UTF-8 character.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from .errors import ModelFileError

# The pre-tokenizer regex of Qwen2 / Qwen2.5 / Qwen2-VL (tiktoken's form, as in their tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


class Tokenizer:
    """Text ↔ ids for one model: `tokenizers.Tokenizer` plus its special tokens and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        source: str = "tokenizer.json",
        tool_chat_template: str | None = None,
    ):
        self._backend = backend
        self._plain_text_backend: tokenizers.Tokenizer | None = None
        self._plain_text_lock = threading.Lock()
        self.chat_template = chat_template
        # a template with a tool section, when chat_template has none (Qwen2.5-VL's tokenizer_config.json)
        self.tool_chat_template = tool_chat_template
        self.eos_token, self.eos_token_id = self._special(eos_token, "eos_token", source)
        self.pad_token, self.pad_token_id = self._special(pad_token, "pad_token", source)
        self.bos_token, self.bos_token_id = self._special(bos_token, "bos_token", source)
        added = backend.get_added_tokens_decoder()
        self.special_token_ids: set[int] = {token_id for token_id, token in added.items() if token.special}
        self._added_token_ids = frozenset(added)

    # ---- construction ----

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json` and the chat template) from a model directory."""
        path = Path(path)
        json_file = path / "tokenizer.json"
        if not json_file.is_file():
            raise ModelFileError(f"{json_file}: missing (a tokenizer.json is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(json_file))
        except Exception as error:  # tokenizers raises plain Exception on malformed files
            raise ModelFileError(f"{json_file}: not a valid tokenizer.json ({_one_line(error)})") from None

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        _add_missing_added_tokens(backend, config.get("added_tokens_decoder") or {}, config_file)
        return cls(
            backend,
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            bos_token=_token_content(config.get("bos_token")),
            chat_template=_find_chat_template(path, config),
            source=str(config_file),
            tool_chat_template=_find_tool_template(path, config),
        )

    @classmethod
    def from_json(
        cls,
        tokenizer_json: str,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        tool_chat_template: str | None = None,
    ) -> Tokenizer:
        """Build from a tokenizer.json string (e.g. one made by `build_qwen2_tokenizer_json`)."""
        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as error:
            raise ModelFileError(f"tokenizer: not a valid tokenizer.json ({_one_line(error)})") from None
        return cls(
            backend,
            eos_token=eos_token,
            pad_token=pad_token,
            bos_token=bos_token,
            chat_template=chat_template,
            source="tokenizer",
            tool_chat_template=tool_chat_template,
        )

    def _special(self, token: str | None, field: str, source: str) -> tuple[str | None, int | None]:
        if token is None:
            return None, None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ModelFileError(f"{source}: {field} {token!r} is not in the vocabulary")
        return token, token_id

    # ---- text ↔ ids ----

    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Ids of `text`, no BOS/EOS added. With parse_special=False, special-token text is plain text.

        Non-special added tokens (Qwen2.5's `<tool_call>`) are always matched, as in transformers and llama.cpp.
        """
        backend = self._backend if parse_special else self._plain_text()
        return backend.encode(text, add_special_tokens=False).ids

    def _plain_text(self) -> tokenizers.Tokenizer:
        # A second backend with encode_special_tokens set, so that the shared one is never toggled mid-encode.
        with self._plain_text_lock:
            if self._plain_text_backend is None:
                backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
                backend.encode_special_tokens = True
                self._plain_text_backend = backend
            return self._plain_text_backend

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The text of each token on its own (a token holding part of a UTF-8 character shows U+FFFD)."""
        return [self._backend.decode([token_id], skip_special_tokens=False) for token_id in ids]

    def to_json(self) -> str:
        """The tokenizer.json this tokenizer runs (added tokens included): what llguidance reads."""
        return self._backend.to_str()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (b"" for an id with no token): its byte-level BPE string mapped
        back to bytes, or an added token's own text."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            return b""
        decoder = _byte_decoder()
        if token_id in self._added_token_ids or any(char not in decoder for char in token):
            return token.encode("utf-8")
        return bytes(decoder[char] for char in token)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the character each byte is written as → the byte."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [byte for byte in range(256) if byte not in shown]
    table = {chr(byte): byte for byte in shown}
    table.update({chr(256 + index): byte for index, byte in enumerate(hidden)})
    return table


class StreamDecoder:
    """Turns ids into text one at a time, holding back only a trailing incomplete UTF-8 character.

    The prefix-offset scheme of vLLM/TGI: decode a short window of recent ids and emit what it adds past
    the text already emitted. A lossy UTF-8 decode ends in U+FFFD while the last character is incomplete,
    and everything before that last character is final. The window restarts wherever its text ended on a
    whole character, so concatenating every `push` and the final `flush` gives exactly
    `decode(all_ids, skip_special_tokens=...)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window starts here, where the text so far ended on a whole character
        self._read_offset = 0  # the next such point: ids[prefix:read] decode to `_read_length` characters
        self._read_length = 0
        self._emitted = 0  # characters of the window's text already returned

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        window = self._window_text()
        incomplete = window.endswith("\ufffd")
        stable = len(window) - 1 if incomplete else len(window)
        piece = window[self._emitted : stable]
        self._emitted = max(self._emitted, stable)
        if not incomplete:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._read_length = self._emitted = len(window) - self._read_length
        return piece

    def flush(self) -> str:
        """The text still held back at the end of the stream (an unfinished character shows as U+FFFD)."""
        piece = self._window_text()[self._emitted :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._read_length = self._emitted = 0
        return piece

    def _window_text(self) -> str:
        window = self._ids[self._prefix_offset :]
        return self._tokenizer.decode(window, skip_special_tokens=self._skip_special_tokens)


def build_qwen2_tokenizer_json(
    vocab: dict[str, int] | list[str],
    merges: list[str] | list[tuple[str, str]],
    added_tokens: list[tuple[int, str, bool]],
) -> str:
    """A tokenizer.json laid out like the one Qwen2 / Qwen2.5 / Qwen2-VL checkpoints ship.

    vocab: byte-level token strings (a list is indexed by id); merges: "a b" strings or pairs, highest
    priority first; added_tokens: (id, content, special). Added-token ids are left out of the BPE vocab,
    as in the shipped files, unless ordinary ids follow them (a GGUF's padding tokens): `tokenizers` numbers
    added tokens missing from the BPE vocab from its size up, so those stay in the vocab to keep their ids.
    """
    if isinstance(vocab, dict):
        vocab_by_id = {token_id: token for token, token_id in vocab.items()}
    else:
        vocab_by_id = dict(enumerate(vocab))
    added_ids = {token_id for token_id, _, _ in added_tokens}
    last_plain_id = max((token_id for token_id in vocab_by_id if token_id not in added_ids), default=-1)
    vocab_by_id.update({token_id: content for token_id, content, _ in added_tokens if token_id < last_plain_id})
    bpe_vocab = {
        token: token_id
        for token_id, token in sorted(vocab_by_id.items())
        if token_id not in added_ids or token_id < last_plain_id
    }
    bpe_merges = [merge.split(" ", 1) if isinstance(merge, str) else list(merge) for merge in merges]
    document: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token_id,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for token_id, content, special in sorted(added_tokens)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                dict(_BYTE_LEVEL),
            ],
        },
        "post_processor": dict(_BYTE_LEVEL),
        "decoder": dict(_BYTE_LEVEL),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": bpe_vocab,
            "merges": bpe_merges,
        },
    }
    return json.dumps(document, ensure_ascii=False)


# ---- tokenizer_config.json and chat-template files ----


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: cannot read JSON ({_one_line(error)})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _add_missing_added_tokens(backend: tokenizers.Tokenizer, added: dict, config_file: Path) -> None:
    """Add the added_tokens_decoder entries that tokenizer.json lacks (they must come next, in id order)."""
    for key, spec in sorted(added.items(), key=lambda item: int(item[0])):
        content = _token_content(spec)
        if content is None or backend.token_to_id(content) is not None:
            continue
        token_id = int(key)
        if token_id != backend.get_vocab_size(with_added_tokens=True):
            raise ModelFileError(f"{config_file}: added token {content!r} id {token_id} is not in tokenizer.json")
        token = tokenizers.AddedToken(
            content,
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", False),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


def _find_chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's chat_template."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ModelFileError(f"{jinja_file}: cannot read ({_one_line(error)})") from None
    json_file = path / "chat_template.json"
    if json_file.is_file():
        return _select_template(_read_json(json_file).get("chat_template"), json_file)
    return _select_template(config.get("chat_template"), path / "tokenizer_config.json")


def _find_tool_template(path: Path, config: dict) -> str | None:
    """The template that renders ``tools`` when the chosen one does not: a ``tool_use`` entry of a named
    list, else tokenizer_config.json's own template (Qwen2.5-VL ships its tool template there, and
    the vision-only one in chat_template.json). None when nothing but the chosen template exists."""
    candidates = []
    json_file = path / "chat_template.json"
    for value in (
        _read_json(json_file).get("chat_template") if json_file.is_file() else None,
        config.get("chat_template"),
    ):
        if isinstance(value, list):
            candidates += [
                item.get("template") for item in value if isinstance(item, dict) and item.get("name") == "tool_use"
            ]
        elif isinstance(value, str):
            candidates.append(value)
    from .chat import template_uses_tools

    return next(
        (template for template in candidates if isinstance(template, str) and template_uses_tools(template)), None
    )


def _select_template(value: Any, source: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if "default" in named:
            return named["default"]
        raise ModelFileError(f"{source}: chat_template list has no template named 'default'")
    raise ModelFileError(f"{source}: chat_template must be a string or a list of named templates")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
