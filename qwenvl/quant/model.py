"""The Qwen2 decoder with its weights kept in the GGUF's own block formats.

``load_quantized_text`` fills a ``TextModel`` built on the meta device from a quantized source (a
GGUF opened lazily): every projection becomes a ``QuantLinear`` over the stored blocks (fused
q/k/v and gate/up as one layer per run of equal formats), the embedding table a ``QuantEmbedding``
(rows dequantized on lookup), and only norms and biases are dense. Nothing is dequantized at load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from torch import nn

from ..models.text import TextModel
from ..weights.layout import EMBEDDING, NORM, QWEN2, Layout
from .linear import (
    INT4_TYPES,
    BlockQuantLinear,
    ConcatLinear,
    QuantEmbedding,
    QuantLinear,
    _as_blocks,
    quant_linear_from_ggml,
    quant_linear_from_parts,
)


class TensorInfo(Protocol):
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]


class QuantizedSource(Protocol):
    """HF-named tensors as stored: their format, raw bytes, and a dequantized fp32 copy."""

    def info(self, hf_name: str) -> TensorInfo: ...

    def raw(self, hf_name: str) -> np.ndarray: ...

    def tensor(self, hf_name: str) -> torch.Tensor: ...

    def raw_joined(self, hf_names: Sequence[str]) -> np.ndarray | None: ...

    def has(self, hf_name: str) -> bool: ...

    def release(self, hf_names: Sequence[str]) -> None: ...


def load_quantized_text(
    model: TextModel,
    source: QuantizedSource,
    dtype: torch.dtype,
    kernel: str = "auto",
    prefill_pieces: int | None = None,
    layout: Layout = QWEN2,
) -> None:
    """Replace ``model``'s (meta) weights by the source's: projections stay quantized.

    Which stored tensors make each module comes from ``layout`` (weights/layout.py). ``dtype`` is the
    activation dtype (norms and embeddings come out in it); ``prefill_pieces`` as in
    ``quant_linear_from_ggml`` (None: exact). A source without an output projection ties it to
    the embedding, as llama.cpp does.
    """
    cfg = model.config
    build = _LayerBuilder(source, dtype, kernel, prefill_pieces)
    tied = cfg.tie_word_embeddings or not source.has(layout.output_name)
    for module in layout.modules(cfg, tied=tied):
        parent_path, _, leaf = module.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if module.kind == NORM:
            getattr(parent, leaf).weight = build.dense(module.weights[0])
        elif module.kind == EMBEDDING:
            setattr(parent, leaf, build.embedding(module.weights[0]))
        else:
            bias = torch.cat([source.tensor(name) for name in module.biases]) if module.biases else None
            setattr(parent, leaf, build.linear(module.weights, bias))
    _check_materialized(model)


class _LayerBuilder:
    def __init__(self, source: QuantizedSource, dtype: torch.dtype, kernel: str, prefill_pieces: int | None):
        self.source, self.dtype, self.kernel, self.pieces = source, dtype, kernel, prefill_pieces
        self.shared: dict[str, torch.Tensor] = {}  # blocks used by two modules (a tied embedding)

    def dense(self, name: str) -> nn.Parameter:
        return nn.Parameter(self.source.tensor(name).to(self.dtype), requires_grad=False)

    def blocks(self, name: str) -> torch.Tensor:
        """The tensor's stored bytes as uint8 [rows, bytes per row], shared with the file map."""
        if name not in self.shared:
            info = self.source.info(name)
            self.shared[name] = _as_blocks(self.source.raw(name), info.ggml_type, _matrix(info), copy=False)
        return self.shared[name]

    def linear(self, names: Sequence[str], bias: torch.Tensor | None = None) -> QuantLinear | ConcatLinear:
        infos = [self.source.info(name) for name in names]
        kernel = self.kernel_for(info.ggml_type for info in infos)
        # one tensor, or several stored back to back: one view of the file, no copy
        raw = self.blocks(names[0]) if len(names) == 1 else self.source.raw_joined(names)
        if raw is not None:
            shape = (sum(_matrix(info)[0] for info in infos), _matrix(infos[0])[1])
            return quant_linear_from_ggml(
                raw, infos[0].ggml_type, shape, bias, self.dtype, kernel, copy=False, prefill_pieces=self.pieces
            )
        parts = [(self.source.raw(name), info.ggml_type, _matrix(info)) for name, info in zip(names, infos)]
        layer = quant_linear_from_parts(parts, bias, self.dtype, kernel, self.pieces)
        self.source.release(names)  # the parts were copied into one fused matrix
        return layer

    def kernel_for(self, types: Iterable[GGMLQuantizationType]) -> str:
        """The asked kernel, or the formats' default where it cannot take them (int4: 4-bit formats only)."""
        if self.kernel == "int4" and not all(t in INT4_TYPES for t in types):
            return "auto"
        return self.kernel

    def embedding(self, name: str) -> QuantEmbedding:
        info = self.source.info(name)
        return QuantEmbedding(self.blocks(name), info.ggml_type, _matrix(info), self.dtype)


def _matrix(info: TensorInfo) -> tuple[int, int]:
    rows, cols = info.shape
    return int(rows), int(cols)


def _check_materialized(model: nn.Module) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"quantized load left tensors unset: {', '.join(left[:5])}")


def pack_prefill_weights(model: TextModel, budget_bytes: int) -> int:
    """Pack the decoder layers' prefill weights (``BlockQuantLinear.pack_prefill``: dequantized once,
    bf16, oneDNN layout; prefills give the same results, faster) if all of them fit in
    ``budget_bytes``. Returns the bytes packed (0: nothing packed). The lm_head is left alone: a
    prefill multiplies it by the last rows only, through the block GEMV."""
    layers = [m for m in model.layers.modules() if isinstance(m, BlockQuantLinear) and m.pieces == 1]
    needed = sum(m.prefill_pack_size for m in layers)
    if not layers or needed > budget_bytes:
        return 0
    return sum(m.pack_prefill() for m in layers)


__all__ = ["QuantizedSource", "load_quantized_text"]
