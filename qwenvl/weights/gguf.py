"""GGUF text models (llama.cpp's ``qwen2`` / ``qwen2vl`` architectures): config, tokenizer, tensors.

The header is parsed here directly from a memory map (``gguf.GGUFReader`` builds one numpy view per
vocabulary string and takes ~12 s on a Qwen2 vocabulary; this takes well under a second); the layout
constants, block sizes and dequantization come from llama.cpp's ``gguf`` package. Tensors stay in the
memory map until asked for, then are dequantized one at a time with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import quants as gguf_quants
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    TokenType,
)

from ..config import GenerationConfig, ModelConfig, PreprocessConfig, TextConfig
from ..config_fields import MAX_CONTEXT, MAX_HEADS, MAX_LAYERS, MAX_WIDTH, check_range
from ..errors import ModelFileError
from ..tokenizer import Tokenizer, build_qwen2_tokenizer_json
from ..vocab import AddedToken, SentencePieceVocab, sentencepiece_tokenizer_json
from .checkpoint import Checkpoint, with_chat_stops
from .layout import GGUF_ARCHITECTURES, Layout, layout_for, unpermute_rows

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_UNPACKERS = {kind: struct.Struct(fmt) for kind, fmt in _SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Low-level file layout


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor entry of the file: ``shape`` is in torch order (GGUF stores it reversed)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The shape of the raw uint8 blocks: rows stay, the last dim becomes bytes per row."""
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return (*self.shape[:-1], self.shape[-1] // block_size * type_size)


class _Cursor:
    """Sequential little-endian reads from a buffer; running off its end raises _Truncated."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, unpacker: struct.Struct) -> Any:
        return unpacker.unpack_from(self.buf, self._advance(unpacker.size))[0]

    def string(self) -> str:
        length = self.unpack(_U64)
        start = self._advance(length)
        return self.buf[start : start + length].decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            return self.array()
        unpacker = _UNPACKERS.get(kind)  # type: ignore[call-overload]
        if unpacker is None:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.unpack(unpacker)

    def array(self) -> list[Any]:
        kind = self.unpack(_U32)
        count = self.unpack(_U64)
        if kind == GGUFValueType.STRING:
            return [self.string() for _ in range(count)]
        if kind == GGUFValueType.ARRAY:
            return [self.array() for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(kind)  # type: ignore[call-overload]
        if fmt is None:
            raise ValueError(f"unknown metadata value type {kind}")
        dtype = np.dtype(fmt)
        start = self._advance(dtype.itemsize * count)
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).tolist()

    def _advance(self, size: int) -> int:
        start = self.pos
        if start + size > len(self.buf):
            raise _Truncated
        self.pos += size
        return start


def _parse_header(
    buf: mmap.mmap, where: str, value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] | None = None
) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
    """(metadata, [(name, ggml dims, raw type, relative offset)], absolute data start).

    ``value_types``, if given, receives each key's (type, array element type) so the values can be
    written back as they were (``qwenvl quantize`` copies metadata).
    """
    cursor = _Cursor(buf)
    if len(buf) < 4 or cursor.unpack(_U32) != GGUF_MAGIC:
        raise ModelFileError(f"{where}: not a GGUF file (wrong magic bytes)")
    version = cursor.unpack(_U32)
    if version & 0xFFFF == 0 and version:
        raise ModelFileError(f"{where}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise ModelFileError(f"{where}: unsupported GGUF version {version} (qwenvl reads versions 2 and 3)")
    n_tensors = cursor.unpack(_U64)
    n_fields = cursor.unpack(_U64)
    metadata: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cursor.string()
        kind = cursor.unpack(_U32)
        if value_types is not None:
            element = _U32.unpack_from(buf, cursor.pos)[0] if kind == GGUFValueType.ARRAY else None
            value_types[key] = (GGUFValueType(kind), None if element is None else GGUFValueType(element))
        metadata[key] = cursor.value(kind)
    entries = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack(_U32)
        dims = [cursor.unpack(_U64) for _ in range(n_dims)]
        entries.append((name, dims, cursor.unpack(_U32), cursor.unpack(_U64)))
    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    return metadata, entries, data_start


def _tensor_infos(
    entries: list[tuple[str, list[int], int, int]], data_start: int, file_size: int, where: str
) -> dict[str, GGUFTensorInfo]:
    infos = {}
    for name, dims, raw_type, rel_offset in entries:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelFileError(f"{where}: tensor {name} has unknown tensor type {raw_type}") from None
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_elements = math.prod(dims)
        if dims and dims[0] % block_size:
            raise ModelFileError(
                f"{where}: tensor {name} has a row of {dims[0]}, not a multiple of the "
                f"{ggml_type.name} block size {block_size}"
            )
        info = GGUFTensorInfo(
            name=name,
            ggml_type=ggml_type,
            shape=tuple(int(d) for d in reversed(dims)),
            offset=data_start + rel_offset,
            n_bytes=n_elements // block_size * type_size,
        )
        if info.offset + info.n_bytes > file_size:
            raise ModelFileError(
                f"{where}: truncated file or bad tensor offset (tensor {name}'s data ends at byte "
                f"{info.offset + info.n_bytes:,}, the file has {file_size:,})"
            )
        infos[name] = info
    return infos


@functools.cache
def can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` implements the type (tried on one zero block)."""
    type_size = GGML_QUANT_SIZES[ggml_type][1]
    try:
        gguf_quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Metadata → config, tokenizer, generation defaults


def _meta(metadata: dict[str, Any], key: str, where: str) -> Any:
    if key not in metadata:
        raise ModelFileError(f"{where}: missing metadata key '{key}'")
    return metadata[key]


def model_config_from_gguf(
    metadata: dict[str, Any], tensors: dict[str, GGUFTensorInfo], where: str = "model.gguf"
) -> ModelConfig:
    gguf_arch = _meta(metadata, "general.architecture", where)
    if gguf_arch not in GGUF_ARCHITECTURES:
        hint = " (a vision projector: pass the text model's GGUF)" if gguf_arch == "clip" else ""
        raise ModelFileError(
            f"{where}: unsupported architecture {gguf_arch!r}{hint}; qwenvl reads {', '.join(GGUF_ARCHITECTURES)}"
        )
    arch = GGUF_ARCHITECTURES[gguf_arch]
    layout = layout_for(arch)

    def key(name: str, high: int | None = MAX_WIDTH) -> Any:
        """The metadata value (checked to be an integer in [1, high] unless high is None)."""
        value = _meta(metadata, f"{gguf_arch}.{name}", where)
        if high is not None:
            check_range(where, f"{gguf_arch}.{name}", value, 1, high)
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count", MAX_HEADS))
    key_length = metadata.get(f"{gguf_arch}.attention.key_length")
    if key_length:
        check_range(where, f"{gguf_arch}.attention.key_length", key_length, 1, MAX_WIDTH)
    head_dim = int(key_length or hidden // heads)
    kv_heads = metadata.get(f"{gguf_arch}.attention.head_count_kv") or heads
    check_range(where, f"{gguf_arch}.attention.head_count_kv", kv_heads, 1, MAX_HEADS)
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelFileError(f"{where}: missing tensor token_embd.weight")
    mrope = None
    if gguf_arch == "qwen2vl":
        sections = key("rope.dimension_sections", None)
        if not isinstance(sections, list) or len(sections) < 3 or any(type(x) is not int or x < 0 for x in sections):
            raise ModelFileError(f"{where}: {gguf_arch}.rope.dimension_sections: expected a list of 3 or 4 sizes")
        mrope = tuple(int(s) for s in sections[:3])
    seq_length = metadata.get(f"{gguf_arch}.seq_length", 0)  # qwenvl's own keys (Qwen v1: gguf_meta.py)
    if seq_length:
        check_range(where, f"{gguf_arch}.seq_length", seq_length, 1, MAX_CONTEXT)
    try:
        text = TextConfig(
            vocab_size=embedding.shape[0],
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")) // layout.ffn_factor,
            num_hidden_layers=int(key("block_count", MAX_LAYERS)),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=head_dim,
            # stored as float32: take its shortest repr so 1e-6 reads back as 1e-6, not 9.99999997e-07
            rms_norm_eps=_float_meta(key("attention.layer_norm_rms_epsilon", None), "layer_norm_rms_epsilon", where),
            rope_theta=_float_meta(  # llama.cpp's default where the file has none
                metadata.get(f"{gguf_arch}.rope.freq_base", 10000.0), "rope.freq_base", where
            ),
            max_position_embeddings=int(key("context_length", MAX_CONTEXT)),
            tie_word_embeddings="output.weight" not in tensors,
            mrope_section=mrope,
            seq_length=int(seq_length),
            use_dynamic_ntk=bool(metadata.get(f"{gguf_arch}.use_dynamic_ntk", False)),
            use_logn_attn=bool(metadata.get(f"{gguf_arch}.use_logn_attn", False)),
            **layout.gguf_biases(tensors),
        )
    except ModelFileError as error:  # the dataclass's own checks, which do not know the file
        raise ModelFileError(f"{where}: {error}") from None
    return ModelConfig(arch=arch, text=text)


def _float_meta(value: Any, name: str, where: str) -> float:
    """A float32 metadata value as its shortest repr; a one-line error when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise ModelFileError(f"{where}: {name}: expected a finite number, got {value!r}")
    return float(str(np.float32(value)))


def _check_tensors(infos: dict[str, GGUFTensorInfo], text: TextConfig, layout: Layout, where: str) -> None:
    expected = layout.gguf_shapes(text)
    for name, shape in expected.items():
        info = infos.get(name)
        if info is None:
            raise ModelFileError(f"{where}: missing tensor {name}")
        if info.shape != shape:
            raise ModelFileError(f"{where}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
        if not can_dequantize(info.ggml_type):
            raise ModelFileError(f"{where}: tensor {name} has unsupported tensor type {info.ggml_type.name}")
    extra = sorted(set(infos) - set(expected))
    if extra:
        raise ModelFileError(
            f"{where}: unexpected tensor {extra[0]} for a {text.num_hidden_layers}-layer {layout.name} model"
        )


def _check_tokenizer_kind(metadata: dict[str, Any], where: str) -> str:
    """ "gpt2" (Qwen's byte-level BPE, pre-tokenizer "qwen2") or "llama" (SentencePiece)."""
    model = _meta(metadata, "tokenizer.ggml.model", where)
    pre = metadata.get("tokenizer.ggml.pre", "qwen2" if model == "gpt2" else "default")
    if (model, pre) not in (("gpt2", "qwen2"), ("llama", "default")):
        raise ModelFileError(
            f"{where}: unsupported tokenizer (tokenizer.ggml.model={model!r}, pre={pre!r}); qwenvl reads "
            "Qwen's byte-level BPE ('gpt2', pre 'qwen2') and SentencePiece ('llama')"
        )
    return model


def _sentencepiece_vocab(metadata: dict[str, Any], where: str) -> SentencePieceVocab:
    """A GGUF "llama" vocabulary (tokens, scores, types) as SentencePiece pieces."""
    tokens = _meta(metadata, "tokenizer.ggml.tokens", where)
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise ModelFileError(f"{where}: tokenizer.ggml tokens, scores and types differ in length")
    unk = _optional_id(metadata, "unknown_token_id")
    if unk is None:
        unk = next((i for i, kind in enumerate(types) if kind == TokenType.UNKNOWN), 0)
    return SentencePieceVocab(list(tokens), [float(x) for x in scores], [int(t) for t in types], "bpe", unk)


def _split_vocab(metadata: dict[str, Any], where: str) -> tuple[dict[str, int], list[tuple[int, str, bool]]]:
    """(BPE vocab, added tokens as (id, content, special)) from the token list and its types."""
    tokens = _meta(metadata, "tokenizer.ggml.tokens", where)
    types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    added: list[tuple[int, str, bool]] = []
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED):
            # llama.cpp's converter types HF's added tokens so: CONTROL if special, else USER_DEFINED
            added.append((token_id, token, kind == TokenType.CONTROL))
        elif kind != TokenType.UNUSED:  # UNUSED: the "[PAD151665]" rows padding the embedding
            vocab[token] = token_id
    return vocab, added


def _optional_id(metadata: dict[str, Any], key: str) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


_TOKEN_ID_KEYS = ("eos_token_id", "bos_token_id", "padding_token_id", "eot_token_id", "eom_token_id")


def _check_token_ids(metadata: dict[str, Any], where: str) -> None:
    n_tokens = len(_meta(metadata, "tokenizer.ggml.tokens", where))
    for key in _TOKEN_ID_KEYS:
        token_id = _optional_id(metadata, key)
        if token_id is not None and not 0 <= token_id < n_tokens:
            raise ModelFileError(f"{where}: tokenizer.ggml.{key} {token_id} is outside the {n_tokens}-token vocabulary")


# ----------------------------------------------------------------------------------------------
# The model


class MappedTensors:
    """A text model's tensors in a memory-mapped file (a GGUF, a qwen.cpp file), by HF name.

    Subclasses set ``path``, ``config``, ``layout``, ``tensor_infos`` (by the file's names, mapped by
    ``layout.to_gguf``) and ``_buf``. Tensors whose rows the file interleaves per head (llama.cpp's
    llama q/k) come back in HF's order, quantized bytes included (rows are independent).
    """

    path: Path
    config: ModelConfig
    layout: Layout
    tensor_infos: dict[str, GGUFTensorInfo]
    _buf: mmap.mmap

    def file_name(self, hf_name: str) -> str:
        """The tensor's name in the file."""
        return self.layout.to_gguf(hf_name)

    def hf_names(self) -> list[str]:
        return [self.layout.to_hf(name) for name in self.tensor_infos]

    def info(self, hf_name: str) -> GGUFTensorInfo:
        try:
            return self.tensor_infos[self.file_name(hf_name)]
        except KeyError:
            raise ModelFileError(f"{self.path}: missing tensor {hf_name}") from None

    def _heads(self, hf_name: str) -> int | None:
        return self.layout.rope_heads(hf_name, self.config.text)

    def raw(self, hf_name: str) -> np.ndarray:
        """The tensor's bytes as stored (uint8 blocks, shape ``info.byte_shape``): a view of the map,
        or a copy with the rows put in HF's order where the file interleaves them."""
        data = raw_tensor(self._buf, self.info(hf_name))
        heads = self._heads(hf_name)
        return data if heads is None else unpermute_rows(torch.from_numpy(np.array(data)), heads).numpy()

    def tensor(self, hf_name: str) -> torch.Tensor:
        """One tensor, dequantized to float32, in torch layout (rows in HF's order)."""
        tensor = dequantized_tensor(self._buf, self.info(hf_name))
        heads = self._heads(hf_name)
        return tensor if heads is None else unpermute_rows(tensor, heads).contiguous()

    def raw_joined(self, hf_names: Sequence[str]) -> np.ndarray | None:
        """The bytes of matrices stored back to back in one format (llama.cpp writes ffn_gate just
        before ffn_up) as one uint8 view [total rows, bytes per row]; None when they are not."""
        if any(self._heads(name) is not None for name in hf_names):
            return None
        infos = [self.info(name) for name in hf_names]
        first = infos[0]
        for before, after in zip(infos, infos[1:]):
            if after.offset != before.offset + before.n_bytes or after.ggml_type != first.ggml_type:
                return None
            if len(after.shape) != 2 or after.byte_shape[1:] != first.byte_shape[1:]:
                return None
        total = sum(info.n_bytes for info in infos)
        data = np.frombuffer(self._buf, dtype=np.uint8, count=total, offset=first.offset)
        return data.reshape(-1, first.byte_shape[-1])

    def has(self, hf_name: str) -> bool:
        try:
            return self.file_name(hf_name) in self.tensor_infos
        except KeyError:
            return False

    def release(self, hf_names: Sequence[str]) -> None:
        """Drop the named tensors' pages from memory (after they were copied elsewhere): the map is
        private and never written, so a later read just faults the file's bytes back in."""
        page = mmap.PAGESIZE
        for hf_name in hf_names:
            info = self.info(hf_name)
            start = -(-info.offset // page) * page
            stop = (info.offset + info.n_bytes) // page * page
            if stop > start:
                self._buf.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every tensor, one dequantized at a time."""
        for hf_name in self.hf_names():
            yield hf_name, self.tensor(hf_name)

    def close(self) -> None:
        try:
            self._buf.close()
        except BufferError:  # a tensor from raw() still views the map: it closes when that is freed
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GGUFModel(MappedTensors):
    """A GGUF text model opened lazily: tensors are read from the memory map when asked for."""

    def __init__(self, path: Path, buf: mmap.mmap, metadata: dict[str, Any], infos: dict[str, GGUFTensorInfo]):
        self.path = path
        self.metadata = metadata
        self.tensor_infos = infos  # by GGUF name
        self._buf = buf
        where = str(path)
        self.config = model_config_from_gguf(metadata, infos, where)
        self.layout = layout_for(self.config.arch)
        _check_tensors(infos, self.config.text, self.layout, where)
        self.eos_token_id = _optional_id(metadata, "eos_token_id")
        self.bos_token_id = _optional_id(metadata, "bos_token_id")
        self.pad_token_id = _optional_id(metadata, "padding_token_id")
        _check_token_ids(metadata, where)
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")
        self.tool_chat_template: str | None = metadata.get("tokenizer.chat_template.tool_use")  # llama.cpp's name
        self.tokenizer_model = _check_tokenizer_kind(metadata, where)
        spm = self.tokenizer_model == "llama"  # llama.cpp adds BOS to SentencePiece prompts unless told not to
        self.add_bos_token = bool(metadata.get("tokenizer.ggml.add_bos_token", spm))
        self.add_eos_token = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self._vocab, self.added_tokens = _split_vocab(metadata, where)
        self._spm = _sentencepiece_vocab(metadata, where) if spm else None
        self._merges = None if spm else _meta(metadata, "tokenizer.ggml.merges", where)
        self._tokenizer_json: str | None = None

    @property
    def tokenizer_json(self) -> str:
        """A tokenizer.json equal in behaviour to the checkpoint's own (built on first use, ~1 s); for
        a SentencePiece vocabulary, llama.cpp's: merges by score, a "▁" before every text fragment."""
        if self._tokenizer_json is None:
            if self._spm is not None:
                added = [AddedToken(i, content, special) for i, content, special in self.added_tokens]
                prefix = "fragments" if self.metadata.get("tokenizer.ggml.add_space_prefix", True) else "never"
                self._tokenizer_json = sentencepiece_tokenizer_json(
                    self._spm, added, prefix=prefix, merge_by_score=True
                )
            else:
                self._tokenizer_json = build_qwen2_tokenizer_json(self._vocab, self._merges, self.added_tokens)
        return self._tokenizer_json

    @property
    def sentencepiece_vocab(self) -> SentencePieceVocab | None:
        """The SentencePiece pieces, scores and types of a "llama" vocabulary (None for BPE ones)."""
        return self._spm

    @property
    def bos_token(self) -> str | None:
        """The bos text, only when the file asks for it to be added (Qwen2 files do not)."""
        return self.token_text(self.bos_token_id) if self.add_bos_token else None

    def tokenizer(self) -> Tokenizer:
        tokenizer = Tokenizer.from_json(
            self.tokenizer_json,
            eos_token=self.token_text(self.eos_token_id),
            pad_token=self.token_text(self.pad_token_id),
            bos_token=self.bos_token,
            chat_template=self.chat_template,
            tool_chat_template=self.tool_chat_template,
        )
        tokenizer.add_bos_token, tokenizer.add_eos_token = self.add_bos_token, self.add_eos_token
        return tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Stop tokens the file names: its eos, then its end-of-turn / end-of-message ids if any."""
        ids = [_optional_id(self.metadata, key) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    @property
    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id)

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.metadata["tokenizer.ggml.tokens"][token_id]


def raw_tensor(buf: mmap.mmap, info: GGUFTensorInfo) -> np.ndarray:
    """A tensor's bytes as stored (uint8 blocks, shape ``info.byte_shape``), a view of the map."""
    data = np.frombuffer(buf, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
    return data.reshape(info.byte_shape)


def dequantized_tensor(buf: mmap.mmap, info: GGUFTensorInfo) -> torch.Tensor:
    """A tensor dequantized to float32 by ``gguf.quants.dequantize``, in torch layout."""
    values = gguf_quants.dequantize(raw_tensor(buf, info), info.ggml_type)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only map
        values = values.copy()
    return torch.from_numpy(values.reshape(info.shape))


class GGUFFile:
    """Any GGUF file, architecture unchecked: metadata (with value types), tensor infos, tensors."""

    def __init__(
        self,
        path: Path,
        buf: mmap.mmap,
        metadata: dict[str, Any],
        infos: dict[str, GGUFTensorInfo],
        value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]],
    ):
        self.path = path
        self.metadata = metadata
        self.tensor_infos = infos
        self.value_types = value_types
        self._buf = buf

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def raw(self, name: str) -> np.ndarray:
        return raw_tensor(self._buf, self._info(name))

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor by GGUF name, dequantized to float32."""
        info = self._info(name)
        if not can_dequantize(info.ggml_type):
            raise ModelFileError(f"{self.path}: tensor {name} has unsupported tensor type {info.ggml_type.name}")
        return dequantized_tensor(self._buf, info)

    def text_model(self) -> GGUFModel:
        """The file read as a qwen2 / qwen2vl text model (checked; shares this file's map)."""
        return GGUFModel(self.path, self._buf, self.metadata, self.tensor_infos)

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensor_infos[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: missing tensor {name}") from None

    def close(self) -> None:
        try:
            self._buf.close()
        except BufferError:  # a raw() view is still alive: the map closes when it is freed
            pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf_file(path: str | os.PathLike) -> GGUFFile:
    """Parse any GGUF file's header (clear errors for a bad file); the tensors stay on disk."""
    path = Path(path)
    buf = _open_map(path)
    try:
        value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        metadata, infos = _read_layout(buf, path, value_types)
        return GGUFFile(path, buf, metadata, infos, value_types)
    except BaseException:
        buf.close()
        raise


def _read_layout(
    buf: mmap.mmap, path: Path, value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] | None = None
) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    try:
        metadata, entries, data_start = _parse_header(buf, str(path), value_types)
    except _Truncated:
        raise ModelFileError(f"{path}: truncated file (header ends past its end)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: malformed GGUF header ({exc})") from None
    return metadata, _tensor_infos(entries, data_start, len(buf), str(path))


def _open_map(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise ModelFileError(f"{path}: not a GGUF file (empty)")
            # private and copy-on-write: tensors can share the pages without copying them (nothing writes)
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a GGUF file") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None


class DequantizedTensors(Mapping[str, torch.Tensor]):
    """HF name → float32 tensor, dequantized when looked up (nothing is kept)."""

    def __init__(self, model: GGUFModel):
        self._model = model
        self._names = dict.fromkeys(model.hf_names())

    def __getitem__(self, hf_name: str) -> torch.Tensor:
        if hf_name not in self._names:
            raise KeyError(hf_name)
        return self._model.tensor(hf_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_gguf_checkpoint(path: str | os.PathLike, mmproj: str | os.PathLike | None = None) -> Checkpoint:
    """A GGUF text model (with its vision ``mmproj`` GGUF, if any) as the loaders' common Checkpoint view."""
    model = read_gguf(path)
    if mmproj is None and model.config.arch == "qwen2_vl":
        mmproj = mmproj_beside(model)
    if mmproj is None:
        tokenizer = model.tokenizer()
        return Checkpoint(
            source=str(model.path),
            config=model.config,
            tokenizer=tokenizer,
            generation_config=with_chat_stops(model.generation_config, model.config.arch, tokenizer),
            preprocess_config=PreprocessConfig(),
            chat_template=model.chat_template,
            tensors=lambda: DequantizedTensors(model),
            quantized=model,
        )
    from .mmproj import VisionTensors, read_mmproj

    projector = read_mmproj(mmproj)
    config = vl_model_config(model, projector)  # checked before the (slower) tokenizer is built
    return Checkpoint(
        source=str(model.path),
        config=config,
        tokenizer=model.tokenizer(),
        generation_config=model.generation_config,
        preprocess_config=projector.preprocess_config,
        chat_template=model.chat_template,
        tensors=lambda: _ChainedTensors(DequantizedTensors(model), VisionTensors(projector)),
        quantized=model,
    )


def mmproj_beside(model: GGUFModel) -> Path | None:
    """The one ``mmproj*.gguf`` beside a Qwen2-VL text GGUF that fits it (a Qwen2-VL / Qwen2.5-VL
    projector as wide as its hidden size), as llama.cpp's tools look for it; None when none or several
    fit. Said on stderr when one is taken."""
    from .. import status
    from .mmproj import read_mmproj

    fitting = []
    for candidate in sorted(Path(model.path).parent.glob("mmproj*.gguf")):
        try:
            with read_mmproj(candidate) as projector:
                if projector.projection_dim == model.config.text.hidden_size:
                    fitting.append(candidate)
        except (ModelFileError, OSError):
            continue
    if len(fitting) != 1:
        return None
    status.notice(f"using the vision projector {fitting[0].name} found beside the model (--mmproj to choose)")
    return fitting[0]


VISION_TOKENS = {  # ModelConfig field → token text
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def vl_model_config(model: GGUFModel, projector: Any) -> ModelConfig:
    """The ModelConfig of a text GGUF and its mmproj, after checking that they belong together."""
    text, where = model.config.text, str(projector.path)
    if model.config.arch != "qwen2_vl":
        raise ModelFileError(
            f"{where}: a {projector.variant} vision projector, but {model.path} is a "
            f"{model.metadata.get('general.architecture')} text model (the mmproj belongs to another model)"
        )
    if projector.projection_dim != text.hidden_size:
        raise ModelFileError(
            f"{where}: its projector outputs {projector.projection_dim}-wide embeddings but {model.path} has "
            f"hidden size {text.hidden_size} (the mmproj belongs to another model)"
        )
    added = {content: token_id for token_id, content, _ in model.added_tokens}
    token_ids = {}
    for field_name, token in VISION_TOKENS.items():
        token_id = added.get(token)
        if token_id is None:
            raise ModelFileError(f"{model.path}: the vocabulary has no {token} token, which images need")
        token_ids[field_name] = token_id
    return ModelConfig(arch=projector.variant, text=text, vision=projector.vision, **token_ids)


class _ChainedTensors(Mapping[str, torch.Tensor]):
    """Several name → tensor mappings seen as one."""

    def __init__(self, *parts: Mapping[str, torch.Tensor]):
        self._parts = parts

    def __getitem__(self, name: str) -> torch.Tensor:
        for part in self._parts:
            if name in part:
                return part[name]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        for part in self._parts:
            yield from part

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts)


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF text model: parse metadata, check every tensor, leave the weights on disk."""
    path = Path(path)
    buf = _open_map(path)
    try:
        metadata, infos = _read_layout(buf, path)
        return GGUFModel(path, buf, metadata, infos)
    except BaseException:
        buf.close()
        raise


__all__ = [
    "GGUFModel",
    "GGUFTensorInfo",
    "GGUF_ARCHITECTURES",
    "model_config_from_gguf",
    "open_gguf_checkpoint",
    "read_gguf",
]
