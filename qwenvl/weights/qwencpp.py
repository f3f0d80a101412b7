"""qwen.cpp's GGML model files (``qwen_cpp/convert.py``; the archived QwenLM/qwen.cpp), read lazily.

The layout (docs/qwencpp.md), all integers int32 little-endian:

- the magic ``b"ggml"``;
- 12 config values: GGML type of the 2-D weights, vocab_size, hidden_size, num_attention_heads,
  num_kv_heads (= heads), num_hidden_layers, intermediate_size (Qwen's: twice the MLP width),
  seq_length (qwen.cpp's max_length), eos, pad, im_start and im_end token ids;
- then per tensor, in QWenLMHeadModel's names (transformer.wte, transformer.h.N.…, transformer.ln_f,
  lm_head): the name's byte length, the name, ndim, the shape in PyTorch order, the GGML type, zero
  padding to the next 16-byte file offset, and the data: F32 / F16 values, or Q8_0 / Q4_0 / Q4_1 /
  Q5_0 / Q5_1 blocks laid out as ggml's (the blocks GGUF files hold).

1-D tensors (norms, the q|k|v bias) are F32. The file holds no vocabulary (qwen.cpp reads
``qwen.tiktoken`` beside it), no rope base (10000), no norm epsilon (1e-6) and no chat template
(ChatML with "You are a helpful assistant."). The model is run as its checkpoint runs it: Qwen-7B/14B
configs turn dynamic NTK and logn attention on past seq_length, so they are on here (qwen.cpp itself
implements neither; below seq_length nothing differs).

Q5_0 files: ``quantize_q5_0`` in qwen.cpp's convert.py ORs ``tensor[:, :16] & 0x0F`` with
``tensor[: 16:] << 4`` (rows 0-15, all 32 columns, instead of columns 16-31): shapes [n, 16] and
[min(n, 16), 32] never broadcast, so it raises on the first 2-D tensor. ``-t q5_0`` leaves a file
that ends after the first tensor's header, which is refused as truncated (with that explanation). A
Q5_0 file written by a corrected converter is read as ggml's Q5_0.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import GenerationConfig, ModelConfig, PreprocessConfig, TextConfig
from ..errors import ModelFileError
from .checkpoint import Checkpoint, with_chat_stops
from .gguf import DequantizedTensors, GGUFTensorInfo, MappedTensors, can_dequantize
from .layout import QWEN

MAGIC = b"ggml"
ALIGNMENT = 16
Q = GGMLQuantizationType
TYPES = {0: Q.F32, 1: Q.F16, 2: Q.Q4_0, 3: Q.Q4_1, 6: Q.Q5_0, 7: Q.Q5_1, 8: Q.Q8_0}  # what convert.py writes
_HEADER = struct.Struct("<4s12i")
_INT = struct.Struct("<i")
# Qwen (v1)'s published configs: max_position_embeddings (the logn table's reach), rope base, epsilon
CONTEXT, ROPE_THETA, NORM_EPS = 32768, 10000.0, 1e-6


@dataclass(frozen=True)
class QwenCppHeader:
    dtype: Q
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    num_hidden_layers: int
    intermediate_size: int
    seq_length: int
    eos_token_id: int
    pad_token_id: int
    im_start_id: int
    im_end_id: int


def is_qwencpp_file(path: str | os.PathLike) -> bool:
    """Whether the file starts with qwen.cpp's magic (a GGUF starts with b"GGUF")."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


class QwenCppModel(MappedTensors):
    """A qwen.cpp file opened lazily: config from its header, tensors from the memory map."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path = path
        self._buf = buf
        self.header = _read_header(buf, path)
        self.config = ModelConfig(arch="qwen", text=_text_config(self.header, path))
        self.layout = QWEN
        self.tensor_infos = _read_tensors(buf, path, self.header)
        self._check()

    def file_name(self, hf_name: str) -> str:
        self.layout.to_gguf(hf_name)  # KeyError for names outside the table
        return hf_name  # the file uses the checkpoint's names

    def hf_names(self) -> list[str]:
        return list(self.tensor_infos)

    def _check(self) -> None:
        expected = self.layout.hf_shapes(self.config.text)
        for name, shape in expected.items():
            info = self.tensor_infos.get(name)
            if info is None:
                raise ModelFileError(f"{self.path}: missing tensor {name}")
            if info.shape != shape:
                raise ModelFileError(f"{self.path}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
        extra = sorted(set(self.tensor_infos) - set(expected))
        if extra:
            raise ModelFileError(f"{self.path}: unexpected tensor {extra[0]} (not a qwen.cpp Qwen model)")

    @property
    def generation_config(self) -> GenerationConfig:
        """Stop on eos, <|im_end|> and <|im_start|>, as qwen.cpp does; pad as the header says."""
        header = self.header
        ids = dict.fromkeys((header.eos_token_id, header.im_end_id, header.im_start_id))
        return GenerationConfig(eos_token_ids=tuple(ids), pad_token_id=header.pad_token_id)


def read_qwencpp(path: str | os.PathLike) -> QwenCppModel:
    """Open a qwen.cpp file: parse and check its header and tensor table, leave the data on disk."""
    path = Path(path)
    buf = _open_map(path)
    try:
        return QwenCppModel(path, buf)
    except BaseException:
        buf.close()
        raise


def open_qwencpp_checkpoint(path: str | os.PathLike, tiktoken: str | os.PathLike | None) -> Checkpoint:
    """A qwen.cpp file with its ``qwen.tiktoken`` as the loaders' common Checkpoint view."""
    from ..tokenizer import Tokenizer

    model = read_qwencpp(path)
    if tiktoken is None:
        model.close()
        raise ModelFileError(f"{path}: a qwen.cpp file carries no vocabulary: pass its qwen.tiktoken (--tiktoken)")
    tokenizer = Tokenizer.from_tiktoken(tiktoken)
    check_vocabulary(model, tokenizer, tiktoken)
    return Checkpoint(
        source=str(model.path),
        config=model.config,
        tokenizer=tokenizer,
        generation_config=with_chat_stops(model.generation_config, "qwen", tokenizer),
        preprocess_config=PreprocessConfig(),
        chat_template=None,
        tensors=lambda: DequantizedTensors(model),
        quantized=model,
    )


def check_vocabulary(model: QwenCppModel, tokenizer: Any, tiktoken: str | os.PathLike) -> None:
    """The tiktoken's special ids must be the file's, and its ids must fit the embedding."""
    header = model.header
    for name, token in (("eos", "<|endoftext|>"), ("im_start", "<|im_start|>"), ("im_end", "<|im_end|>")):
        file_id = getattr(header, f"{name}_token_id" if name == "eos" else f"{name}_id")
        if tokenizer.token_to_id(token) != file_id:
            raise ModelFileError(
                f"{tiktoken}: {token} is id {tokenizer.token_to_id(token)}, {model.path} says {file_id} "
                "(a vocabulary of another model)"
            )
    if tokenizer.vocab_size > header.vocab_size:
        raise ModelFileError(
            f"{tiktoken}: {tokenizer.vocab_size} tokens do not fit {model.path}'s {header.vocab_size} rows"
        )


# ----------------------------------------------------------------------------------------------
# Parsing


def _open_map(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise ModelFileError(f"{path}: not a qwen.cpp file (empty)")
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a qwen.cpp file") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None


def _read_header(buf: mmap.mmap, path: Path) -> QwenCppHeader:
    if buf[:4] != MAGIC:
        raise ModelFileError(f"{path}: not a qwen.cpp GGML file (wrong magic bytes {bytes(buf[:4])!r})")
    if len(buf) < _HEADER.size:
        raise ModelFileError(f"{path}: truncated file (the header needs {_HEADER.size} bytes, the file has {len(buf)})")
    _, dtype, *values = _HEADER.unpack_from(buf, 0)
    if dtype not in TYPES:
        raise ModelFileError(f"{path}: not a qwen.cpp Qwen file (its weight type field is {dtype})")
    header = QwenCppHeader(TYPES[dtype], *values)
    sizes = (header.vocab_size, header.hidden_size, header.num_attention_heads, header.num_hidden_layers)
    if (
        min(*sizes, header.intermediate_size, header.seq_length) < 1
        or header.num_kv_heads != header.num_attention_heads
    ):
        raise ModelFileError(f"{path}: not a qwen.cpp Qwen file (its config values {list(values)} are not a Qwen's)")
    if header.hidden_size % header.num_attention_heads or header.intermediate_size % 2:
        raise ModelFileError(f"{path}: not a qwen.cpp Qwen file (its config values {list(values)} are not a Qwen's)")
    return header


def _text_config(header: QwenCppHeader, path: Path) -> TextConfig:
    try:
        return TextConfig(
            vocab_size=header.vocab_size,
            hidden_size=header.hidden_size,
            intermediate_size=header.intermediate_size // 2,
            num_hidden_layers=header.num_hidden_layers,
            num_attention_heads=header.num_attention_heads,
            num_key_value_heads=header.num_kv_heads,
            head_dim=header.hidden_size // header.num_attention_heads,
            rms_norm_eps=NORM_EPS,
            rope_theta=ROPE_THETA,
            max_position_embeddings=max(CONTEXT, header.seq_length),
            seq_length=header.seq_length,
            use_dynamic_ntk=True,
            use_logn_attn=True,
        )
    except ModelFileError as error:
        raise ModelFileError(f"{path}: {error}") from None


class _Truncated(Exception):
    pass


def _read_tensors(buf: mmap.mmap, path: Path, header: QwenCppHeader) -> dict[str, GGUFTensorInfo]:
    infos: dict[str, GGUFTensorInfo] = {}
    pos = _HEADER.size
    size = len(buf)

    def take(count: int) -> int:
        nonlocal pos
        if pos + count > size:
            raise _Truncated
        start, pos = pos, pos + count
        return start

    def integer() -> int:
        return _INT.unpack_from(buf, take(4))[0]

    try:
        while pos < size:
            name_length = integer()
            if not 0 < name_length <= 256:
                raise ModelFileError(f"{path}: not a qwen.cpp file (a tensor name of {name_length} bytes at {pos - 4})")
            start = take(name_length)
            name = bytes(buf[start:pos]).decode("utf-8", errors="replace")
            ndim = integer()
            if not 1 <= ndim <= 2:
                raise ModelFileError(f"{path}: tensor {name} has {ndim} dimensions (qwen.cpp writes 1 or 2)")
            shape = tuple(integer() for _ in range(ndim))
            raw_type = integer()
            if raw_type not in TYPES:
                raise ModelFileError(f"{path}: tensor {name} has unknown GGML type {raw_type}")
            kind = TYPES[raw_type]
            block, type_size = GGML_QUANT_SIZES[kind]
            if min(shape) < 1 or shape[-1] % block:
                raise ModelFileError(f"{path}: tensor {name} has shape {list(shape)}, not whole {kind.name} blocks")
            n_elements = 1
            for dim in shape:
                n_elements *= dim
            n_bytes = n_elements // block * type_size
            pos = -(-pos // ALIGNMENT) * ALIGNMENT
            if pos + n_bytes > size:
                raise ModelFileError(_truncated_message(path, name, kind, pos + n_bytes, size, not infos))
            infos[name] = GGUFTensorInfo(name=name, ggml_type=kind, shape=shape, offset=pos, n_bytes=n_bytes)
            if not can_dequantize(kind):
                raise ModelFileError(f"{path}: tensor {name} has unsupported type {kind.name}")
            pos += n_bytes
    except _Truncated:
        raise ModelFileError(f"{path}: truncated file (a tensor's header ends past its end)") from None
    return infos


def _truncated_message(path: Path, name: str, kind: Q, end: int, size: int, first: bool) -> str:
    message = f"{path}: truncated file (tensor {name}'s data ends at byte {end:,}, the file has {size:,})"
    if first and kind == Q.Q5_0:
        message += (
            "; qwen.cpp's convert.py -t q5_0 stops here (its quantize_q5_0 raises): convert again with another type"
        )
    return message


__all__ = ["QwenCppModel", "is_qwencpp_file", "open_qwencpp_checkpoint", "read_qwencpp"]
