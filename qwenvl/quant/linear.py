"""Linear layers whose weights stay in a GGML block format in memory.

``quant_linear_from_ggml`` builds one from a tensor's stored bytes (``GGUFModel.raw``) once, at load.
Kernels (``kernel=``; docs/quantization-kernels.md has the measurements behind the defaults):

- ``"blocks"``: the GGML blocks as stored, read by the native kernels (``qwenvl.ops``). Exact:
  the weights are gguf's dequantized fp32 values, bit for bit. Few rows (decode): a fused
  dequantize-and-multiply in fp32. Many rows (prefill): the rows are dequantized per call into
  ``pieces`` bf16 matrices whose sum is the fp32 weight, and one bf16 GEMM (AMX via oneDNN) runs
  over them with fp32 accumulation — 2 pieces are exact for Q4_0/Q5_0/F16, 3 for the rest.
- ``"q8"``: activations quantized, for decoding and prefill alike: x quantized per 32 values to
  int8 with one fp32 scale, integer dot products against the blocks, fp32 accumulation. Few rows
  (decode) take the GEMV that reads the stored blocks (``Kernels.gemv_q8``), many rows (prefill) the
  GEMM (``Kernels.gemm_q8``); both give the same bits for a row. Not exact (llama.cpp's
  arithmetic); F32/F16/BF16 weights stay on the exact kernel.
- ``"dense"``: dequantized once to a dense ``compute_dtype`` matrix (2 bytes/param in bf16). Exact
  only for BF16; otherwise every weight is rounded to bf16.
- ``"int8"``: torch's ``_weight_int8pack_mm``: re-quantized to int8 with one bf16 scale per row.
- ``"int4"``: torch's ``_weight_int4pack_mm_for_cpu``, groups of 32 (Q4_0, Q4_1, Q4_K only): the
  4-bit codes are kept, but its scale and zero are bf16, so GGML's fp16 scales get rounded.

Input x is [..., in] in bf16 or fp32; the output has x's dtype. Exact kernels are exact for both
(fp32 in → fp32 result of fp32 arithmetic on the exact weights); the others compute in bf16.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from .. import ops

T = GGMLQuantizationType

# Per format: the default kernel (fastest exact one, see docs/quantization-kernels.md).
DEFAULT_KERNELS: dict[GGMLQuantizationType, str] = {
    T.BF16: "blocks",
    T.F16: "blocks",
    T.F32: "blocks",
    T.Q8_0: "blocks",
    T.Q5_0: "blocks",
    T.Q5_1: "blocks",
    T.Q4_0: "blocks",
    T.Q4_1: "blocks",
    T.Q4_K: "blocks",
    T.Q5_K: "blocks",
    T.Q6_K: "blocks",
    T.Q2_K: "blocks",
    T.Q3_K: "blocks",
}
KERNELS = ("blocks", "q8", "dense", "int8", "int4")
INT4_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})  # the formats the int4 kernel takes

# bf16 pieces whose sum is exactly every value of the format: BF16 is one; F16 (11 significant
# bits), Q4_0 (fp16 scale × 4-bit code: ≤ 14 bits) and Q5_0 (≤ 15 bits) fit in two (8 + 8 bits);
# the others need three (any fp32 value: 24 bits). Checked by tests/test_quant_linear.py.
EXACT_PIECES: dict[GGMLQuantizationType, int] = {T.BF16: 1, T.F16: 2, T.Q4_0: 2, T.Q5_0: 2}

# Up to this many rows the fused block GEMV wins; beyond, dequantize + GEMM (measured crossover).
GEMV_MAX_ROWS = 16
# From this many bf16 rows on, the GEMV runs on AMX tiles where the CPU has them (formats with small
# codes): its cost barely grows with the rows, the AVX-512 path's grows linearly but starts lower
# (benchmarks/kernels.py --rows). A row's result then differs in the last bits from its 1-row result.
AMX_MIN_ROWS = 5
AMX_MIN_ROWS_BY_TYPE: dict[GGMLQuantizationType, int] = {T.Q8_0: 8, T.Q6_K: 10}
AMX_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K})
# Prefill dequantizes up to this many bytes of weight pieces at a time, into a buffer each thread
# reuses (a fresh large tensor per call costs page faults). One GEMM per layer is faster than
# several smaller ones, so only the lm_head is split.
PREFILL_CHUNK_BYTES = 64 << 20
_buffers = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, reused by the calling thread's layers."""
    key = f"buffer_{dtype}"
    buffer = getattr(_buffers, key, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_buffers, key, buffer)
    return buffer


@functools.cache
def _onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's packed-weight linear (the ops inductor uses for frozen weights)."""
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 32, dtype=torch.bfloat16), None)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 32, dtype=torch.bfloat16), weight, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.all(y == 32))


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W built from GGML blocks; subclasses hold W in their kernel's format."""

    kernel = ""

    def __init__(self, ggml_type: GGMLQuantizationType, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.ggml_type = GGMLQuantizationType(ggml_type)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def exact(self) -> bool:
        """Whether the layer multiplies by exactly gguf's dequantized values."""
        raise NotImplementedError

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight data the layer holds (what a decode step reads)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    def describe(self) -> str:
        """One line: format, shape, kernel, exact or not, bytes per weight."""
        per_param = self.weight_bytes / (self.in_features * self.out_features)
        accuracy = "exact" if self.exact else "re-quantized"
        return (
            f"{self.ggml_type.name} [{self.in_features}→{self.out_features}] {self.kernel}: "
            f"{self._method()}; {accuracy}; {per_param:.3g} B/weight"
        )

    def _method(self) -> str:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._compute(x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.out_features)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write x [M, in] @ W.T + b into ``out`` [M, out] (x's dtype; rows may be strided)."""
        out.copy_(self._compute(x))

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] → [M, out] in x's dtype."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.describe()


class BlockQuantLinear(QuantLinear):
    """The GGML blocks as stored, multiplied by the compiled block kernels (exact)."""

    kernel = "blocks"

    def __init__(
        self,
        blocks: torch.Tensor,
        ggml_type: GGMLQuantizationType,
        shape: tuple[int, int],
        bias: torch.Tensor | None = None,
        pieces: int | None = None,
        gemv_max_rows: int = GEMV_MAX_ROWS,
        q8: bool = False,
    ):
        super().__init__(ggml_type, shape[0], shape[1], bias)
        ops.check_blocks(blocks, self.ggml_type, shape[0], shape[1])
        if pieces is not None and not 1 <= pieces <= 3:
            raise ValueError(f"pieces must be 1, 2 or 3, got {pieces}")
        chosen = ops.block_kernels(self.ggml_type)
        if chosen is None:
            raise RuntimeError("qwenvl: the block kernels are unavailable (no C++ compiler, or QWENVL_KERNELS=0)")
        self.register_buffer("blocks", blocks)
        self.exact_pieces = EXACT_PIECES.get(self.ggml_type, 3)
        self.pieces = pieces or self.exact_pieces  # bf16 pieces for prefill; fewer than exact = rounding
        self.gemv_max_rows = gemv_max_rows
        # bf16 calls with at least this many rows take the AMX tiles (beyond gemv_max_rows: never)
        amx = self.ggml_type in AMX_TYPES and ops.amx_tiles(chosen)
        self.amx_min_rows = AMX_MIN_ROWS_BY_TYPE.get(self.ggml_type, AMX_MIN_ROWS) if amx else gemv_max_rows + 1
        self._kernels, self._type = chosen, int(self.ggml_type)
        self._packed: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see pack_prefill
        # many rows through the activation-quantizing GEMM (where the kernels take the format)
        self.q8 = q8 and ops.q8_kernels(self.ggml_type) is not None
        if self.q8:
            self.kernel = "q8"

    @property
    def exact(self) -> bool:
        return self.pieces >= self.exact_pieces and not self.q8

    def _method(self) -> str:
        tiles = (
            f" ({self.amx_min_rows}-{self.gemv_max_rows} bf16 rows on AMX tiles)"
            if self.amx_min_rows <= self.gemv_max_rows
            else ""
        )
        if self.q8:
            return (
                "activations quantized to int8 per 32 values, integer dot products (q8):"
                f" ≤{self.gemv_max_rows} rows: block GEMV; more rows: GEMM"
            )
        many = f"{self.pieces} bf16 piece(s) per weight + bf16 GEMM"
        return f"≤{self.gemv_max_rows} rows: fused block GEMV, fp32 accumulation{tiles}; more rows: {many}"

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        self.forward_into(x, y)
        return y

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        # the per-token path, kept lean: a decode step makes over a hundred of these calls
        bf16 = x.dtype == torch.bfloat16
        if not bf16 and x.dtype != torch.float32:
            out.copy_(self._compute(x.float()))
        elif x.shape[0] > self.gemv_max_rows:
            self._gemm(x, out)
        else:
            if x.stride(-1) != 1:
                x = x.contiguous()
            if self.q8:
                self._kernels.gemv_q8(self._type, x, self.blocks, self.bias, out)
                return
            amx = bf16 and x.shape[0] >= self.amx_min_rows
            self._kernels.gemv(self._type, x, self.blocks, self.bias, out, amx)

    def decode_gemv(self) -> list[ops.GemvWeights] | None:
        """The weights as ``forward_into`` multiplies decode rows (fp32 or bf16, at most
        ``gemv_max_rows``) by them: the block GEMV, for the fused decode step (``ops.decoder_step``)."""
        return [
            ops.GemvWeights(
                self.blocks,
                self._type,
                self.bias,
                self.out_features,
                self.in_features,
                self.amx_min_rows,
                self.gemv_max_rows,
                self.q8,
            )  # fmt: skip
        ]

    @property
    def prefill_pack_size(self) -> int:
        """Bytes ``pack_prefill`` holds: the weight matrix in bf16."""
        return self.out_features * self.in_features * 2

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the packed prefill weights (0 until ``pack_prefill``)."""
        return self.prefill_pack_size if self._packed is not None else 0

    def pack_prefill(self) -> int:
        """Keep the prefill weights (one bf16 piece: W rounded to bf16, exactly what a prefill of bf16
        rows dequantizes per call) dequantized once, in oneDNN's blocked layout: bf16 prefills then
        skip the dequantization and run a faster GEMM, with the same weights. Decoding is unchanged.
        Returns the bytes now held (0 where it does not apply: exact multi-piece prefill, or no
        oneDNN linear in this torch)."""
        if self._packed is None and self.pieces == 1 and not self.q8 and _onednn_linear_available():
            dense = self._kernels.dequantize(self.blocks, self.ggml_type, self.in_features, 1)
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            self._packed = (torch.ops.mkldnn._reorder_linear_weight(dense, None), bias)
        return self.packed_bytes

    def _gemm(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Dequantize row chunks of W into a reused buffer and multiply: bf16 pieces for bf16 x
        (one GEMM over x repeated ``pieces`` times along K), fp32 for fp32 x. With packed prefill
        weights (bf16 x), one oneDNN GEMM over them."""
        if self.q8:
            self._kernels.gemm_q8(self._type, x if x.stride(-1) == 1 else x.contiguous(), self.blocks, self.bias, out)
            return
        if self._packed is not None and x.dtype == torch.bfloat16:
            weight, bias = self._packed
            out.copy_(torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], ""))
            return
        pieces = self.pieces if x.dtype == torch.bfloat16 else 0
        stored = {T.BF16: (1, torch.bfloat16), T.F32: (0, torch.float32)}.get(self.ggml_type)
        if stored == (pieces, x.dtype):  # the blocks are that dense matrix already
            self._matmul(x, self.blocks.view(x.dtype), out, 0)
            return
        xs = x.repeat(1, pieces) if pieces > 1 else x
        width = self.in_features * max(pieces, 1)
        chunk = max(1, PREFILL_CHUNK_BYTES // (width * xs.element_size()))
        buffer = _scratch(min(chunk, self.out_features) * width, xs.dtype)
        for start in range(0, self.out_features, chunk):
            stop = min(start + chunk, self.out_features)
            w = buffer[: (stop - start) * width].view(stop - start, width)
            self._kernels.dequantize(self.blocks[start:stop], self.ggml_type, self.in_features, pieces, w)
            self._matmul(xs, w, out, start)

    def _matmul(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, start: int) -> None:
        """out[:, start : start + len(w)] = x @ w.T (+ that slice of the bias)."""
        stop = start + w.shape[0]
        if self.bias is None:
            torch.mm(x, w.t(), out=out[:, start:stop])
        else:
            torch.addmm(self.bias[start:stop].to(x.dtype), x, w.t(), out=out[:, start:stop])


class DenseLinear(QuantLinear):
    """Dequantized once to a dense matrix in ``compute_dtype``."""

    kernel = "dense"

    def __init__(
        self, weight: torch.Tensor, ggml_type: GGMLQuantizationType, bias: torch.Tensor | None, dtype: torch.dtype
    ):
        super().__init__(ggml_type, weight.shape[0], weight.shape[1], bias)
        dense = weight.to(dtype).contiguous()
        self.register_buffer("weight", dense)
        self._exact = torch.equal(dense.float(), weight.float())

    @property
    def exact(self) -> bool:
        return self._exact

    def _method(self) -> str:
        return f"dense {str(self.weight.dtype).removeprefix('torch.')} matmul"

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


class Int8Linear(QuantLinear):
    """torch's weight-only int8 kernel: one bf16 scale per output row (a re-quantization)."""

    kernel = "int8"

    def __init__(self, weight: torch.Tensor, ggml_type: GGMLQuantizationType, bias: torch.Tensor | None):
        super().__init__(ggml_type, weight.shape[0], weight.shape[1], bias)
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).bfloat16()
        codes = torch.round(weight / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    @property
    def exact(self) -> bool:
        return False

    def _method(self) -> str:
        return "torch _weight_int8pack_mm, per-row bf16 scale, bf16 compute"

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.bfloat16().contiguous(), self.codes, self.scales)
        if self.bias is not None:
            y = y + self.bias.bfloat16()
        return y.to(x.dtype)


class Int4Linear(QuantLinear):
    """torch's weight-only int4 kernel, groups of 32: w = (code - 8)·scale + zero, scale/zero in bf16."""

    kernel = "int4"
    group_size = 32

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, ggml_type: GGMLQuantizationType,
        bias: torch.Tensor | None,
    ):  # fmt: skip
        super().__init__(ggml_type, codes.shape[0], codes.shape[1], bias)
        if codes.shape[0] % 16:
            raise ValueError(f"the int4 kernel needs a multiple of 16 output rows, got {codes.shape[0]}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        scale_zero = torch.stack([scales.t(), zeros.t()], dim=-1).bfloat16().contiguous()  # [K/32, N, 2]
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self._exact = torch.equal(scale_zero.float(), torch.stack([scales.t(), zeros.t()], dim=-1).float())

    @property
    def exact(self) -> bool:
        return self._exact

    def _method(self) -> str:
        return "torch _weight_int4pack_mm_for_cpu, group 32, bf16 scale/zero, bf16 compute"

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16().contiguous(), self.packed, self.group_size, self.scale_zero
        )
        if self.bias is not None:
            y = y + self.bias.bfloat16()
        return y.to(x.dtype)


class ConcatLinear(nn.Module):
    """Several QuantLinears side by side (a fused q/k/v or gate/up whose parts differ in format)."""

    def __init__(self, parts: Sequence[QuantLinear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    @property
    def exact(self) -> bool:
        return all(p.exact for p in self.parts)

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)

    def decode_gemv(self) -> list[ops.GemvWeights] | None:
        """The parts' GEMV weights side by side (``BlockQuantLinear.decode_gemv``), or None unless every
        part is a block GEMV for decode rows."""
        weights = [getattr(part, "decode_gemv", lambda: None)() for part in self.parts]
        return None if any(w is None for w in weights) else [w for part in weights for w in part]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        start = 0
        for part in self.parts:
            part.forward_into(x, y[:, start : start + part.out_features])
            start += part.out_features
        return y.reshape(*shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    """An embedding table kept in its GGML blocks: looked-up rows are dequantized (exactly) per call."""

    def __init__(
        self, blocks: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, int], dtype: torch.dtype
    ):
        super().__init__()
        self.ggml_type = GGMLQuantizationType(ggml_type)
        self.num_embeddings, self.embedding_dim = shape
        self.dtype = dtype
        self.register_buffer("blocks", blocks)
        self._kernels = ops.block_kernels(self.ggml_type)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        if self._kernels is not None:
            values = self._kernels.dequantize(rows, self.ggml_type, self.embedding_dim)
        else:
            values = torch.from_numpy(gguf_quants.dequantize(rows.numpy(), self.ggml_type))
        return values.to(self.dtype).reshape(*ids.shape, self.embedding_dim)


# ----------------------------------------------------------------------------------------------
# Building


def _as_blocks(
    raw: np.ndarray | torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, int], copy: bool
) -> torch.Tensor:
    """The raw bytes as a uint8 tensor [rows, bytes per row] (a copy unless ``copy=False``)."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    rows, cols = shape
    if cols % block_size:
        raise ValueError(f"{ggml_type.name} needs rows that are a multiple of {block_size} values, got {cols}")
    row_bytes = cols // block_size * type_size
    if isinstance(raw, np.ndarray):
        raw = np.ascontiguousarray(raw).view(np.uint8)
        if raw.size != rows * row_bytes:
            raise ValueError(f"{raw.size} bytes do not hold a {ggml_type.name} {list(shape)} matrix")
        if copy or not raw.flags.writeable:
            blocks = torch.empty(rows, row_bytes, dtype=torch.uint8)
            blocks.numpy()[...] = raw.reshape(rows, row_bytes)
            return blocks
        return torch.from_numpy(raw.reshape(rows, row_bytes))
    n_bytes = raw.numel() * raw.element_size()
    if n_bytes != rows * row_bytes:
        raise ValueError(f"{n_bytes} bytes do not hold a {ggml_type.name} {list(shape)} matrix")
    blocks = raw.contiguous().view(torch.uint8).reshape(rows, row_bytes)
    return blocks.clone() if copy else blocks


def dequantize_blocks(blocks: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, int]) -> torch.Tensor:
    """fp32 [rows, cols] exactly as ``gguf.quants.dequantize`` (via the kernels when available)."""
    chosen = ops.block_kernels(ggml_type)
    if chosen is not None:
        return chosen.dequantize(blocks, ggml_type, shape[1])
    values = gguf_quants.dequantize(blocks.numpy(), ggml_type)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _halves(raw: np.ndarray) -> np.ndarray:
    """fp16 values stored as byte pairs [..., 2] → fp32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def nibble_codes(
    blocks: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 4-bit formats: (codes 0..15 [N, K], scale [N, K/32], zero [N, K/32]) with
    w = (code - 8)·scale + zero, exactly in real arithmetic."""
    n, k = shape
    raw = blocks.numpy()
    if ggml_type in (T.Q4_0, T.Q4_1):
        b = raw.reshape(n, k // 32, GGML_QUANT_SIZES[ggml_type][1])
        d = _halves(b[..., 0:2])
        qs = b[..., 2:] if ggml_type == T.Q4_0 else b[..., 4:]
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # weights 0-15 low nibbles, 16-31 high
        zero = np.zeros_like(d) if ggml_type == T.Q4_0 else _halves(b[..., 2:4]) + 8 * d
        return torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(d), torch.from_numpy(zero)
    if ggml_type == T.Q4_K:
        b = raw.reshape(n * (k // 256), 144)
        sc, m = gguf_quants.Q4_K.get_scale_min(b[:, 4:16].copy())
        scale = _halves(b[:, 0:2])[:, None] * sc.astype(np.float32)
        zero = 8 * scale - _halves(b[:, 2:4])[:, None] * m.astype(np.float32)
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 0xF).reshape(n, k)  # group 2c + s: nibble s of bytes 32c .. 32c + 31
        return torch.from_numpy(codes), torch.from_numpy(scale.reshape(n, -1)), torch.from_numpy(zero.reshape(n, -1))
    raise ValueError(f"the int4 kernel takes Q4_0, Q4_1 and Q4_K, not {ggml_type.name}")


def default_kernel(ggml_type: GGMLQuantizationType) -> str:
    """The kernel "auto" picks: the format's default, or "dense" when the block kernels are unavailable."""
    kernel = DEFAULT_KERNELS.get(ggml_type, "dense")
    if kernel == "blocks" and ops.block_kernels(ggml_type) is None:
        warnings.warn(f"qwenvl: {ggml_type.name} weights fall back to dense bf16 (rounded)", stacklevel=3)
        return "dense"
    return kernel


def kernel_note(ggml_type: GGMLQuantizationType) -> tuple[str, str]:
    """(kernel, how) for a matrix of this format loaded with kernel="auto"."""
    kernel = DEFAULT_KERNELS.get(ggml_type, "dense")
    if kernel == "blocks" and ops.block_kernels(ggml_type) is None:
        kernel = "dense"
    if kernel == "blocks":
        return kernel, "kept as stored, exact block kernel"
    return kernel, "dequantized to the compute dtype at load"


def quant_linear_from_ggml(
    raw: np.ndarray | torch.Tensor,
    ggml_type: GGMLQuantizationType,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    kernel: str = "auto",
    copy: bool = True,
    prefill_pieces: int | None = None,
) -> QuantLinear:
    """A linear layer from a GGML tensor's stored bytes.

    ``raw``: the bytes as in the GGUF file (e.g. ``GGUFModel.raw(name)``); ``shape``: (out, in) in
    torch order; ``bias``: fp32-convertible [out]; ``kernel``: "auto" or one of KERNELS;
    ``compute_dtype``: the dense / torch-kernel compute dtype (the block kernels follow the input's
    dtype). ``copy=False`` keeps a writable ``raw`` shared instead of copying it.
    ``prefill_pieces`` (block kernels): bf16 pieces per weight for many-row inputs; default the
    exact count, 1 = each weight rounded to bf16 (faster prefill, no longer exact).
    """
    ggml_type = GGMLQuantizationType(ggml_type)
    shape = (int(shape[0]), int(shape[1]))
    blocks = _as_blocks(raw, ggml_type, shape, copy)
    kernel = default_kernel(ggml_type) if kernel == "auto" else kernel
    if kernel in ("blocks", "q8"):
        return BlockQuantLinear(blocks, ggml_type, shape, bias, pieces=prefill_pieces, q8=kernel == "q8")
    if kernel == "dense":
        return DenseLinear(dequantize_blocks(blocks, ggml_type, shape), ggml_type, bias, compute_dtype)
    if kernel == "int8":
        return Int8Linear(dequantize_blocks(blocks, ggml_type, shape), ggml_type, bias)
    if kernel == "int4":
        return Int4Linear(*nibble_codes(blocks, ggml_type, shape), ggml_type, bias)
    raise ValueError(f"unknown kernel {kernel!r}; choose 'auto' or one of {', '.join(KERNELS)}")


def quant_linear_from_parts(
    parts: Sequence[tuple[np.ndarray | torch.Tensor, GGMLQuantizationType, tuple[int, int]]],
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    kernel: str = "auto",
    prefill_pieces: int | None = None,
) -> QuantLinear | ConcatLinear:
    """One layer for the row-wise concatenation of GGML tensors (fused q/k/v, gate/up): parts are
    (raw, ggml_type, (out, in)); ``bias`` is for the concatenated output.

    Neighbouring parts of one format share a single layer over their stacked rows (one kernel
    call); when formats differ (e.g. a Q8_0 v next to Q5_0 q and k) the result is a ConcatLinear.
    """
    in_features = {int(shape[1]) for _, _, shape in parts}
    if len(in_features) != 1:
        raise ValueError(f"parts differ in input size: {sorted(in_features)}")
    cols = in_features.pop()
    groups: list[tuple[GGMLQuantizationType, list[torch.Tensor]]] = []  # runs of one format
    for raw, ggml_type, shape in parts:
        ggml_type = GGMLQuantizationType(ggml_type)
        blocks = _as_blocks(raw, ggml_type, (int(shape[0]), cols), copy=False)
        if groups and groups[-1][0] == ggml_type:
            groups[-1][1].append(blocks)
        else:
            groups.append((ggml_type, [blocks]))
    rows = [sum(b.shape[0] for b in chunks) for _, chunks in groups]
    biases = [None] * len(groups) if bias is None else list(bias.split(rows))
    layers = [
        quant_linear_from_ggml(torch.cat(chunks), ggml_type, (n, cols), b, compute_dtype, kernel, False, prefill_pieces)
        for (ggml_type, chunks), n, b in zip(groups, rows, biases)
    ]
    return layers[0] if len(layers) == 1 else ConcatLinear(layers)


__all__ = [
    "DEFAULT_KERNELS",
    "KERNELS",
    "BlockQuantLinear",
    "ConcatLinear",
    "DenseLinear",
    "Int4Linear",
    "Int8Linear",
    "QuantEmbedding",
    "QuantLinear",
    "dequantize_blocks",
    "kernel_note",
    "nibble_codes",
    "quant_linear_from_ggml",
    "quant_linear_from_parts",
]
