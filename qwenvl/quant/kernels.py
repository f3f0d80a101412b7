"""Compiled block kernels: matrix products and dequantization straight from GGML blocks, and the
decode step's attention over per-request KV caches (``DecodeAttention``).

The C++ source below is compiled with the system compiler on first use (a few seconds: it includes
no torch headers), cached under ``$XDG_CACHE_HOME/qwenvl/kernels/<hash>/`` and loaded with ctypes.
It is built with ``-march=native``: an AVX-512 path where the CPU has it (with bf16 dot products
for bf16 inputs where it has AVX512-BF16), portable C++ elsewhere (or when the native build fails).
All decode the weights to exactly the fp32 values ``gguf.quants.dequantize`` gives (the same
operations in the same order) and accumulate exact products in fp32.

Threads: the library links ``libgomp.so.1``; the dynamic loader resolves that soname to the copy
torch has already loaded, so kernels and torch share one OpenMP pool. The count follows
``torch.get_num_threads()``. Set ``QWENVL_KERNELS=0`` to skip the build (callers fall back to torch).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# Types the library decodes (the numbers are GGMLQuantizationType values, also used in the C++ switch).
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
)

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_PORTABLE_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_LIBRARY_NAME = "libqwenvl_kernels.so"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwenvl" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native builds are only valid on a matching CPU."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile SOURCE to ``target`` via a temporary file, so concurrent builds never see half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "kernels.cpp"
        source.write_text(SOURCE)
        output = Path(tmp) / _LIBRARY_NAME
        result = subprocess.run([compiler, *flags, str(source), "-o", str(output)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-2000:])
        os.replace(output, target)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.qk_simd.argtypes, lib.qk_simd.restype = [], i32
    lib.qk_amx.argtypes, lib.qk_amx.restype = [], i32
    lib.qk_gemv.argtypes = [i32, ptr, i32, i64, i64, i64, ptr, i64, i64, ptr, ptr, i32, i64, i32, i32]
    lib.qk_gemv.restype = i32
    lib.qk_dequant.argtypes = [i32, ptr, i64, i64, i64, ptr, i32, i32]
    lib.qk_dequant.restype = i32
    lib.qk_decode_attention.argtypes = [i64, i32, i32, i32, i32, ptr, i64, ptr, i64, ptr, i64, i64]
    lib.qk_decode_attention.argtypes += [ptr] * 6 + [ctypes.c_float, i32]
    lib.qk_decode_attention.restype = i32
    lib.qk_rms_norm.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float, i32]
    lib.qk_rms_norm.restype = i32
    lib.qk_silu_mul.argtypes, lib.qk_silu_mul.restype = [ptr, ptr, i64, i64, i64, i64, i32, i32], i32
    return lib


def build_library(portable: bool = False) -> Path:
    """Compile the kernels (if not cached) and return the library's path; raises RuntimeError on failure.

    ``portable`` leaves out ``-march=native`` (the scalar C++ path; used by tests to check it too).
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    flags = _PORTABLE_FLAGS if portable else _FLAGS
    key = hashlib.sha256("\0".join([SOURCE, compiler, version, *flags, _cpu_flags(), sys.platform]).encode())
    target = _cache_root() / key.hexdigest()[:16] / _LIBRARY_NAME
    if not target.exists():
        _build(compiler, flags, target)
    return target


@functools.cache
def load_library(portable: bool = False) -> ctypes.CDLL:
    """The loaded kernels (built on first call); raises RuntimeError if they cannot be built."""
    try:
        return _declare(ctypes.CDLL(str(build_library(portable))))
    except OSError as error:
        raise RuntimeError(str(error)) from None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The native kernels, or None (with one warning) when disabled or the build fails."""
    if os.environ.get("QWENVL_KERNELS", "1") == "0":
        return None
    try:
        return load_library()
    except RuntimeError as error:
        try:
            return load_library(portable=True)
        except RuntimeError:
            warnings.warn(f"qwenvl: block kernels unavailable, falling back to torch ({error})", stacklevel=2)
            return None


def available() -> bool:
    return library() is not None


def amx_available(lib: ctypes.CDLL | None = None) -> bool:
    """Whether bf16 products can run on AMX tiles here (the CPU has them and Linux grants them).
    ``QWENVL_AMX=0`` turns them off."""
    lib = lib or library()
    return lib is not None and os.environ.get("QWENVL_AMX", "1") != "0" and bool(lib.qk_amx())


def _row_bytes(ggml_type: GGMLQuantizationType, k: int) -> int:
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
    if blocks.shape != (n, _row_bytes(ggml_type, k)):
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} do not hold a {ggml_type.name} [{n}, {k}] matrix")


def gemv(
    x: torch.Tensor,
    blocks: torch.Tensor,
    ggml_type: GGMLQuantizationType,
    k: int,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
    amx: bool = False,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [M, k] (fp32 or bf16), W the [N, k] matrix held in ``blocks``.

    Reads each block once for all M rows (meant for small M). Output: ``out`` if given (fp32 or bf16,
    [M, N], rows may be strided), else a new tensor of x's dtype. ``bias`` must be fp32 [N].
    ``amx``: bf16 x on AMX tiles where ``amx_available()`` (formats with small codes: not F16/BF16/F32),
    else AVX-512. Both give each row a result independent of the other rows; not the same bits.
    """
    n = blocks.shape[0]
    check_blocks(blocks, ggml_type, n, k)
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be fp32/bf16 [M, {k}] with contiguous rows")
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
    if out.shape != (x.shape[0], n) or out.stride(1) != 1 or out.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("out must be fp32/bf16 [M, N] with contiguous rows")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError("bias must be a contiguous fp32 [N] tensor")
    gemv_unchecked(lib or load_library(), ggml_type, x, blocks, bias, out, amx)
    return out


def gemv_unchecked(
    lib: ctypes.CDLL,
    ggml_type: GGMLQuantizationType,
    x: torch.Tensor,
    blocks: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    amx: bool = False,
) -> None:
    """``gemv`` without the argument checks, for callers that guarantee them (the per-token path)."""
    status = lib.qk_gemv(
        int(ggml_type), x.data_ptr(), x.dtype == torch.bfloat16, x.shape[0], x.shape[1], x.stride(0),
        blocks.data_ptr(), blocks.shape[0], blocks.stride(0), None if bias is None else bias.data_ptr(),
        out.data_ptr(), out.dtype == torch.bfloat16, out.stride(0), torch.get_num_threads(), amx,
    )  # fmt: skip
    if status:
        raise ValueError(f"block kernels do not support {GGMLQuantizationType(ggml_type).name}")


def dequantize(
    blocks: torch.Tensor,
    ggml_type: GGMLQuantizationType,
    k: int,
    pieces: int = 0,
    out: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """The matrix in ``blocks`` as fp32 [N, k] (pieces=0), or as bf16 [N, pieces·k]: ``pieces`` bf16
    parts side by side whose fp32 sum is the value (each part is the rest so far rounded to bf16).
    ``out``: a contiguous tensor of that dtype and shape to write into (else a new one)."""
    lib = lib or load_library()
    n = blocks.shape[0]
    check_blocks(blocks, ggml_type, n, k)
    if not 0 <= pieces <= 3:
        raise ValueError("pieces must be 0 (fp32) or 1-3 (bf16 parts)")
    dtype, shape = (torch.bfloat16, (n, pieces * k)) if pieces else (torch.float32, (n, k))
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.dtype != dtype or out.shape != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)}")
    status = lib.qk_dequant(
        int(ggml_type), blocks.data_ptr(), n, k, blocks.stride(0), out.data_ptr(), pieces, torch.get_num_threads()
    )
    if status:
        raise ValueError(f"block kernels do not support {ggml_type.name}")
    return out


# ----------------------------------------------------------------------------------------------
# The C++ source (no backslashes, so it can live in a raw string).


class DecodeAttention:
    """One decode step's attention for B requests, each over its own KV cache (``qk_decode_attention``).

    keys[i] / values[i]: request i's cache, [layers, kv_heads, capacity, head_dim] with contiguous
    [capacity, head_dim] blocks (fp32 or bf16). Calling it for a layer stores row i's new key and value
    at ``positions[i]`` and attends over positions 0 … positions[i]. Checked once, called per layer.
    """

    def __init__(
        self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], positions: Sequence[int], lib: ctypes.CDLL
    ):
        self.dtype, self.dim = keys[0].dtype, keys[0].shape[-1]
        for cache, position in zip([*keys, *values], [*positions, *positions]):
            fits = 0 <= position < cache.shape[-2]
            if cache.dtype != self.dtype or cache.stride(-1) != 1 or cache.stride(-2) != self.dim or not fits:
                raise ValueError("the KV caches must share a dtype and layout, with room for the position")
        self.rows = len(keys)
        self.lib = lib
        self.table = torch.tensor(  # per row: key and value pointers, layer and head strides, position
            [[t.data_ptr() for t in keys], [t.data_ptr() for t in values], [t.stride(0) for t in keys],
             [t.stride(1) for t in keys], list(positions)],
            dtype=torch.int64,
        )  # fmt: skip
        self.columns = [row.data_ptr() for row in self.table]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """q [B, heads, head_dim], k and v [B, kv_heads, head_dim] (heads head_dim apart, any row
        stride, the caches' dtype) → [B, heads, head_dim]."""
        rows, heads, dim = q.shape
        layout_ok = all(t.dtype == self.dtype and t.stride(-1) == 1 and t.stride(-2) == dim for t in (q, k, v))
        if rows != self.rows or dim != self.dim or not layout_ok:
            raise ValueError("q, k, v do not match the KV caches (rows, dtype or layout)")
        out = torch.empty(rows, heads, dim, dtype=q.dtype)
        status = self.lib.qk_decode_attention(
            rows, heads, k.shape[1], dim, q.dtype == torch.bfloat16, q.data_ptr(), q.stride(0), k.data_ptr(),
            k.stride(0), v.data_ptr(), v.stride(0), layer, *self.columns, out.data_ptr(), dim**-0.5,
            torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise ValueError(f"{heads} query heads cannot share {k.shape[1]} key/value heads")
        return out


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    delta: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.rms_norm(h, (H,), weight, eps)`` for rows h [..., H] in fp32 or bf16 (``weight`` [H] in the
    same dtype), where h = x, or h = x + delta (the residual add, rounded to the dtype) when ``delta``
    is given. Returns (h, normed); h is x itself without delta. A row's result depends on that row
    only (its squares are summed in a fixed order)."""
    dim = x.shape[-1]
    if x.dtype not in (torch.float32, torch.bfloat16) or any(
        t.dtype != x.dtype for t in (weight, delta) if t is not None
    ):
        raise ValueError("rms_norm takes fp32 or bf16 tensors of one dtype")
    if dim == 0 or weight.shape != (dim,) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"rms_norm: rows must be non-empty, weight [{dim}] and delta shaped as x")
    x, weight = x.contiguous(), weight.contiguous()
    return rms_norm_unchecked(lib or load_library(), x, None if delta is None else delta.contiguous(), weight, eps)


def rms_norm_unchecked(
    lib: ctypes.CDLL, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm`` for callers that guarantee its conditions and contiguous x, delta and weight
    (the per-token path)."""
    rows, dim = x.numel() // x.shape[-1], x.shape[-1]
    normed = torch.empty(x.shape, dtype=x.dtype)
    total = x if delta is None else torch.empty(x.shape, dtype=x.dtype)
    lib.qk_rms_norm(
        x.data_ptr(), None if delta is None else delta.data_ptr(), total.data_ptr(), weight.data_ptr(),
        normed.data_ptr(), rows, dim, dim, dim, dim, dim, eps, x.dtype == torch.bfloat16,
    )  # fmt: skip
    return total, normed


def silu_mul(gate_up: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """SwiGLU's ``F.silu(gate) * up`` for ``gate, up = gate_up.chunk(2, -1)``, gate_up [..., 2·I] in
    fp32 or bf16 (bf16: silu rounded, then the product, as torch rounds them) → [..., I]."""
    if gate_up.dtype not in (torch.float32, torch.bfloat16) or gate_up.shape[-1] % 2 or not gate_up.shape[-1]:
        raise ValueError("silu_mul takes an fp32 or bf16 tensor with an even, non-zero last dimension")
    return silu_mul_unchecked(lib or load_library(), gate_up.contiguous())


def silu_mul_unchecked(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_mul`` for callers that guarantee its conditions and a contiguous gate_up (the per-token path)."""
    inter = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * inter)
    y = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
    lib.qk_silu_mul(
        gate_up.data_ptr(),
        y.data_ptr(),
        rows,
        inter,
        2 * inter,
        inter,
        gate_up.dtype == torch.bfloat16,
        torch.get_num_threads(),
    )
    return y


SOURCE = r"""
// qwenvl block kernels: matrix-vector products and dequantization straight from GGML blocks.
//
// Every format decodes its weights to exactly the fp32 values gguf.quants.dequantize gives (the
// same operations in the same order); products are exact and accumulate in fp32.
// Built by qwenvl/quant/kernels.py with -march=native: AVX-512 code where the CPU has it (and
// bf16 dot products where it has AVX512-BF16), portable C++ otherwise.
#include <stdint.h>
#include <string.h>

#include <cmath>

#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define QK_AVX512 1
#else
#define QK_AVX512 0
#endif
#if QK_AVX512 && defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
#define QK_BF16 1
#else
#define QK_BF16 0
#endif
#if QK_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define QK_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define QK_AMX 0
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Scalars

float half_to_float_slow(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    exp = 113;
    while (!(mant & 0x400)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// Every fp16 value as fp32 (256 KB): a scale is one load, and a broadcast of it another.
struct HalfTable {
  float value[65536];
  HalfTable() {
    for (uint32_t h = 0; h < 65536; ++h) value[h] = half_to_float_slow((uint16_t)h);
  }
};
const HalfTable kHalf;

inline const float* half_ptr(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return &kHalf.value[h];
}

inline float load_half(const uint8_t* p) { return *half_ptr(p); }

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40);
  return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// ---------------------------------------------------------------------------------------------
// Formats. Each block holds kValues weights in kBytes, read 32 at a time ("groups").
// prepare(blk, s) fills the scales of every group g of the block: the weights are
//   w = s.s0[g] * code + s.off[g]   (s.s1[g] for the group's second 16 weights: Q6_K)
// where code is the stored code minus kOffset, exactly as gguf computes them. Then
//   scalar(blk, g, s, out)   the 32 weights of group g as fp32
//   vec(blk, g, s, w0, w1)   the same in two zmm registers (AVX-512)
//   codes(blk, g)            the raw codes (0 .. 2^kBits - 1), for the bf16 path (kBits > 0)
// kOffset -1 marks formats with a minimum (off != 0).

struct Scales {  // of one block's groups; s0 and off adjacent, for one 16-float store
  float s0[8], off[8], s1[8];
};

inline void one_scale(Scales* s, float d, float off) {  // the 32-value formats
  s->s0[0] = s->s1[0] = d;
  s->off[0] = off;
}

struct Q8_0 {
  static constexpr int kValues = 32, kBytes = 34, kBits = 0, kOffset = 0;
  static constexpr bool kFloat = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), 0); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    for (int i = 0; i < 32; ++i) out[i] = (float)(int8_t)b[2 + i] * s->s0[0];
  }
};

struct Q4_0 {
  static constexpr int kValues = 32, kBytes = 18, kBits = 4, kOffset = 8;
  static constexpr bool kFloat = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), 0); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    for (int i = 0; i < 16; ++i) {
      out[i] = s->s0[0] * (float)((b[2 + i] & 0xF) - 8);
      out[i + 16] = s->s0[0] * (float)((b[2 + i] >> 4) - 8);
    }
  }
};

struct Q4_1 {
  static constexpr int kValues = 32, kBytes = 20, kBits = 4, kOffset = -1;
  static constexpr bool kFloat = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), load_half(b + 2)); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    for (int i = 0; i < 16; ++i) {
      out[i] = s->s0[0] * (float)(b[4 + i] & 0xF) + s->off[0];
      out[i + 16] = s->s0[0] * (float)(b[4 + i] >> 4) + s->off[0];
    }
  }
};

struct Q5_0 {
  static constexpr int kValues = 32, kBytes = 22, kBits = 5, kOffset = 16;
  static constexpr bool kFloat = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), 0); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    for (int i = 0; i < 16; ++i) {
      out[i] = s->s0[0] * (float)((int)((b[6 + i] & 0xF) | (((qh >> i) & 1) << 4)) - 16);
      out[i + 16] = s->s0[0] * (float)((int)((b[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
    }
  }
};

struct Q5_1 {
  static constexpr int kValues = 32, kBytes = 24, kBits = 5, kOffset = -1;
  static constexpr bool kFloat = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), load_half(b + 2)); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    for (int i = 0; i < 16; ++i) {
      out[i] = s->s0[0] * (float)((b[8 + i] & 0xF) | (((qh >> i) & 1) << 4)) + s->off[0];
      out[i + 16] = s->s0[0] * (float)((b[8 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) + s->off[0];
    }
  }
};

// Q4_K / Q5_K: d, dmin, then 8 six-bit scales and 8 six-bit mins packed in 12 bytes
void k_scales(const uint8_t* b, Scales* s) {
  const float d = load_half(b), dmin = load_half(b + 2);
  uint32_t u[4];  // unpacked as llama.cpp does: bytes 0-7 become the scales, 8-15 the mins
  memcpy(u, b + 4, 12);
  u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
  const uint32_t mins_low = u[1] & 0x3f3f3f3f;
  u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
  u[2] = mins_low;
  u[0] &= 0x3f3f3f3f;
  // s0 = d * scale, off = -(dmin * min): products of an fp16 and 6 bits, exact
#if QK_AVX512
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)u)));
  const __m512 factors = _mm512_insertf32x8(_mm512_set1_ps(d), _mm256_set1_ps(-dmin), 1);
  _mm512_storeu_ps(s->s0, _mm512_mul_ps(codes, factors));  // s0[0..7], then off[0..7]
#else
  uint8_t q[16];
  memcpy(q, u, 16);
  for (int j = 0; j < 8; ++j) {
    s->s0[j] = d * (float)q[j];
    s->off[j] = -(dmin * (float)q[8 + j]);
  }
#endif
}

struct Q4_K {  // d, dmin, 12 bytes of scales, 128 bytes of nibbles
  static constexpr int kValues = 256, kBytes = 144, kBits = 4, kOffset = -1;
  static constexpr bool kFloat = false;
  static void prepare(const uint8_t* b, Scales* s) { k_scales(b, s); }
  static void scalar(const uint8_t* b, int g, const Scales* s, float* out) {
    const uint8_t* q = b + 16 + (g / 2) * 32;
    const int shift = (g % 2) * 4;
    for (int i = 0; i < 32; ++i) out[i] = s->s0[g] * (float)((q[i] >> shift) & 0xF) + s->off[g];
  }
};

struct Q5_K {  // d, dmin, 12 bytes of scales, 32 bytes of high bits, 128 bytes of nibbles
  static constexpr int kValues = 256, kBytes = 176, kBits = 5, kOffset = -1;
  static constexpr bool kFloat = false;
  static void prepare(const uint8_t* b, Scales* s) { k_scales(b, s); }
  static void scalar(const uint8_t* b, int g, const Scales* s, float* out) {
    const uint8_t* qh = b + 16;
    const uint8_t* q = b + 48 + (g / 2) * 32;
    const int shift = (g % 2) * 4;
    for (int i = 0; i < 32; ++i) {
      const int q5 = ((q[i] >> shift) & 0xF) | (((qh[i] >> g) & 1) << 4);
      out[i] = s->s0[g] * (float)q5 + s->off[g];
    }
  }
};

struct Q6_K {  // 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales, d
  static constexpr int kValues = 256, kBytes = 210, kBits = 6, kOffset = 32;
  static constexpr bool kFloat = false;
  static void prepare(const uint8_t* b, Scales* s) {  // s0[g], s1[g]: d times scales 2g, 2g + 1 (exact)
    const float d = load_half(b + 208);
#if QK_AVX512
    const __m512 scales = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 192))));
    const __m512i even_odd = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m512 v = _mm512_permutexvar_ps(even_odd, _mm512_mul_ps(scales, _mm512_set1_ps(d)));
    _mm256_storeu_ps(s->s0, _mm512_castps512_ps256(v));
    _mm256_storeu_ps(s->s1, _mm512_extractf32x8_ps(v, 1));
#else
    for (int g = 0; g < 8; ++g) {
      s->s0[g] = d * (float)(int8_t)b[192 + 2 * g];
      s->s1[g] = d * (float)(int8_t)b[193 + 2 * g];
    }
#endif
    s->off[0] = 0;
  }
  static void scalar(const uint8_t* b, int g, const Scales* s, float* out) {
    const int half = g / 4, part = g % 4;
    const uint8_t* ql = b + half * 64 + (part % 2) * 32;
    const uint8_t* qh = b + 128 + half * 32;
    const int lshift = (part / 2) * 4, hshift = part * 2;
    for (int i = 0; i < 32; ++i) {
      const int q = (((ql[i] >> lshift) & 0xF) | (((qh[i] >> hshift) & 3) << 4)) - 32;
      out[i] = (i < 16 ? s->s0[g] : s->s1[g]) * (float)q;
    }
  }
};

// The float formats have no blocks (GGML's block size is 1): rows of any length K. Their kernels read
// them 32 values at a time like the block formats and take the last K % 32 values one by one, with
// at(row, k) (kFloat formats only). The block formats' K is always a multiple of kValues.
struct F16 {
  static constexpr int kValues = 32, kBytes = 64, kBits = 0, kOffset = 0;
  static constexpr bool kFloat = true;
  static float at(const uint8_t* row, int64_t k) { return load_half(row + 2 * k); }
  static void prepare(const uint8_t*, Scales*) {}
  static void scalar(const uint8_t* b, int, const Scales*, float* out) {
    for (int i = 0; i < 32; ++i) out[i] = at(b, i);
  }
};

struct BF16 {
  static constexpr int kValues = 32, kBytes = 64, kBits = 0, kOffset = 0;
  static constexpr bool kFloat = true;
  static float at(const uint8_t* row, int64_t k) {
    uint16_t v;
    memcpy(&v, row + 2 * k, 2);
    return bf16_to_float(v);
  }
  static void prepare(const uint8_t*, Scales*) {}
  static void scalar(const uint8_t* b, int, const Scales*, float* out) {
    for (int i = 0; i < 32; ++i) out[i] = at(b, i);
  }
};

struct F32 {
  static constexpr int kValues = 32, kBytes = 128, kBits = 0, kOffset = 0;
  static constexpr bool kFloat = true;
  static float at(const uint8_t* row, int64_t k) {
    float v;
    memcpy(&v, row + 4 * k, 4);
    return v;
  }
  static void prepare(const uint8_t*, Scales*) {}
  static void scalar(const uint8_t* b, int, const Scales*, float* out) { memcpy(out, b, 128); }
};

// sum of w[k] * x[k] over the last K % 32 values of a float format's row, in order (0 for the
// block formats, whose K is a multiple of kValues)
template <class F>
inline float tail_dot(const uint8_t* w, const float* x, int64_t K) {
  float sum = 0.0f;
  if constexpr (F::kFloat)
    for (int64_t k = K / 32 * 32; k < K; ++k) sum += F::at(w, k) * x[k];
  return sum;
}

#if QK_AVX512
// ---------------------------------------------------------------------------------------------
// AVX-512 decoders: the same values as scalar(), 16 lanes at a time.

inline __m512 i8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
inline __m512 u8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

template <class F>
inline void vec(const uint8_t* b, int g, const Scales& s, __m512& w0, __m512& w1);

template <>
inline void vec<Q8_0>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]);
  w0 = _mm512_mul_ps(i8_to_ps(_mm_loadu_si128((const __m128i*)(b + 2))), d);
  w1 = _mm512_mul_ps(i8_to_ps(_mm_loadu_si128((const __m128i*)(b + 18))), d);
}

inline void nibbles(const uint8_t* p, __m128i& lo, __m128i& hi) {  // 16 bytes: low and high nibbles
  const __m128i v = _mm_loadu_si128((const __m128i*)p), mask = _mm_set1_epi8(0xF);
  lo = _mm_and_si128(v, mask);
  hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
}

template <>
inline void vec<Q4_0>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]);
  const __m128i eight = _mm_set1_epi8(8);
  __m128i lo, hi;
  nibbles(b + 2, lo, hi);
  w0 = _mm512_mul_ps(d, i8_to_ps(_mm_sub_epi8(lo, eight)));
  w1 = _mm512_mul_ps(d, i8_to_ps(_mm_sub_epi8(hi, eight)));
}

template <>
inline void vec<Q4_1>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]), m = _mm512_set1_ps(s.off[0]);
  __m128i lo, hi;
  nibbles(b + 4, lo, hi);
  w0 = _mm512_fmadd_ps(d, u8_to_ps(lo), m);  // d * code is exact: one rounding, as gguf's d * q + m
  w1 = _mm512_fmadd_ps(d, u8_to_ps(hi), m);
}

template <>
inline void vec<Q5_0>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]);
  uint32_t qh;
  memcpy(&qh, b + 2, 4);
  __m128i lo, hi;
  nibbles(b + 6, lo, hi);
  const __m128i sixteen = _mm_set1_epi8(16);  // code - 16: subtract 16 where the high bit is clear
  lo = _mm_mask_sub_epi8(lo, (__mmask16)~qh, lo, sixteen);
  hi = _mm_mask_sub_epi8(hi, (__mmask16)~(qh >> 16), hi, sixteen);
  w0 = _mm512_mul_ps(d, i8_to_ps(lo));
  w1 = _mm512_mul_ps(d, i8_to_ps(hi));
}

template <>
inline void vec<Q5_1>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]), m = _mm512_set1_ps(s.off[0]);
  uint32_t qh;
  memcpy(&qh, b + 4, 4);
  __m128i lo, hi;
  nibbles(b + 8, lo, hi);
  const __m128i sixteen = _mm_set1_epi8(16);
  lo = _mm_mask_add_epi8(lo, (__mmask16)qh, lo, sixteen);
  hi = _mm_mask_add_epi8(hi, (__mmask16)(qh >> 16), hi, sixteen);
  w0 = _mm512_fmadd_ps(d, u8_to_ps(lo), m);
  w1 = _mm512_fmadd_ps(d, u8_to_ps(hi), m);
}

inline __m256i nibbles32(const uint8_t* p, int high) {  // the low or high nibbles of 32 bytes
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  return _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0xF));
}

inline void affine32(__m256i codes, float scale, float offset, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(scale), m = _mm512_set1_ps(offset);
  w0 = _mm512_fmadd_ps(d, u8_to_ps(_mm256_castsi256_si128(codes)), m);  // one rounding, as gguf
  w1 = _mm512_fmadd_ps(d, u8_to_ps(_mm256_extracti128_si256(codes, 1)), m);
}

inline __m256i q5k_high(const uint8_t* b, int g, __m256i codes) {
  const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 16));
  const __mmask32 bits = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << g)));
  return _mm256_mask_add_epi8(codes, bits, codes, _mm256_set1_epi8(16));
}

template <>
inline void vec<Q4_K>(const uint8_t* b, int g, const Scales& s, __m512& w0, __m512& w1) {
  affine32(nibbles32(b + 16 + (g / 2) * 32, g % 2), s.s0[g], s.off[g], w0, w1);
}

template <>
inline void vec<Q5_K>(const uint8_t* b, int g, const Scales& s, __m512& w0, __m512& w1) {
  affine32(q5k_high(b, g, nibbles32(b + 48 + (g / 2) * 32, g % 2)), s.s0[g], s.off[g], w0, w1);
}

inline __m256i q6k_codes(const uint8_t* b, int g) {  // 6-bit codes 0..63
  const int half = g / 4, part = g % 4;
  const __m256i ql = _mm256_loadu_si256((const __m256i*)(b + half * 64 + (part % 2) * 32));
  const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + half * 32));
  const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ql, (part / 2) * 4), _mm256_set1_epi8(0xF));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, part * 2), _mm256_set1_epi8(3));
  return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
}

template <>
inline void vec<Q6_K>(const uint8_t* b, int g, const Scales& s, __m512& w0, __m512& w1) {
  const __m256i q = _mm256_sub_epi8(q6k_codes(b, g), _mm256_set1_epi8(32));
  w0 = _mm512_mul_ps(_mm512_set1_ps(s.s0[g]), i8_to_ps(_mm256_castsi256_si128(q)));
  w1 = _mm512_mul_ps(_mm512_set1_ps(s.s1[g]), i8_to_ps(_mm256_extracti128_si256(q, 1)));
}

template <>
inline void vec<F16>(const uint8_t* b, int, const Scales&, __m512& w0, __m512& w1) {
  w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)b));
  w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(b + 32)));
}

inline __m512 bf16_to_ps(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

template <>
inline void vec<BF16>(const uint8_t* b, int, const Scales&, __m512& w0, __m512& w1) {
  w0 = bf16_to_ps(_mm256_loadu_si256((const __m256i*)b));
  w1 = bf16_to_ps(_mm256_loadu_si256((const __m256i*)(b + 32)));
}

template <>
inline void vec<F32>(const uint8_t* b, int, const Scales&, __m512& w0, __m512& w1) {
  w0 = _mm512_loadu_ps((const float*)b);
  w1 = _mm512_loadu_ps((const float*)(b + 64));
}

inline __m256i ps_to_bf16(__m512 v) {  // round to nearest even (no NaNs among weights)
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
#endif
}
#endif  // QK_AVX512

#if QK_BF16
// ---------------------------------------------------------------------------------------------
// bf16 dot path (bf16 x, small codes): the 32 codes of a group become 32 exact bf16 numbers (small
// integers) and one vdpbf16ps per x row sums their 32 exact products in fp32 (16 lanes of pairs).
// The group's scale then multiplies the 16 lane sums into the row's accumulator.
// Codes of up to 5 bits go through a table: vpermw maps each 16-bit code to its bf16 value. Q6_K's
// 6-bit codes c (a 64-entry table costs twice as much) become the bf16 number 64 + c exactly (the
// bits of 64 with c in its mantissa: c << 1); once per block, -96 * scale times the sums of x over
// each run of 16 weights takes the 64 + 32 off (at the cost of ~2 bits of the fp32 sums).
// codes() returns the 32 codes of group g, one byte each in value order (Q6_K's pre-shifted).

inline __m256i two_nibbles(const uint8_t* p) {  // 16 bytes: their low nibbles, then their high ones
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
  // the high lane rotates each 16-bit word right by 4 (left by 12), bringing the high nibbles down
  const __m256i counts = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 12, 12, 12, 12, 12, 12, 12, 12);
  return _mm256_and_si256(_mm256_shldv_epi16(v, v, counts), _mm256_set1_epi8(0xF));
}

inline __m256i add_high_bits(__m256i codes, uint32_t bits) {  // + 16 where the 5th bit is set
  return _mm256_mask_add_epi8(codes, bits, codes, _mm256_set1_epi8(16));
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

template <class F>
inline __m256i codes(const uint8_t* b, int g);

template <>
inline __m256i codes<Q4_0>(const uint8_t* b, int) { return two_nibbles(b + 2); }

template <>
inline __m256i codes<Q4_1>(const uint8_t* b, int) { return two_nibbles(b + 4); }

template <>
inline __m256i codes<Q5_0>(const uint8_t* b, int) { return add_high_bits(two_nibbles(b + 6), load_u32(b + 2)); }

template <>
inline __m256i codes<Q5_1>(const uint8_t* b, int) { return add_high_bits(two_nibbles(b + 8), load_u32(b + 4)); }

template <>
inline __m256i codes<Q4_K>(const uint8_t* b, int g) { return nibbles32(b + 16 + (g / 2) * 32, g % 2); }

template <>
inline __m256i codes<Q5_K>(const uint8_t* b, int g) { return q5k_high(b, g, nibbles32(b + 48 + (g / 2) * 32, g % 2)); }

template <>
inline __m256i codes<Q6_K>(const uint8_t* b, int g) {  // (low 4 bits | high 2 bits << 4) << 1
  const int half = g / 4, part = g % 4;
  const __m256i ql = _mm256_loadu_si256((const __m256i*)(b + half * 64 + (part % 2) * 32));
  const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + half * 32));
  // 16-bit shifts: bits crossing between the two bytes of a word land outside the masks
  const __m256i lo = _mm256_and_si256(part < 2 ? _mm256_slli_epi16(ql, 1) : _mm256_srli_epi16(ql, 3),
                                      _mm256_set1_epi8(0x1E));
  const int up = 5 - 2 * part;  // high bit pair 2 * part .. 2 * part + 1 moves to bits 5-6
  const __m256i hi = up > 0 ? _mm256_slli_epi16(qh, up) : _mm256_srli_epi16(qh, -up);
  return _mm256_ternarylogic_epi32(hi, _mm256_set1_epi8(0x60), lo, 0xEA);  // (hi & 0x60) | lo
}

template <class F>
inline __m512i code_table() {  // bf16 of the codes 0 .. 31 minus the offset
  const int first = -(F::kOffset > 0 ? F::kOffset : 0);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(first)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(first + 16)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // small integers: exact
}

// the formats that take the dot path for bf16 x; the others (Q8_0, F16, BF16, F32) convert x to fp32:
// they decode as fast to fp32, and two FMAs beat one vdpbf16ps on this CPU
template <class F>
constexpr bool kDot = F::kBits > 0;

template <class F>
struct DotWeights {  // group g of a block as 32 exact bf16 values
  __m512i table;
  DotWeights() {
    if constexpr (F::kBits < 6) table = code_table<F>();
  }
  inline __m512i operator()(const uint8_t* b, int g) const {
    const __m512i code = _mm512_cvtepu8_epi16(codes<F>(b, g));
    if constexpr (F::kBits == 6) return _mm512_or_si512(code, _mm512_set1_epi16(0x4280));  // 64 + c
    return _mm512_permutexvar_epi16(code, table);
  }
};

inline __m512 q6k_minus(const uint8_t* b) {  // -96 * d * scale of the block's 16 weight runs, in order
  const __m512 scales = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 192))));
  return _mm512_mul_ps(_mm512_mul_ps(scales, _mm512_set1_ps(load_half(b + 208))), _mm512_set1_ps(-96.0f));
}

template <class F>
inline __m512 bf16_scale(const Scales& s, int g) {  // lanes 0-7 pair weights 0-15, 8-15 the rest
  if constexpr (F::kValues == 256 && F::kOffset > 0)  // Q6_K: a scale per 16 weights
    return _mm512_insertf32x8(_mm512_set1_ps(s.s0[g]), _mm256_set1_ps(s.s1[g]), 1);
  return _mm512_set1_ps(s.s0[g]);
}
#endif  // QK_BF16

// ---------------------------------------------------------------------------------------------
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows m, reading w's blocks once.
//
// Row invariance: every output y[m, n] is computed by the same sequence of operations whatever M
// is (each (x row, w row) pair has its own accumulators, updated group by group in the same order
// and reduced the same way), so a row's result does not depend on the rows computed with it.

struct GemvArgs {
  const float* x;  // [M, K] fp32 (fp32 path)
  int64_t M, K;
  const uint16_t* xb;  // [M, ldxb] bf16 (bf16 path)
  int64_t ldxb;
  const float* xsum;  // bf16 path: [K/32, ldxs] sums of x over each group of 32 (formats with a
  int64_t ldxs;       // minimum), or [M, ldxs = K/16] sums over each run of 16 (Q6_K)
  const uint8_t* w;
  int64_t N, row_bytes;
  const float* bias;  // [N] or null
  void* y;
  int64_t ldy;
  int y_bf16;
};

// Output tiles go to the threads in shrinking chunks (OpenMP's guided schedule: the first ones half
// the work, as a static split, so each thread streams through long runs of rows), each to whichever
// thread is free: a thread the OS (or another process) holds back does not hold the others at the end
// of the call. Chunks of no fewer than ~1/16 of a thread's share keep the handing-out cheap.
inline int64_t min_chunk(int64_t tiles, int threads) {
  const int64_t chunk = tiles / ((int64_t)threads * 16);
  return chunk > 0 ? chunk : 1;
}

inline void store(const GemvArgs& a, int64_t m, int64_t n, float v) {
  if (a.bias) v += a.bias[n];
  if (a.y_bf16)
    ((uint16_t*)a.y)[m * a.ldy + n] = float_to_bf16(v);
  else
    ((float*)a.y)[m * a.ldy + n] = v;
}

#if QK_AVX512
// Streaming from memory: while reading a block of NR rows, fetch the same block of the next NR
// rows (the next tile, NR * row_bytes further on: rows are contiguous). Prefetches never fault.
template <class F, int NR>
inline void prefetch_next_tile(const uint8_t* block, int64_t row_bytes) {
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    for (int offset = 0; offset < F::kBytes; offset += 64)
      _mm_prefetch((const char*)(block + (NR + r) * row_bytes + offset), _MM_HINT_T0);
}

// NR output rows of w against MB (<= 16) rows of fp32 x starting at m0: each group of each w row
// is decoded once (two zmm of exact fp32 weights) for all MB rows; per x row two FMAs into the
// pair's accumulator.
template <class F, int NR, int MB>
void gemv_tile_f32(const GemvArgs& a, int64_t n, int64_t m0) {
  constexpr int G = F::kValues / 32;
  __m512 acc[NR][MB];
  Scales s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const float* x = a.x + m0 * a.K;
  for (int64_t blk = 0; blk < a.K / F::kValues; ++blk) {
    const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
    prefetch_next_tile<F, NR>(row, a.row_bytes);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) F::prepare(row + r * a.row_bytes, &s[r]);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const float* xg = x + blk * F::kValues + g * 32;
      __m512 w0[NR], w1[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) vec<F>(row + r * a.row_bytes, g, s[r], w0[r], w1[r]);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const __m512 x0 = _mm512_loadu_ps(xg + m * a.K), x1 = _mm512_loadu_ps(xg + m * a.K + 16);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w1[r], x1, _mm512_fmadd_ps(w0[r], x0, acc[r][m]));
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const float tail = tail_dot<F>(a.w + (n + r) * a.row_bytes, x + m * a.K, a.K);
      store(a, m0 + m, n + r, _mm512_reduce_add_ps(acc[r][m]) + tail);
    }
}

// w rows per tile for MB x rows: up to 16 accumulators
constexpr int tile_rows(int mb) { return mb <= 4 ? 4 : mb <= 8 ? 2 : 1; }

// rows of x per pass over w (each pass decodes w once): more rows share the decoding, fewer keep
// the fp32 x rows in L1
constexpr int kChunkRows = 8;

template <class F, int MB, bool DOT>
void gemv_pass(const GemvArgs& a, int64_t m0, int threads);

template <class F, int MB, bool DOT>
void gemv_chunk(const GemvArgs& a, int64_t m0, int64_t rows, int threads) {  // rows <= MB
  if constexpr (MB > 1) {
    if (rows < MB) {
      gemv_chunk<F, MB - 1, DOT>(a, m0, rows, threads);
      return;
    }
  }
  gemv_pass<F, MB, DOT>(a, m0, threads);
}

template <class F, bool DOT>
void gemv_all(const GemvArgs& a, int threads) {
  constexpr int C = DOT ? 16 : kChunkRows;
  for (int64_t m0 = 0; m0 < a.M; m0 += C) gemv_chunk<F, C, DOT>(a, m0, a.M - m0 < C ? a.M - m0 : C, threads);
}

#if QK_BF16
// NR output rows of w against MB (<= 16) rows of bf16 x starting at m0: each group of each w row
// is decoded once for all MB rows; per x row one vdpbf16ps and one FMA by the scale. Formats with
// a minimum add off * (the group's sum of x), for all MB rows at once (lanes = x rows).
template <class F, int NR, int MB>
void gemv_tile_dot(const GemvArgs& a, int64_t n, int64_t m0) {
  constexpr bool kMin = F::kOffset < 0, kSixBits = F::kBits == 6;
  constexpr int G = F::kValues / 32;
  __m512 acc[NR][MB], acc_min[NR];
  Scales s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    acc_min[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  const DotWeights<F> weights;
  const uint16_t* x = a.xb + m0 * a.ldxb;
  for (int64_t blk = 0; blk < a.K / F::kValues; ++blk) {
    const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
    prefetch_next_tile<F, NR>(row, a.row_bytes);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) F::prepare(row + r * a.row_bytes, &s[r]);
    if constexpr (kSixBits) {  // the 64 + 32 off every weight: -96 * scale times x's sums over 16
      __m512 minus[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) minus[r] = q6k_minus(row + r * a.row_bytes);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const __m512 sums = _mm512_loadu_ps(a.xsum + (m0 + m) * a.ldxs + blk * 16);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(minus[r], sums, acc[r][m]);
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const int64_t k = blk * F::kValues + g * 32;
      __m512i w[NR];
      __m512 scale[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        w[r] = weights(row + r * a.row_bytes, g);
        scale[r] = bf16_scale<F>(s[r], g);
      }
      if constexpr (kMin) {
        const __m512 xsum = _mm512_loadu_ps(a.xsum + (k / 32) * a.ldxs + m0);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) acc_min[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r].off[g]), xsum, acc_min[r]);
      }
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + m * a.ldxb + k));
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          const __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[r], xv);
          acc[r][m] = _mm512_fmadd_ps(scale[r], dot, acc[r][m]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    alignas(64) float mins[16];
    _mm512_store_ps(mins, acc_min[r]);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      float v = _mm512_reduce_add_ps(acc[r][m]);
      if constexpr (kMin) v += mins[m];
      store(a, m0 + m, n + r, v);
    }
  }
}

// x's sums over each run of `width` (16 or 32) values of each of its M bf16 rows, summed in order:
// the sum of row m's run j goes to out[j * run_stride + m * row_stride]
void x_run_sums(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int width, float* out, int64_t run_stride,
                int64_t row_stride) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K / width; ++j) {
      const uint16_t* run = x + m * ldx + j * width;
      float sum = 0;
      for (int i = 0; i < width; ++i) sum += bf16_to_float(run[i]);
      out[j * run_stride + m * row_stride] = sum;
    }
}
#endif  // QK_BF16

#if QK_AMX
// ---------------------------------------------------------------------------------------------
// AMX path (bf16 x, small codes, when the kernel grants the tile state): per group of 32, one
// tdpbf16ps multiplies 16 weight rows (tile A: the group's exact bf16 code values, as in the dot
// path) by up to 16 x rows (tile B: x in VNNI order, made once per call) into a 16 x 16 fp32 tile
// of raw dot products, which the groups' scales multiply into one accumulator per weight row
// (lanes = x rows). Each output's sums depend only on its own weight row and x row.

bool amx_permitted() {  // the kernel must grant the tile state (torch/oneDNN may have asked already)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// Q8_0 on tiles too (not on the dot path: there two fp32 FMAs beat one vdpbf16ps): its int8 codes
// are exact bf16 numbers
template <>
struct DotWeights<Q8_0> {
  inline __m512i operator()(const uint8_t* b, int) const {
    const __m512 lo = i8_to_ps(_mm_loadu_si128((const __m128i*)(b + 2)));
    const __m512 hi = i8_to_ps(_mm_loadu_si128((const __m128i*)(b + 18)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
};

// the formats the tiles take: small codes times a scale per 32 (or 16) weights
template <class F>
constexpr bool kAmx = kDot<F> || std::is_same_v<F, Q8_0>;

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void amx_configure() {  // tiles 0, 3, 5: C; 1, 4, 6: A; 2, 7: B — all 16 rows of 64 bytes
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// Transposes 16 rows of 16 32-bit words in place: r[p] becomes word p of every row.
inline void transpose_words(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: words 0-1 / 2-3 of rows i, i + 1 interleaved
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + k], lane L: word 4L + k of rows i .. i + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // the 4 x 4 lanes of r[k], r[4 + k], r[8 + k], r[12 + k]
    const __m512i v0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88), v1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[8 + k] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[4 + k] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// x [M, K] bf16 → [K/32][16 pairs][16 rows][2]: group g's B tile at xv + g * 512 (uint16_t), rows
// of x beyond M zero. A pair of bf16 values is one 32-bit word: per group, a 16 x 16 word transpose.
void vnni_x(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, uint16_t* xv) {
  for (int64_t g = 0; g < K / 32; ++g) {
    __m512i r[16];
    for (int m = 0; m < 16; ++m)
      r[m] = m < M ? _mm512_loadu_si512((const void*)(x + m * ldx + g * 32)) : _mm512_setzero_si512();
    transpose_words(r);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512((void*)(xv + (g * 16 + p) * 32), r[p]);
  }
}

// x_run_sums' sums (runs of `width` 16 or 32) from the VNNI x, all 16 rows at once: [K / width][16]
// (lanes = rows). Each lane adds its row's values in x_run_sums' order, so the sums are the same.
void vnni_run_sums(const uint16_t* xv, int64_t K, int width, float* out) {
  const int pairs = width / 2;
  for (int64_t j = 0; j < K / width; ++j) {
    __m512 sum = _mm512_setzero_ps();
    for (int p = 0; p < pairs; ++p) {  // one word per row: x[2p] in the low half, x[2p + 1] high
      const __m512i words = _mm512_loadu_si512((const void*)(xv + (j * pairs + p) * 32));
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(words, 16)));
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32((int)0xFFFF0000))));
    }
    _mm512_storeu_ps(out + j * 16, sum);
  }
}

struct AmxArgs {
  const uint16_t* xv;  // VNNI x, see vnni_x
  const float* xsum;   // [K/32][16] (formats with a minimum) or [K/16][16] (Q6_K), lanes = x rows
};

// Decodes group gi (of the whole row) of `rows` weight rows into an A buffer (Q6_K: two, one per 16).
template <class F, bool kFull>
inline void amx_decode(const GemvArgs& a, const DotWeights<F>& weights, int64_t n, int rows, int64_t gi,
                       uint16_t* abuf) {
  constexpr int G = F::kValues / 32;
  const uint8_t* row = a.w + n * a.row_bytes + (gi / G) * F::kBytes;
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    if (!kFull && r >= rows) break;
    const __m512i w = weights(row + r * a.row_bytes, (int)(gi % G));
    if constexpr (F::kBits == 6) {  // a scale per 16 weights: the halves in two A tiles
      _mm512_store_si512((void*)(abuf + r * 32), _mm512_maskz_mov_epi16(0x0000FFFF, w));
      _mm512_store_si512((void*)(abuf + 512 + r * 32), _mm512_maskz_mov_epi16(0xFFFF0000, w));
    } else {
      _mm512_store_si512((void*)(abuf + r * 32), w);
    }
  }
}

// The tile products of one group: A buffer(s) x B → C buffer(s), on tiles chosen by the parity
// (GCC's tile intrinsics take literal tile numbers). Q6_K's second halves share C tile 3.
template <bool kHalves>
inline void amx_multiply(int parity, const uint16_t* abuf, const uint16_t* bx, float* cbuf) {
  if (parity == 0) {  // C 0, A 1, B 2
    _tile_zero(0);
    _tile_loadd(1, abuf, 64);
    _tile_loadd(2, bx, 64);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, cbuf, 64);
  } else {  // C 5, A 6, B 7
    _tile_zero(5);
    _tile_loadd(6, abuf, 64);
    _tile_loadd(7, bx, 64);
    _tile_dpbf16ps(5, 6, 7);
    _tile_stored(5, cbuf, 64);
  }
  if constexpr (kHalves) {  // C 3, A 4, the same B
    _tile_zero(3);
    _tile_loadd(4, abuf + 512, 64);
    if (parity == 0)
      _tile_dpbf16ps(3, 4, 2);
    else
      _tile_dpbf16ps(3, 4, 7);
    _tile_stored(3, cbuf + 256, 64);
  }
}

// rows (<= 16) weight rows from n against the 16 (zero-padded) x rows. Two-stage pipeline over the
// groups gi of a row: the tiles multiply group gi while the next group is decoded into the other
// buffer (tiles are not renamed: alternate ones let consecutive groups overlap).
template <class F, bool kFull>
void amx_tile(const GemvArgs& a, const AmxArgs& b, int64_t n, int rows, uint16_t* abuf, float* cbuf) {
  constexpr bool kMin = F::kOffset < 0, kSixBits = F::kBits == 6;
  constexpr int G = F::kValues / 32;
  const int64_t groups = a.K / 32;
  __m512 acc[16];
  Scales s[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  const DotWeights<F> weights;
  amx_decode<F, kFull>(a, weights, n, rows, 0, abuf);
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t blk = gi / G;
    const int g = (int)(gi % G);
    const int parity = (int)(gi & 1);
    uint16_t* current = abuf + parity * 1024;
    float* result = cbuf + parity * 512;
    amx_multiply<kSixBits>(parity, current, b.xv + gi * 512, result);
    if (g == 0) {  // a new block: its scales (and Q6_K's 64 + 32 correction)
      const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
      prefetch_next_tile<F, 16>(row, a.row_bytes);
      for (int r = 0; r < 16; ++r) {
        if (!kFull && r >= rows) break;
        F::prepare(row + r * a.row_bytes, &s[r]);
        if constexpr (kSixBits) {  // -96 * scale times x's sums over each run of 16
          alignas(64) float minus[16];
          _mm512_store_ps(minus, q6k_minus(row + r * a.row_bytes));
#pragma GCC unroll 16
          for (int j = 0; j < 16; ++j)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(minus[j]), _mm512_loadu_ps(b.xsum + (blk * 16 + j) * 16), acc[r]);
        }
      }
    }
    if (gi + 1 < groups) amx_decode<F, kFull>(a, weights, n, rows, gi + 1, abuf + (parity ^ 1) * 1024);
    const __m512 xsum = kMin ? _mm512_loadu_ps(b.xsum + gi * 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      if (!kFull && r >= rows) break;
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r].s0[g]), _mm512_load_ps(result + r * 16), acc[r]);
      if constexpr (kSixBits)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r].s1[g]), _mm512_load_ps(result + 256 + r * 16), acc[r]);
      if constexpr (kMin) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r].off[g]), xsum, acc[r]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    alignas(64) float out[16];
    _mm512_store_ps(out, acc[r]);
    for (int64_t m = 0; m < a.M; ++m) store(a, m, n + r, out[m]);
  }
}

template <class F>
void gemv_amx(const GemvArgs& a, const AmxArgs& b, int threads) {  // a.M <= 16
  const int64_t tiles = (a.N + 15) / 16, chunk = min_chunk(tiles, threads);
  // a few tiles (v of q/k/v: 8) are quicker on one thread than the fork and join
#pragma omp parallel num_threads(tiles > 16 ? threads : 1)
  {
    alignas(64) uint16_t abuf[2048] = {};
    alignas(64) float cbuf[1024];
    amx_configure();
#pragma omp for schedule(guided, chunk)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n = t * 16;
      if (n + 16 <= a.N)
        amx_tile<F, true>(a, b, n, 16, abuf, cbuf);
      else
        amx_tile<F, false>(a, b, n, (int)(a.N - n), abuf, cbuf);
    }
  }  // tiles stay configured: releasing them cost ~7 µs a call here, and each user loads its own configuration
}

// the AMX path for x [M <= 16, K] bf16; the VNNI x and its sums in buffers kept by the thread
template <class F>
void run_amx(const uint16_t* x, int64_t ldx, GemvArgs a, int threads) {
  const int64_t M = a.M, K = a.K;
  thread_local std::vector<uint16_t> xv;
  thread_local std::vector<float> xsum;  // only formats with a minimum (sums over 32) and Q6_K (over 16) read it
  xv.resize((size_t)(K * 16));
  vnni_x(x, M, K, ldx, xv.data());
  if (F::kOffset < 0 || F::kBits == 6) {
    const int width = F::kBits == 6 ? 16 : 32;
    xsum.resize((size_t)(K / width * 16));
    vnni_run_sums(xv.data(), K, width, xsum.data());
  }
  gemv_amx<F>(a, AmxArgs{xv.data(), xsum.data()}, threads);
}
#endif  // QK_AMX

template <class F, int MB, bool DOT>
void gemv_pass(const GemvArgs& a, int64_t m0, int threads) {
  constexpr int NR = tile_rows(MB);
  const int64_t tiles = a.N / NR, chunk = min_chunk(tiles, threads);
#if QK_BF16
  if constexpr (DOT) {
#pragma omp parallel for num_threads(threads) schedule(guided, chunk)
    for (int64_t t = 0; t < tiles; ++t) gemv_tile_dot<F, NR, MB>(a, t * NR, m0);
    for (int64_t n = tiles * NR; n < a.N; ++n) gemv_tile_dot<F, 1, MB>(a, n, m0);
    return;
  }
#endif
#pragma omp parallel for num_threads(threads) schedule(guided, chunk)
  for (int64_t t = 0; t < tiles; ++t) gemv_tile_f32<F, NR, MB>(a, t * NR, m0);
  for (int64_t n = tiles * NR; n < a.N; ++n) gemv_tile_f32<F, 1, MB>(a, n, m0);
}
#else
template <class F, int NR>
void gemv_rows(const GemvArgs& a, int64_t n) {
  float w[32];
  Scales s;
  for (int r = 0; r < NR; ++r)
    for (int64_t m = 0; m < a.M; ++m) {
      float acc[32] = {0};
      const float* x = a.x + m * a.K;
      for (int64_t blk = 0; blk < a.K / F::kValues; ++blk) {
        const uint8_t* b = a.w + (n + r) * a.row_bytes + blk * F::kBytes;
        F::prepare(b, &s);
        for (int g = 0; g < F::kValues / 32; ++g) {
          F::scalar(b, g, &s, w);
          const float* xg = x + blk * F::kValues + g * 32;
          for (int i = 0; i < 32; ++i) acc[i] += w[i] * xg[i];
        }
      }
      float sum = 0;
      for (int i = 0; i < 32; ++i) sum += acc[i];
      store(a, m, n + r, sum + tail_dot<F>(a.w + (n + r) * a.row_bytes, x, a.K));
    }
}

template <class F, bool DOT>
void gemv_all(const GemvArgs& a, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < a.N; ++n) gemv_rows<F, 1>(a, n);
}
#endif

// fp32 copy of x ([M, K], row stride ldx, fp32 or bf16)
void load_x(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      out[m * K + k] = x_bf16 ? bf16_to_float(((const uint16_t*)x)[m * ldx + k]) : ((const float*)x)[m * ldx + k];
}

template <class F>
struct GemvFn {
  static void run(const void* x, int x_bf16, int64_t ldx, GemvArgs a, int threads, int amx) {
    const int64_t M = a.M, K = a.K;
#if QK_AMX
    if constexpr (kAmx<F>) {
      if (x_bf16 && amx && amx_permitted()) {
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
          GemvArgs rows = a;
          rows.M = M - m0 < 16 ? M - m0 : 16;
          rows.y = (uint8_t*)a.y + m0 * a.ldy * (a.y_bf16 ? 2 : 4);
          run_amx<F>((const uint16_t*)x + m0 * ldx, ldx, rows, threads);
        }
        return;
      }
    }
#endif
#if QK_BF16
    if constexpr (kDot<F>) {
      if (x_bf16) {
        // formats with a minimum: the sum of each group of 32 x values, x rows side by side
        const int64_t groups = K / 32, ld = (M + 15) / 16 * 16;
        std::vector<float> xsum;
        if (F::kOffset < 0) {
          xsum.assign((size_t)(groups * ld), 0.0f);
          x_run_sums((const uint16_t*)x, M, K, ldx, 32, xsum.data(), ld, 1);
        }
        // Q6_K: the sum of each run of 16 x values, [M, K/16]
        if (F::kBits == 6) {
          xsum.resize((size_t)(M * K / 16));
          x_run_sums((const uint16_t*)x, M, K, ldx, 16, xsum.data(), 1, K / 16);
        }
        a.xb = (const uint16_t*)x;
        a.ldxb = ldx;
        a.xsum = xsum.data();
        a.ldxs = F::kBits == 6 ? K / 16 : ld;
        gemv_all<F, true>(a, threads);
        return;
      }
    }
#endif
    std::vector<float> xf((size_t)(M * K));
    load_x(x, x_bf16, M, K, ldx, xf.data());
    a.x = xf.data();
    gemv_all<F, false>(a, threads);
  }
};

// ---------------------------------------------------------------------------------------------
// Dequantization: rows of fp32, or of `pieces` bf16 parts [hi | mid | lo] whose sum is the value.

// value v of column k as fp32, or as `pieces` bf16 parts (part p at p * K + k) summing to it
inline void put_value(void* out, int64_t K, int64_t k, float v, int pieces) {
  if (!pieces) {
    ((float*)out)[k] = v;
    return;
  }
  for (int p = 0; p < pieces; ++p) {
    const uint16_t part = float_to_bf16(v);
    ((uint16_t*)out)[p * K + k] = part;
    v -= bf16_to_float(part);
  }
}

template <class F>
void dequant_row(const uint8_t* row, int64_t K, void* out, int pieces) {
  Scales s;
  for (int64_t blk = 0; blk < K / F::kValues; ++blk) {
    const uint8_t* b = row + blk * F::kBytes;
    F::prepare(b, &s);
    for (int g = 0; g < F::kValues / 32; ++g) {
      const int64_t k = blk * F::kValues + g * 32;
#if QK_AVX512
      __m512 w[2];
      vec<F>(b, g, s, w[0], w[1]);
      for (int h = 0; h < 2; ++h) {
        if (!pieces) {
          _mm512_storeu_ps((float*)out + k + 16 * h, w[h]);
          continue;
        }
        __m512 rest = w[h];
        for (int p = 0; p < pieces; ++p) {
          const __m256i part = ps_to_bf16(rest);
          _mm256_storeu_si256((__m256i*)((uint16_t*)out + p * K + k + 16 * h), part);
          rest = _mm512_sub_ps(rest, bf16_to_ps(part));  // exact: part is rest rounded to 8 bits
        }
      }
#else
      float w[32];
      F::scalar(b, g, &s, w);
      for (int i = 0; i < 32; ++i) put_value(out, K, k + i, w[i], pieces);
#endif
    }
  }
  if constexpr (F::kFloat)
    for (int64_t k = K / 32 * 32; k < K; ++k) put_value(out, K, k, F::at(row, k), pieces);
}

template <class F>
struct DequantFn {
  static void run(const uint8_t* w, int64_t N, int64_t K, int64_t row_bytes, void* out, int pieces, int threads) {
    const int64_t out_row = pieces ? (int64_t)pieces * K * 2 : K * 4;  // bytes
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) dequant_row<F>(w + n * row_bytes, K, (uint8_t*)out + n * out_row, pieces);
  }
};

template <template <class> class Fn, class... Args>
int dispatch(int type, Args... args) {
  switch (type) {  // GGMLQuantizationType values
    case 0: Fn<F32>::run(args...); return 0;
    case 1: Fn<F16>::run(args...); return 0;
    case 2: Fn<Q4_0>::run(args...); return 0;
    case 3: Fn<Q4_1>::run(args...); return 0;
    case 6: Fn<Q5_0>::run(args...); return 0;
    case 7: Fn<Q5_1>::run(args...); return 0;
    case 8: Fn<Q8_0>::run(args...); return 0;
    case 12: Fn<Q4_K>::run(args...); return 0;
    case 13: Fn<Q5_K>::run(args...); return 0;
    case 14: Fn<Q6_K>::run(args...); return 0;
    case 30: Fn<BF16>::run(args...); return 0;
    default: return 1;
  }
}

// ---------------------------------------------------------------------------------------------
// Decode attention: one query token per row, each row a request of its own with its own KV cache.
// A task is one (row, kv head): it stores the row's new key/value at its position, then runs the
// kv head's G query heads over keys 0 .. position. The operations of a task do not depend on the
// other rows, so a row gets the same result alone or in a batch.

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline void store_as(float* p, float v) { *p = v; }
inline void store_as(uint16_t* p, float v) { *p = float_to_bf16(v); }

// exp(x) for x <= 0 (scores minus their maximum), branch-free so that loops over it vectorize:
// 2^n * e^r with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (~2 ulp).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (|.| < 2^22)
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}

constexpr int kLanes = 16;

inline float sum_lanes(float* lanes) {  // a fixed pairwise order
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// sum of a[d] * b[d] in kLanes partial sums, then a fixed pairwise order
inline float dot_lanes(const float* a, const float* b, int D) {
  float lanes[kLanes] = {};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  for (int l = 0; d + l < D; ++l) lanes[l] += a[d + l] * b[d + l];
  return sum_lanes(lanes);
}

struct AttnArgs {
  int heads, kv_heads, D;
  const void *q, *k, *v;
  int64_t q_row, k_row, v_row;  // element strides between rows; heads are D apart
  int64_t layer;
  const int64_t *key_ptrs, *value_ptrs, *layer_strides, *head_strides, *positions;  // per row
  void* out;  // [rows, heads, D]
  float scale;
};

// keys (or values) t .. t + n as fp32 rows of D
template <class T>
inline void load_rows(const T* src, int64_t n, int D, float* dst) {
  for (int64_t i = 0; i < n * D; ++i) dst[i] = to_float(src[i]);
}

// scores[j * len + t] = q_j . key_t for the G query heads (q pre-scaled), keys as fp32 rows
inline void score_rows(const float* qf, int G, int D, const float* keys, int64_t t0, int64_t n, int64_t len,
                       float* scores) {
#if QK_AVX512
  if (D % 16 == 0) {
    for (int64_t t = 0; t < n; ++t) {
      const float* key = keys + t * D;
      for (int j = 0; j < G; ++j) {
        __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(qf + j * D), _mm512_loadu_ps(key));
        for (int d = 16; d < D; d += 16)
          sum = _mm512_fmadd_ps(_mm512_loadu_ps(qf + j * D + d), _mm512_loadu_ps(key + d), sum);
        scores[j * len + t0 + t] = _mm512_reduce_add_ps(sum);
      }
    }
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t)
    for (int j = 0; j < G; ++j) scores[j * len + t0 + t] = dot_lanes(qf + j * D, keys + t * D, D);
}

// out[d] += sum over t of p[t] * rows[t][d], t in order (one accumulator per d)
template <int C>
inline void weigh_rows_avx512(const float* p, const float* rows, int64_t n, float* out) {
#if QK_AVX512
  __m512 acc[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = _mm512_loadu_ps(out + 16 * c);
  for (int64_t t = 0; t < n; ++t) {
    const __m512 weight = _mm512_set1_ps(p[t]);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(rows + t * 16 * C + 16 * c), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
#endif
}

inline void weigh_rows(const float* p, const float* rows, int64_t n, int D, float* out) {
#if QK_AVX512
  switch (D) {
    case 64: weigh_rows_avx512<4>(p, rows, n, out); return;
    case 128: weigh_rows_avx512<8>(p, rows, n, out); return;
    default: break;
  }
#endif
  for (int64_t t = 0; t < n; ++t)
    for (int d = 0; d < D; ++d) out[d] += p[t] * rows[t * D + d];
}

constexpr int64_t kAttnBlock = 32;  // keys (values) converted to fp32 at a time

template <class T>
void attention_task(const AttnArgs& a, int64_t row, int g) {
  const int G = a.heads / a.kv_heads, D = a.D;
  const int64_t pos = a.positions[row], len = pos + 1, head_stride = a.head_strides[row];
  const int64_t offset = a.layer * a.layer_strides[row] + g * head_stride;
  T* keys = (T*)a.key_ptrs[row] + offset;
  T* values = (T*)a.value_ptrs[row] + offset;
  memcpy(keys + pos * D, (const T*)a.k + row * a.k_row + g * D, D * sizeof(T));
  memcpy(values + pos * D, (const T*)a.v + row * a.v_row + g * D, D * sizeof(T));

  thread_local std::vector<float> scratch;
  scratch.resize((size_t)G * D * 2 + kAttnBlock * D + (size_t)G * len);
  float *qf = scratch.data(), *acc = qf + G * D, *block = acc + G * D, *scores = block + kAttnBlock * D;
  const T* q = (const T*)a.q + row * a.q_row + (int64_t)g * G * D;
  for (int i = 0; i < G * D; ++i) qf[i] = to_float(q[i]) * a.scale;
  for (int64_t t = 0; t < len; t += kAttnBlock) {
    const int64_t n = len - t < kAttnBlock ? len - t : kAttnBlock;
    load_rows(keys + t * D, n, D, block);
    score_rows(qf, G, D, block, t, n, len, scores);
  }
  for (int j = 0; j < G; ++j) {  // softmax
    float* s = scores + j * len;
    float top = s[0];
#pragma omp simd reduction(max : top)
    for (int64_t t = 1; t < len; ++t) top = s[t] > top ? s[t] : top;  // order-free
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] = exp_nonpositive(s[t] - top);
    float lanes[kLanes] = {};
    int64_t t = 0;
    for (; t + kLanes <= len; t += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += s[t + l];
    for (int l = 0; t + l < len; ++l) lanes[l] += s[t + l];
    const float inv = 1.0f / sum_lanes(lanes);
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  for (int i = 0; i < G * D; ++i) acc[i] = 0.0f;
  for (int64_t t0 = 0; t0 < len; t0 += kAttnBlock) {
    const int64_t n = len - t0 < kAttnBlock ? len - t0 : kAttnBlock;
    load_rows(values + t0 * D, n, D, block);
    for (int j = 0; j < G; ++j) weigh_rows(scores + j * len + t0, block, n, D, acc + j * D);
  }
  T* out = (T*)a.out + (row * a.heads + (int64_t)g * G) * D;
  for (int i = 0; i < G * D; ++i) store_as(out + i, acc[i]);
}

template <class T>
void decode_attention(const AttnArgs& a, int64_t rows, int threads) {
  const int64_t tasks = rows * a.kv_heads;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (tasks > 1)
  for (int64_t i = 0; i < tasks; ++i) attention_task<T>(a, i / a.kv_heads, (int)(i % a.kv_heads));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// RMSNorm of the decoder's rows, as torch's fused F.rms_norm computes it: in fp32,
// y = (h * rsqrt(mean(h^2) + eps)) * w, rounded once to the dtype, where h = x, or with a residual
// delta h = x + delta rounded to the dtype (the residual add), also stored in `sum`. Squares are
// summed in 16 lanes, then the lanes in a fixed order: a row's result depends on that row only.
template <class T>
void rms_norm_rows(const T* x, const T* delta, T* sum, const T* w, T* y, int64_t rows, int64_t dim, int64_t ldx,
                   int64_t ldd, int64_t lds, int64_t ldy, float eps) {
  std::vector<float> h((size_t)dim), wf((size_t)dim);
  for (int64_t i = 0; i < dim; ++i) wf[i] = to_float(w[i]);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    if (delta != nullptr) {
      const T* dr = delta + r * ldd;
      T* sr = sum + r * lds;
      for (int64_t i = 0; i < dim; ++i) {
        store_as(sr + i, to_float(xr[i]) + to_float(dr[i]));
        h[i] = to_float(sr[i]);
      }
    } else {
      for (int64_t i = 0; i < dim; ++i) h[i] = to_float(xr[i]);
    }
    float lanes[16] = {};
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16)
      for (int l = 0; l < 16; ++l) lanes[l] += h[i + l] * h[i + l];
    for (; i < dim; ++i) lanes[i % 16] += h[i] * h[i];
    float total = 0.0f;
    for (int l = 0; l < 16; ++l) total += lanes[l];
    const float scale = 1.0f / std::sqrt(total / (float)dim + eps);
    T* yr = y + r * ldy;
    for (int64_t j = 0; j < dim; ++j) store_as(yr + j, h[j] * scale * wf[j]);
  }
}

// SwiGLU's product for rows of the fused gate/up output (gate: the first `inter` values of a row,
// up: the next `inter`): y = silu(g) * u with torch's roundings for F.silu(gate).mul_(up) — silu(g) =
// g / (1 + exp(-g)) in fp32 (as g * e / (1 + e), e = exp(g), for g < 0: the same value without
// overflow) rounded to the dtype, then the product rounded again.
inline float silu_of(float x) {
  const float e = exp_nonpositive(x < 0.0f ? x : -x);
  return (x < 0.0f ? x * e : x) / (1.0f + e);
}

#if QK_BF16
inline __m512 exp_nonpositive16(__m512 x) {  // exp_nonpositive, 16 lanes (2^n applied by scalef)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// the first multiple of 16 values of a row; returns how many (silu_mul_row does the rest)
int64_t silu_mul_row_bf16(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t inter) {
  int64_t i = 0;
  for (; i + 16 <= inter; i += 16) {
    const __m512 x = bf16_to_ps(_mm256_loadu_si256((const __m256i*)(g + i)));
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 e = exp_nonpositive16(_mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_setzero_ps(), x), x));
    const __m512 numerator = _mm512_mask_mul_ps(x, negative, x, e);
    const __m512 silu = bf16_to_ps(ps_to_bf16(_mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), e))));
    const __m512 product = _mm512_mul_ps(silu, bf16_to_ps(_mm256_loadu_si256((const __m256i*)(u + i))));
    _mm256_storeu_si256((__m256i*)(y + i), ps_to_bf16(product));
  }
  return i;
}
#endif

template <class T>
void silu_mul_row(const T* g, const T* u, T* y, int64_t inter) {
  int64_t i = 0;
#if QK_BF16
  if constexpr (std::is_same_v<T, uint16_t>) i = silu_mul_row_bf16(g, u, y, inter);
#endif
  for (; i < inter; ++i) {
    const float silu = silu_of(to_float(g[i]));  // NaN in, NaN out
    T rounded;
    store_as(&rounded, silu);
    store_as(y + i, to_float(rounded) * to_float(u[i]));
  }
}

template <class T>
void silu_mul_rows(const T* gate_up, T* y, int64_t rows, int64_t inter, int64_t ldg, int64_t ldy, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1 && rows * inter >= 32768)
  for (int64_t r = 0; r < rows; ++r) silu_mul_row(gate_up + r * ldg, gate_up + r * ldg + inter, y + r * ldy, inter);
}

extern "C" {

// 0: portable C++, 1: AVX-512, 2: AVX-512 with bf16 dot products for bf16 inputs
int qk_simd(void) { return QK_BF16 ? 2 : QK_AVX512; }

// 1 if qk_gemv can take bf16 x on AMX tiles here (the CPU has them and the kernel grants them)
int qk_amx(void) {
#if QK_AMX
  return amx_permitted();
#else
  return 0;
#endif
}

// y[M, N] (row stride ldy, fp32 or bf16) = x[M, K] @ dequant(w)[N, K]^T (+ bias); 0 on success.
// amx: bf16 x on AMX tiles where qk_amx() (formats with small codes; others ignore it)
int qk_gemv(int type, const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t N,
            int64_t row_bytes, const float* bias, void* y, int y_bf16, int64_t ldy, int threads, int amx) {
  const GemvArgs a{nullptr, M, K, nullptr, 0, nullptr, 0, w, N, row_bytes, bias, y, ldy, y_bf16};
  return dispatch<GemvFn>(type, x, x_bf16, ldx, a, threads, amx);
}

// out = dequant(w) as fp32 [N, K] (pieces == 0) or as bf16 [N, pieces * K] parts summing to it
int qk_dequant(int type, const uint8_t* w, int64_t N, int64_t K, int64_t row_bytes, void* out, int pieces,
               int threads) {
  return dispatch<DequantFn>(type, w, N, K, row_bytes, out, pieces, threads);
}

// RMSNorm of `rows` rows (see rms_norm_rows); delta (and sum) may be null; fp32 or bf16 throughout.
int qk_rms_norm(const void* x, const void* delta, void* sum, const void* w, void* y, int64_t rows, int64_t dim,
                int64_t ldx, int64_t ldd, int64_t lds, int64_t ldy, float eps, int bf16) {
  if (bf16)
    rms_norm_rows<uint16_t>((const uint16_t*)x, (const uint16_t*)delta, (uint16_t*)sum, (const uint16_t*)w,
                            (uint16_t*)y, rows, dim, ldx, ldd, lds, ldy, eps);
  else
    rms_norm_rows<float>((const float*)x, (const float*)delta, (float*)sum, (const float*)w, (float*)y, rows, dim,
                         ldx, ldd, lds, ldy, eps);
  return 0;
}

// y [rows, inter] = silu(gate) * up for gate_up [rows, 2 * inter] (see silu_mul_rows); fp32 or bf16.
int qk_silu_mul(const void* gate_up, void* y, int64_t rows, int64_t inter, int64_t ldg, int64_t ldy, int bf16,
                int threads) {
  if (bf16)
    silu_mul_rows<uint16_t>((const uint16_t*)gate_up, (uint16_t*)y, rows, inter, ldg, ldy, threads);
  else
    silu_mul_rows<float>((const float*)gate_up, (float*)y, rows, inter, ldg, ldy, threads);
  return 0;
}

// One decode step's attention for `rows` requests (fp32 or bf16 throughout): row r's new key and
// value (k, v: kv_heads x D each) are stored in its cache at positions[r], then its query heads
// (q: heads x D) attend over keys 0 .. positions[r]. Row r's cache for `layer`: kv_heads blocks of
// capacity x D elements, head_strides[r] apart, at key_ptrs[r] / value_ptrs[r] + layer *
// layer_strides[r] elements. out: [rows, heads, D].
int qk_decode_attention(int64_t rows, int heads, int kv_heads, int D, int bf16, const void* q, int64_t q_row,
                        const void* k, int64_t k_row, const void* v, int64_t v_row, int64_t layer,
                        const int64_t* key_ptrs, const int64_t* value_ptrs, const int64_t* layer_strides,
                        const int64_t* head_strides, const int64_t* positions, void* out, float scale, int threads) {
  if (heads % kv_heads) return 1;
  const AttnArgs a{heads,  kv_heads, D,          q,     k,        v,      q_row, k_row, v_row, layer,
                   key_ptrs, value_ptrs, layer_strides, head_strides, positions, out, scale};
  if (bf16)
    decode_attention<uint16_t>(a, rows, threads);
  else
    decode_attention<float>(a, rows, threads);
  return 0;
}
}
"""
