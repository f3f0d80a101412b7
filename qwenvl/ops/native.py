"""One loaded native library (one ISA) and its calls on torch tensors.

``load(isa)`` builds (if not cached) and loads the library of an instruction set; the ``Kernels`` it
returns runs the block GEMV and dequantization, decode attention, RMSNorm and SwiGLU's product. The
per-token calls (``gemv``, ``rms_norm``, ``silu_mul``) do not check their tensors: their callers
guarantee the layouts they document. Which library the model uses is chosen in ``qwenvl.ops`` alone.

All of a library's decoders give exactly the fp32 values ``gguf.quants.dequantize`` gives, and the
products accumulate in fp32 (docs/quantization-kernels.md: what "exact" means, and row invariance).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from . import abi, build
from .isa import ISAS

T = GGMLQuantizationType
# Types the libraries decode (their C++ dispatch takes these GGMLQuantizationType values).
SUPPORTED_TYPES = frozenset(
    T[name]
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)

# Types the activation-quantizing GEMM takes (``qk_gemm_q8``; the float formats stay exact).
Q8_TYPES = SUPPORTED_TYPES - {T.F32, T.F16, T.BF16}


@functools.cache
def load(isa: str) -> Kernels:
    """The kernels of ``isa`` (a name in ``isa.ISAS``), built on first call; RuntimeError if they cannot
    be built or loaded. Does not check that this CPU runs the ISA (``isa.check`` does)."""
    path = build.build_library(ISAS[isa])
    try:
        lib = abi.declare(ctypes.CDLL(str(path)))
    except OSError as error:
        raise RuntimeError(str(error)) from None
    return Kernels(lib, path)


def row_bytes(ggml_type: GGMLQuantizationType, k: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return k // block_size * type_size


def check_blocks(blocks: torch.Tensor, ggml_type: GGMLQuantizationType, n: int, k: int) -> None:
    """Raise ValueError unless ``blocks`` is a uint8 [n, bytes] tensor (contiguous rows) of a [n, k] matrix."""
    if ggml_type not in SUPPORTED_TYPES:
        raise ValueError(f"block kernels do not support {ggml_type.name}")
    if k % GGML_QUANT_SIZES[ggml_type][0]:
        raise ValueError(f"a {ggml_type.name} row holds a multiple of {GGML_QUANT_SIZES[ggml_type][0]} values, not {k}")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.stride(1) != 1:
        raise ValueError("blocks must be a uint8 tensor [rows, bytes] with contiguous rows")
    if blocks.shape != (n, row_bytes(ggml_type, k)):
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} do not hold a {ggml_type.name} [{n}, {k}] matrix")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _gemv_call(
    ggml_type: int,
    x: torch.Tensor,
    blocks: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    amx: bool = False,
) -> abi.QkGemv:
    """The ``QkGemv`` of y = x @ W.T (+ bias), W in ``blocks``: what ``qk_gemv``, ``qk_gemm_q8`` and
    ``qk_gemv_q8`` take (layouts as ``Kernels.gemv`` says)."""
    return abi.QkGemv(
        x.data_ptr(), blocks.data_ptr(), _ptr(bias), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0),
        blocks.shape[0], blocks.stride(0), out.stride(0), int(ggml_type), x.dtype == torch.bfloat16,
        out.dtype == torch.bfloat16, torch.get_num_threads(), amx,
    )  # fmt: skip


class Kernels:
    """A loaded native library: ``isa`` names its instruction set, ``amx`` whether its GEMV can put
    bf16 rows on AMX tiles here."""

    def __init__(self, lib: ctypes.CDLL, path: object = None):
        self.lib, self.path = lib, path
        self.isa = lib.qk_isa().decode()
        self.extensions = lib.qk_extensions().decode().split()
        self.amx = bool(lib.qk_amx())

    def __repr__(self) -> str:
        return f"Kernels({self.isa}{' + ' + ' '.join(self.extensions) if self.extensions else ''})"

    def gemv(
        self,
        ggml_type: int,
        x: torch.Tensor,
        blocks: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        amx: bool = False,
    ) -> None:
        """``out = x @ W.T (+ bias)`` for W the [N, K] matrix held in ``blocks`` (uint8 [N, bytes], see
        ``check_blocks``), x [M, K] fp32 or bf16 with contiguous rows (any row stride), ``out`` [M, N]
        fp32 or bf16 with contiguous rows, ``bias`` fp32 [N] or None. Reads each block once for all M
        rows (meant for M ≤ 16: the decode step). ``amx``: bf16 x on AMX tiles where ``self.amx`` (formats
        with small codes), else the vector path; each gives a row a result independent of the other
        rows, not the same bits. Unchecked (the per-token path): the caller guarantees the layout."""
        if self.lib.qk_gemv(_gemv_call(ggml_type, x, blocks, bias, out, amx)):
            raise ValueError(f"block kernels do not support {GGMLQuantizationType(ggml_type).name}")

    def gemm_q8(
        self, ggml_type: int, x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        """``out ≈ x @ W.T (+ bias)`` with x's rows quantized per 32 values to int8 (one fp32 scale each)
        and integer dot products against W's blocks (``qk_gemm_q8``; not exact). Any number of rows;
        a row's result does not depend on the others, and every ISA gives the same bits. Layouts as
        ``gemv``; unchecked."""
        if self.lib.qk_gemm_q8(_gemv_call(ggml_type, x, blocks, bias, out)):
            raise ValueError(f"the q8 kernels do not take {GGMLQuantizationType(ggml_type).name}")

    def gemv_q8(
        self, ggml_type: int, x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        """``gemm_q8``'s results, bit for bit, for few rows (the decode step): the same quantized x and
        integer products, read straight from W's blocks (``qk_gemv_q8``; meant for M ≤ 16). Layouts
        as ``gemv``; unchecked."""
        if self.lib.qk_gemv_q8(_gemv_call(ggml_type, x, blocks, bias, out)):
            raise ValueError(f"the q8 kernels do not take {GGMLQuantizationType(ggml_type).name}")

    def dequantize(
        self,
        blocks: torch.Tensor,
        ggml_type: GGMLQuantizationType,
        k: int,
        pieces: int = 0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The matrix in ``blocks`` as fp32 [N, k] (pieces=0), or as bf16 [N, pieces·k]: ``pieces`` bf16
        parts side by side whose fp32 sum is the value (each part is the rest so far rounded to bf16).
        ``out``: a contiguous tensor of that dtype and shape to write into (else a new one)."""
        n = blocks.shape[0]
        check_blocks(blocks, ggml_type, n, k)
        if not 0 <= pieces <= 3:
            raise ValueError("pieces must be 0 (fp32) or 1-3 (bf16 parts)")
        dtype, shape = (torch.bfloat16, (n, pieces * k)) if pieces else (torch.float32, (n, k))
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or out.shape != shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)}")
        call = abi.QkDequant(
            blocks.data_ptr(), out.data_ptr(), n, k, blocks.stride(0), int(ggml_type), pieces, torch.get_num_threads()
        )
        if self.lib.qk_dequant(call):
            raise ValueError(f"block kernels do not support {ggml_type.name}")
        return out

    # -- decoder layers -----------------------------------------------------------------------

    def rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``F.rms_norm(h, (H,), weight, eps)`` for non-empty rows h [..., H], where h = x, or h = x + delta
        (the residual add, rounded to the dtype) when ``delta`` is given. Returns (h, normed); h is x
        itself without delta. A row's result depends on that row only (its squares are summed in a
        fixed order). Unchecked: x, delta and weight [H] contiguous, all fp32 or all bf16."""
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        normed = torch.empty(x.shape, dtype=x.dtype)
        total = x if delta is None else torch.empty(x.shape, dtype=x.dtype)
        call = abi.QkRmsNorm(
            x.data_ptr(), _ptr(delta), total.data_ptr(), weight.data_ptr(), normed.data_ptr(), rows, dim, dim, dim,
            dim, dim, eps, x.dtype == torch.bfloat16,
        )  # fmt: skip
        self.lib.qk_rms_norm(call)
        return total, normed

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's ``F.silu(gate) * up`` for ``gate, up = gate_up.chunk(2, -1)``, gate_up [..., 2·I] → [..., I]
        (bf16: silu rounded, then the product, as torch rounds them). Unchecked: gate_up contiguous,
        fp32 or bf16, its last dimension even and non-zero."""
        inter = gate_up.shape[-1] // 2
        rows = gate_up.numel() // (2 * inter)
        y = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
        call = abi.QkSiluMul(
            gate_up.data_ptr(), y.data_ptr(), rows, inter, 2 * inter, inter, gate_up.dtype == torch.bfloat16,
            torch.get_num_threads(),
        )  # fmt: skip
        self.lib.qk_silu_mul(call)
        return y

    def decode_attention(
        self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], positions: Sequence[int]
    ) -> DecodeAttention:
        return DecodeAttention(keys, values, positions, self)

    def paged_decode_attention(
        self, keys: torch.Tensor, values: torch.Tensor, tables: Sequence[torch.Tensor], positions: Sequence[int]
    ) -> DecodeAttention:
        return DecodeAttention([keys] * len(tables), [values] * len(tables), positions, self, tables)


class DecodeAttention:
    """One decode step's attention for B requests, each over its own KV cache (``qk_decode_attention``).

    Contiguous caches (``tables`` None): keys[i] / values[i] is request i's cache, [layers, kv_heads,
    capacity, head_dim] with contiguous [capacity, head_dim] blocks. Paged caches: keys[i] / values[i]
    is a block pool [blocks, layers, kv_heads, block_size, head_dim] (contiguous) and ``tables[i]`` the
    int64 ids of request i's blocks, in order (the kernel reads the keys where they lie). fp32 or bf16.
    Calling it for a layer stores row i's new key and value at ``positions[i]`` and attends over
    positions 0 … positions[i]. Checked once, called per layer.
    """

    def __init__(
        self,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        positions: Sequence[int],
        kernels: Kernels,
        tables: Sequence[torch.Tensor] | None = None,
    ):
        self.dtype, self.dim = keys[0].dtype, keys[0].shape[-1]
        self.block_size = 0 if tables is None else keys[0].shape[-2]
        for i, (cache, position) in enumerate(zip([*keys, *values], [*positions, *positions])):
            if tables is None:
                fits = 0 <= position < cache.shape[-2]
            else:
                table = tables[i % len(tables)]
                fits = cache.dim() == 5 and cache.is_contiguous() and table.dtype == torch.int64
                fits = fits and table.is_contiguous() and 0 <= position < table.numel() * self.block_size
            if cache.dtype != self.dtype or cache.stride(-1) != 1 or cache.stride(-2) != self.dim or not fits:
                raise ValueError("the KV caches must share a dtype and layout, with room for the position")
        self.rows = len(keys)
        self.kernels = kernels
        paged = tables is not None
        self.tables = list(tables) if paged else []  # kept alive while the kernel reads them
        self.table = torch.tensor(  # per row: key and value pointers, layer and head strides, position
            [[t.data_ptr() for t in keys], [t.data_ptr() for t in values],
             [t.stride(1 if paged else 0) for t in keys], [t.stride(2 if paged else 1) for t in keys],
             list(positions), [t.data_ptr() for t in self.tables] or [0] * self.rows,
             [t.stride(0) if paged else 0 for t in keys]],
            dtype=torch.int64,
        )  # fmt: skip
        self.columns = [row.data_ptr() for row in self.table]

    def struct(self, heads: int, kv_heads: int, dim: int) -> abi.QkDecodeAttention:
        """The call's caches and heads (q, k, v, out, their row strides and the layer left 0)."""
        pointers, values, layer_strides, head_strides, positions, tables, block_strides = self.columns
        return abi.QkDecodeAttention(
            None, None, None, None, pointers, values, layer_strides, head_strides, positions, self.rows, 0, 0, 0, 0,
            heads, kv_heads, dim, self.dtype == torch.bfloat16, dim**-0.5, torch.get_num_threads(),
            tables if self.block_size else None, block_strides, self.block_size,
        )  # fmt: skip

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """q [B, heads, head_dim], k and v [B, kv_heads, head_dim] (heads head_dim apart, any row
        stride, the caches' dtype) → [B, heads, head_dim]."""
        rows, heads, dim = q.shape
        layout_ok = all(t.dtype == self.dtype and t.stride(-1) == 1 and t.stride(-2) == dim for t in (q, k, v))
        if rows != self.rows or dim != self.dim or not layout_ok:
            raise ValueError("q, k, v do not match the KV caches (rows, dtype or layout)")
        out = torch.empty(rows, heads, dim, dtype=q.dtype)
        pointers, values, layer_strides, head_strides, positions, tables, block_strides = self.columns
        call = abi.QkDecodeAttention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), pointers, values, layer_strides, head_strides,
            positions, rows, q.stride(0), k.stride(0), v.stride(0), layer, heads, k.shape[1], dim,
            q.dtype == torch.bfloat16, dim**-0.5, torch.get_num_threads(), tables if self.block_size else None,
            block_strides, self.block_size,
        )  # fmt: skip
        if self.kernels.lib.qk_decode_attention(call):
            raise ValueError(f"{heads} query heads cannot share {k.shape[1]} key/value heads")
        return out


@functools.cache
def addcmul_fuses() -> bool:
    """Whether this torch's fp32 ``addcmul(a, b, c)`` rounds a + b·c once (a fused multiply-add: its
    vectorized kernels are built with contraction) rather than rounding b·c first. The rotary
    embedding's second product and sum (``models/rope.py``) go through it; the fused decode step
    rounds them the same way. Probed on values where the two differ."""
    b = torch.full((2, 64), 1.0 + 2.0**-12)  # b·b = 1 + 2^-11 + 2^-24: rounded first, the 2^-24 is lost
    fused = torch.addcmul(torch.full((2, 64), -1.0), b, b[:1])  # shaped as the rotation calls it
    return bool((fused == 2.0**-11 + 2.0**-24).all())


class GemvWeights(NamedTuple):
    """A linear layer as its decode rows' GEMV multiplies by it (``Kernels.gemv``): GGML blocks
    [out, bytes] of ``ggml_type``, fp32 bias or None; bf16 calls of at least ``amx_min_rows`` rows
    take the AMX tiles; calls of more than ``max_rows`` rows take another kernel."""

    blocks: torch.Tensor
    ggml_type: int
    bias: torch.Tensor | None
    out_features: int
    in_features: int
    amx_min_rows: int
    max_rows: int
    q8: bool = False  # x quantized to int8 per 32 values (``Kernels.gemv_q8``, ``--kernel q8``)


class LayerWeights(NamedTuple):
    """One decoder layer for the fused decode step: its norms' weights and its four linear layers."""

    input_norm: torch.Tensor
    qkv: Sequence[GemvWeights]  # 1 to LINEAR_PARTS parts side by side (their outputs concatenated)
    o: Sequence[GemvWeights]
    post_norm: torch.Tensor
    gate_up: Sequence[GemvWeights]
    down: Sequence[GemvWeights]


LINEAR_PARTS = 3  # QkLinear.parts


def _linear(parts: Sequence[GemvWeights]) -> abi.QkLinear:
    linear = abi.QkLinear(count=len(parts))
    for i, w in enumerate(parts):
        linear.parts[i] = abi.QkLinearPart(
            w.blocks.data_ptr(), _ptr(w.bias), w.out_features, w.in_features, w.blocks.stride(0), w.ggml_type,
            w.amx_min_rows, int(w.q8),
        )  # fmt: skip
    return linear


class DecoderStep:
    """Every decoder layer of a decode step in one native call (``qk_decode_step``), for layers whose
    linear layers are block GEMVs: the same bits as the separate calls (RMSNorm, GEMV, rotation,
    decode attention, SwiGLU, residual adds) on the same rows. Built once from the weights; the step's
    caches and positions come in with each call. fp32 or bf16 (``dtype``)."""

    def __init__(
        self,
        kernels: Kernels,
        layers: Sequence[LayerWeights],
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        dtype: torch.dtype,
    ):
        self.kernels, self.dtype, self.eps = kernels, dtype, eps
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.hidden = layers[0].input_norm.shape[0]
        linears = [
            part for layer in layers for parts in (layer.qkv, layer.o, layer.gate_up, layer.down) for part in parts
        ]
        if any(not 1 <= len(parts) <= LINEAR_PARTS for layer in layers for parts in layer[1:3] + layer[4:]):
            raise ValueError(f"a fused decoder layer's linear layers have 1 to {LINEAR_PARTS} parts")
        self.max_rows = min(w.max_rows for w in linears)
        self.weights = list(layers)  # kept alive while the library reads them
        self.layers = (abi.QkDecoderLayer * len(layers))(
            *(
                abi.QkDecoderLayer(
                    layer.input_norm.data_ptr(),
                    layer.post_norm.data_ptr(),
                    _linear(layer.qkv),
                    _linear(layer.o),
                    _linear(layer.gate_up),
                    _linear(layer.down),
                )  # fmt: skip
                for layer in layers
            )
        )

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: DecodeAttention
    ) -> torch.Tensor:
        """Hidden states [B, hidden] after every layer for x [B, hidden] (the step's dtype), cos and
        signed sin [B, head_dim] (contiguous), ``attention`` the step's caches (B rows)."""
        out = x.contiguous().clone()
        template = attention.struct(self.heads, self.kv_heads, self.head_dim)
        call = abi.QkDecodeStep(
            out.data_ptr(), cos.data_ptr(), sin.data_ptr(), ctypes.addressof(self.layers), ctypes.addressof(template),
            out.shape[0], self.hidden, len(self.layers), self.eps, self.dtype == torch.bfloat16,
            torch.get_num_threads(), addcmul_fuses(),
        )  # fmt: skip
        status = self.kernels.lib.qk_decode_step(call)
        if status:
            raise ValueError(f"the fused decode step failed (status {status}): the layers' shapes do not fit")
        return out
