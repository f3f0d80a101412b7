"""The native libraries' C ABI, declared once: ctypes mirrors of ``qwenvl/csrc/qk_abi.h``.

Every struct here is the header's, field for field and in its order (tests/test_native_driver.py
compiles the header and checks the offsets). ``declare`` gives a loaded library its signatures.
"""

from __future__ import annotations

import ctypes

ABI_VERSION = 3  # QK_ABI_VERSION
OK, UNSUPPORTED_TYPE, BAD_SHAPE = 0, 1, 2

_ptr, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class QkGemv(ctypes.Structure):
    _fields_ = [
        ("x", _ptr),
        ("w", _ptr),
        ("bias", _ptr),
        ("y", _ptr),
        ("M", _i64),
        ("K", _i64),
        ("ldx", _i64),
        ("N", _i64),
        ("row_bytes", _i64),
        ("ldy", _i64),
        ("type", _i32),
        ("x_bf16", _i32),
        ("y_bf16", _i32),
        ("threads", _i32),
        ("amx", _i32),
    ]


class QkDequant(ctypes.Structure):
    _fields_ = [
        ("w", _ptr),
        ("out", _ptr),
        ("N", _i64),
        ("K", _i64),
        ("row_bytes", _i64),
        ("type", _i32),
        ("pieces", _i32),
        ("threads", _i32),
    ]


class QkDecodeAttention(ctypes.Structure):
    _fields_ = [
        ("q", _ptr),
        ("k", _ptr),
        ("v", _ptr),
        ("out", _ptr),
        ("key_ptrs", _ptr),
        ("value_ptrs", _ptr),
        ("layer_strides", _ptr),
        ("head_strides", _ptr),
        ("positions", _ptr),
        ("rows", _i64),
        ("q_row", _i64),
        ("k_row", _i64),
        ("v_row", _i64),
        ("layer", _i64),
        ("heads", _i32),
        ("kv_heads", _i32),
        ("D", _i32),
        ("bf16", _i32),
        ("scale", _f32),
        ("threads", _i32),
        ("block_tables", _ptr),
        ("block_strides", _ptr),
        ("block_size", _i64),
    ]


class QkRmsNorm(ctypes.Structure):
    _fields_ = [
        ("x", _ptr),
        ("delta", _ptr),
        ("sum", _ptr),
        ("w", _ptr),
        ("y", _ptr),
        ("rows", _i64),
        ("dim", _i64),
        ("ldx", _i64),
        ("ldd", _i64),
        ("lds", _i64),
        ("ldy", _i64),
        ("eps", _f32),
        ("bf16", _i32),
    ]


class QkSiluMul(ctypes.Structure):
    _fields_ = [
        ("gate_up", _ptr),
        ("y", _ptr),
        ("rows", _i64),
        ("inter", _i64),
        ("ldg", _i64),
        ("ldy", _i64),
        ("bf16", _i32),
        ("threads", _i32),
    ]


class QkLinearPart(ctypes.Structure):
    _fields_ = [
        ("w", _ptr),
        ("bias", _ptr),
        ("N", _i64),
        ("K", _i64),
        ("row_bytes", _i64),
        ("type", _i32),
        ("amx_min_rows", _i32),
        ("q8", _i32),
    ]


class QkLinear(ctypes.Structure):
    _fields_ = [
        ("parts", QkLinearPart * 3),
        ("count", _i32),
    ]


class QkDecoderLayer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("qkv", QkLinear),
        ("o", QkLinear),
        ("gate_up", QkLinear),
        ("down", QkLinear),
    ]


class QkDecodeStep(ctypes.Structure):
    _fields_ = [
        ("x", _ptr),
        ("cos", _ptr),
        ("sin", _ptr),
        ("layers", _ptr),
        ("attention", _ptr),
        ("rows", _i64),
        ("hidden", _i64),
        ("layer_count", _i64),
        ("eps", _f32),
        ("bf16", _i32),
        ("threads", _i32),
        ("rope_fma", _i32),
    ]


STRUCTS = (
    QkGemv,
    QkDequant,
    QkDecodeAttention,
    QkRmsNorm,
    QkSiluMul,
    QkLinearPart,
    QkLinear,
    QkDecoderLayer,
    QkDecodeStep,
)
CALLS = {  # function: its struct
    "qk_gemv": QkGemv,
    "qk_dequant": QkDequant,
    "qk_decode_attention": QkDecodeAttention,
    "qk_rms_norm": QkRmsNorm,
    "qk_silu_mul": QkSiluMul,
    "qk_gemm_q8": QkGemv,
    "qk_gemv_q8": QkGemv,
    "qk_decode_step": QkDecodeStep,
}


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give a loaded library its signatures; RuntimeError if it was built for another ABI."""
    lib.qk_abi_version.argtypes, lib.qk_abi_version.restype = [], ctypes.c_int
    if lib.qk_abi_version() != ABI_VERSION:
        raise RuntimeError(f"the library speaks ABI {lib.qk_abi_version()}, this qwenvl {ABI_VERSION}")
    for name in ("qk_isa", "qk_extensions"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [], ctypes.c_char_p
    lib.qk_amx.argtypes, lib.qk_amx.restype = [], ctypes.c_int
    lib.qk_supports.argtypes, lib.qk_supports.restype = [_i32], ctypes.c_int
    lib.qk_q8_supports.argtypes, lib.qk_q8_supports.restype = [_i32], ctypes.c_int
    for name, struct in CALLS.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = [ctypes.POINTER(struct)], ctypes.c_int
    return lib
