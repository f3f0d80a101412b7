"""Export a Llama model to llama2.c's files: ``model.bin`` for ``run.c`` (legacy, fp32) or ``runq.c``
(version 2, Q8_0), and ``tokenizer.bin`` beside it.

The legacy file (llama2.c's ``legacy_export``, what ``run.c`` reads), little-endian:
- 7 int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative when the classifier
  is stored: an untied head), seq_len;
- float32: the embedding; every layer's attention norm, then wq, wk, wv, wo (each for all layers in
  turn), the ffn norms, w1, w2, w3; the final norm; the rope tables cos and sin [seq_len, head_size / 2]
  (run.c skips them); the classifier when untied.

The version-2 file (``version2_export``, ``runq.c``): magic 0x616b3432 ("ak42"), version 2, the 7 int32
(vocab_size positive), a byte "classifier shared", int32 group size, zeros to 256 bytes; then float32
norms (attention norms, ffn norms, final norm); then each matrix (embedding, wq…, wk…, wv…, wo…, w1…,
w2…, w3…, classifier if untied) as int8 values then float32 scales, one scale per ``group size`` values:
scale = max |w| / 127, q = round(w / scale). The group size is 64, halved until it divides both dim and
hidden_dim (runq.c quantizes activations of both lengths in those groups).

Weights are written in Meta's layout (llama2.c's rope turns pairs (2i, 2i + 1)): HF's q and k rows are
interleaved per head (``layout.permute_rows``), k with the key heads' own count under GQA (llama2.c's
``export.py`` uses the query heads' count for both, which breaks GQA models).

``tokenizer.bin`` (llama2.c's ``tokenizer.py``): uint32 max token length, then per token: float32 score,
int32 byte length, UTF-8 bytes; "▁" written as a space, BOS / EOS as "\\n<s>\\n" / "\\n</s>\\n"; one entry
per embedding row (added tokens with score -1000, unused rows as "[PADn]"). An identical tokenizer.bin
already there is left as it is (both formats share it).

llama2.c cannot represent biases, a rope base other than 10000, a head size other than dim / n_heads,
or another architecture: such models are refused, one line saying why. Its RMSNorm epsilon is fixed at
1e-5 (a model with another one is exported with a note).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..config import TextConfig
from ..errors import ModelFileError, QwenVLError
from .layout import LLAMA, permute_rows

MAGIC, VERSION, HEADER_BYTES = 0x616B3432, 2, 256
LLAMA2C_EPS, LLAMA2C_THETA = 1e-5, 10000.0
FORMATS = ("llama2c", "llama2c-q8")


@dataclass
class Llama2cSource:
    """A Llama model as the export sees it: its config, a loader of HF-named tensors, its vocabulary."""

    config: TextConfig
    tensor: Callable[[str], torch.Tensor]  # HF name → float32 tensor
    pieces: list[str]  # one per embedding row
    scores: list[float]
    bos_id: int
    eos_id: int
    where: str


def check_representable(arch: str, cfg: TextConfig, where: str) -> None:
    """One line saying why llama2.c cannot run this model, if it cannot."""
    if arch != "llama":
        raise QwenVLError(f"{where}: a {arch} model: llama2.c runs Llama models only")
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise QwenVLError(f"{where}: the model has biases, which llama2.c's files cannot hold")
    if cfg.rope_theta != LLAMA2C_THETA:
        raise QwenVLError(f"{where}: rope base {cfg.rope_theta:g}: llama2.c's rope base is fixed at 10000")
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise QwenVLError(f"{where}: head size {cfg.head_dim} is not dim / n_heads, as llama2.c computes it")


def group_size(cfg: TextConfig, start: int = 64) -> int:
    size = start
    while size > 1 and (cfg.hidden_size % size or cfg.intermediate_size % size):
        size //= 2
    return size


# ----------------------------------------------------------------------------------------------
# Tensors in llama2.c's order


def _stems(layers: int, name: str) -> list[str]:
    return [f"model.layers.{i}.{name}.weight" for i in range(layers)]


def norms(cfg: TextConfig) -> list[str]:
    layers = cfg.num_hidden_layers
    return [*_stems(layers, "input_layernorm"), *_stems(layers, "post_attention_layernorm"), "model.norm.weight"]


def matrices(cfg: TextConfig) -> list[str]:
    """The quantized order of version 2: embedding, wq, wk, wv, wo, w1, w2, w3 (each for all layers)."""
    layers = cfg.num_hidden_layers
    names = ["model.embed_tokens.weight"]
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        names += _stems(layers, part)
    for part in ("mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"):
        names += _stems(layers, part)
    return names


def legacy_order(cfg: TextConfig) -> list[str]:
    layers = cfg.num_hidden_layers
    names = ["model.embed_tokens.weight", *_stems(layers, "input_layernorm")]
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        names += _stems(layers, part)
    names += _stems(layers, "post_attention_layernorm")
    for part in ("mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"):
        names += _stems(layers, part)
    return names + ["model.norm.weight"]


def llama2c_tensor(source: Llama2cSource, name: str) -> torch.Tensor:
    """A tensor as llama2.c stores it: float32, q / k rows interleaved per (key) head."""
    tensor = source.tensor(name).float()
    heads = LLAMA.rope_heads(name, source.config)
    return tensor if heads is None else permute_rows(tensor, heads)


def rope_tables(cfg: TextConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama2.c's precompute_freqs_cis: cos and sin [seq_len, head_size / 2]."""
    head = cfg.head_dim
    freqs = 1.0 / (LLAMA2C_THETA ** (torch.arange(0, head, 2)[: head // 2].float() / head))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return angles.cos(), angles.sin()


def quantize_q80(tensor: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales, one per ``size`` values (llama2.c's quantize_q80)."""
    groups = tensor.float().reshape(-1, size)
    scale = groups.abs().max(dim=1).values / 127.0
    values = torch.round(groups / scale[:, None]).to(torch.int8)
    return values.numpy(), scale.numpy()


def _header(cfg: TextConfig, seq_len: int, vocab: int) -> bytes:
    return struct.pack(
        "<7i",
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        vocab,
        seq_len,
    )


def _f32(handle: BinaryIO, tensor: torch.Tensor | np.ndarray) -> None:
    data = tensor.numpy() if isinstance(tensor, torch.Tensor) else tensor
    handle.write(np.ascontiguousarray(data, dtype="<f4").tobytes())


def write_legacy(handle: BinaryIO, source: Llama2cSource, seq_len: int) -> None:
    cfg = source.config
    tied = cfg.tie_word_embeddings
    handle.write(_header(cfg, seq_len, cfg.vocab_size if tied else -cfg.vocab_size))
    for name in legacy_order(cfg):
        _f32(handle, llama2c_tensor(source, name))
    cos, sin = rope_tables(cfg, seq_len)
    _f32(handle, cos)
    _f32(handle, sin)
    if not tied:
        _f32(handle, llama2c_tensor(source, "lm_head.weight"))


def write_q80(handle: BinaryIO, source: Llama2cSource, seq_len: int) -> int:
    """The version-2 file; returns the group size used."""
    cfg = source.config
    size = group_size(cfg)
    tied = cfg.tie_word_embeddings
    head = struct.pack("<Ii", MAGIC, VERSION) + _header(cfg, seq_len, cfg.vocab_size)
    head += struct.pack("<Bi", int(tied), size)
    handle.write(head + b"\0" * (HEADER_BYTES - len(head)))
    for name in norms(cfg):
        _f32(handle, llama2c_tensor(source, name))
    for name in matrices(cfg) + ([] if tied else ["lm_head.weight"]):
        values, scales = quantize_q80(llama2c_tensor(source, name), size)
        handle.write(values.tobytes())
        _f32(handle, scales)
    return size


def tokenizer_bin(source: Llama2cSource) -> bytes:
    """llama2.c's tokenizer.bin for the model's vocabulary."""
    entries = []
    for token_id, (piece, score) in enumerate(zip(source.pieces, source.scores)):
        text = "\n<s>\n" if token_id == source.bos_id else "\n</s>\n" if token_id == source.eos_id else piece
        entries.append((text.replace("\u2581", " ").encode("utf-8"), score))
    body = b"".join(struct.pack("<fI", score, len(data)) + data for data, score in entries)
    return struct.pack("<I", max(len(data) for data, _ in entries)) + body


# ----------------------------------------------------------------------------------------------
# Sources


def open_source(model: str | os.PathLike) -> Llama2cSource:
    """A Llama HF checkpoint directory, Meta checkpoint directory or GGUF file, read lazily."""
    from .checkpoint import file_kind

    path = Path(model).expanduser()
    if file_kind(path) == "gguf":
        return _gguf_source(path)
    if file_kind(path) == "qwen.cpp":
        raise QwenVLError(f"{path}: a qwen model: llama2.c runs Llama models only")
    return _hf_source(path)


def _gguf_source(path: Path) -> Llama2cSource:
    from .gguf import read_gguf

    model = read_gguf(path)
    check_representable(model.config.arch, model.config.text, str(path))
    vocab = model.sentencepiece_vocab
    if vocab is None:
        raise QwenVLError(f"{path}: llama2.c's tokenizer.bin holds SentencePiece vocabularies, this file's is BPE")
    return Llama2cSource(
        config=model.config.text,
        tensor=model.tensor,
        pieces=vocab.pieces,
        scores=vocab.scores,
        bos_id=model.bos_token_id if model.bos_token_id is not None else -1,
        eos_id=model.eos_token_id if model.eos_token_id is not None else -1,
        where=str(path),
    )


def _hf_source(path: Path) -> Llama2cSource:
    from ..convert import read_hf_source
    from ..tokenizer import Tokenizer
    from ..vocab import read_sentencepiece

    source = read_hf_source(path) if (path / "config.json").is_file() or (path / "params.json").is_file() else None
    if source is None:
        from . import hf

        hf.resolve_model_dir(path)  # the usual one-line error for a missing or foreign directory
        raise ModelFileError(f"{path}: no config.json or params.json")
    check_representable(source.config.arch, source.config.text, str(path))
    if source.vocab_file.name != "tokenizer.model":
        raise QwenVLError(f"{path}: llama2.c's tokenizer.bin needs a SentencePiece tokenizer.model")
    vocab = read_sentencepiece(source.vocab_file)
    tokenizer = Tokenizer.from_sentencepiece(source.vocab_file)
    rows = source.config.text.vocab_size
    pieces, scores = list(vocab.pieces[:rows]), list(vocab.scores[:rows])
    for token_id in range(len(pieces), rows):  # added tokens, then unused rows
        pieces.append(tokenizer.id_to_token(token_id) or f"[PAD{token_id}]")
        scores.append(-1000.0)
    tensors = {t.name: t for t in source.tensors}

    def tensor(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ModelFileError(f"{path}: missing tensor {name}")
        return tensors[name].load()

    return Llama2cSource(source.config.text, tensor, pieces, scores, vocab.bos_id, vocab.eos_id, str(path))


# ----------------------------------------------------------------------------------------------
# The command


@dataclass
class Llama2cFiles:
    model: Path
    tokenizer: Path
    group_size: int | None
    notes: list[str]


def export_llama2c(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quantized: bool = False,
    seq_len: int | None = None,
    force: bool = False,
) -> Llama2cFiles:
    """Write ``out`` (legacy fp32, or version 2 Q8_0 when ``quantized``) and ``tokenizer.bin`` beside it,
    each through a temporary file renamed into place."""
    out = Path(out)
    tokenizer_path = out.parent / "tokenizer.bin"
    source = open_source(model)
    inputs = [Path(model).expanduser()]
    vocabulary = tokenizer_bin(source)
    # one tokenizer.bin serves both formats: an identical one is left in place
    same_tokenizer = tokenizer_path.is_file() and tokenizer_path.read_bytes() == vocabulary
    for target in (out,) if same_tokenizer else (out, tokenizer_path):
        _check_target(target, inputs, force)
    seq_len = seq_len or source.config.max_position_embeddings
    if seq_len < 1:
        raise QwenVLError(f"--seq-len must be positive, got {seq_len}")
    notes = []
    if source.config.rms_norm_eps != LLAMA2C_EPS:
        notes.append(f"rms_norm_eps {source.config.rms_norm_eps:g} runs as llama2.c's fixed 1e-05")
    out.parent.mkdir(parents=True, exist_ok=True)
    size = None
    with _replacing(out) as handle:
        if quantized:
            size = write_q80(handle, source, seq_len)
        else:
            write_legacy(handle, source, seq_len)
    if not same_tokenizer:
        with _replacing(tokenizer_path) as handle:
            handle.write(vocabulary)
    return Llama2cFiles(out, tokenizer_path, size, notes)


def _check_target(path: Path, inputs: list[Path], force: bool) -> None:
    for source in inputs:
        if path.resolve() == source.resolve():
            raise QwenVLError(f"{path}: is an input of this command; write the output somewhere else")
    if path.exists() and not path.is_file():
        raise QwenVLError(f"{path}: exists and is not a file")
    if path.exists() and not force:
        raise QwenVLError(f"{path}: exists (pass --force to replace it)")


class _replacing:
    """Write to a hidden temporary file next to ``path``; rename it into place on success."""

    def __init__(self, path: Path):
        self.path = path
        self.partial = path.parent / f".{path.name}.partial-{os.getpid()}"

    def __enter__(self) -> BinaryIO:
        self.handle = open(self.partial, "wb")
        return self.handle

    def __exit__(self, kind: object, *rest: object) -> None:
        self.handle.close()
        if kind is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


def describe(files: Llama2cFiles) -> Iterator[str]:
    kind = f"version 2, Q8_0 in groups of {files.group_size}" if files.group_size else "legacy, float32"
    yield f"{files.model} (llama2.c {kind}, {files.model.stat().st_size:,} bytes)"
    yield f"{files.tokenizer} ({files.tokenizer.stat().st_size:,} bytes)"
    for note in files.notes:
        yield f"note: {note}"


__all__ = ["FORMATS", "Llama2cFiles", "describe", "export_llama2c"]
