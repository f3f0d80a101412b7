"""GGML block quantizers (qwenvl.quant.ggml): every type dequantizes, through llama.cpp's ``gguf``
package, to within its format's error bound; where ``gguf`` quantizes the type as well, the bytes are
identical; where llama.cpp itself is installed (llama-cpp-python), our K-quant bytes equal its
reference quantizer's (ggml_quantize_chunk without an importance matrix)."""

from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf_vl_fixtures import llama_cpp_available

from qwenvl.quant.ggml import K_QUANTIZERS, quantize

Q = GGMLQuantizationType
LEGACY = [Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_TYPES = list(K_QUANTIZERS)
# (sub-block, levels - 1, affine) of the K-quants: how many values share one 4/6/8-bit scale
FP16_FLOOR = 2.0**-24 * 128  # fp16 scales stop at 2^-24: values below ~this times a level are lost
K_GRIDS = {
    Q.Q2_K: (16, 3, True),
    Q.Q3_K: (16, 7, False),
    Q.Q4_K: (32, 15, True),
    Q.Q5_K: (32, 31, True),
    Q.Q6_K: (16, 63, False),
}


def sample_weights(rows: int = 48, cols: int = 1024, seed: int = 0) -> np.ndarray:
    """Gaussian, heavy-tailed and scale-varying rows, plus an all-zero, a constant and a tiny block."""
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((rows // 3, cols))
    heavy = rng.standard_t(3, (rows // 3, cols))
    scales = np.exp(rng.normal(0, 2, (rows // 3, cols // 16, 1))).repeat(16, axis=-1).reshape(rows // 3, cols)
    x = np.concatenate([gauss, heavy, rng.standard_normal((rows // 3, cols)) * scales]).astype(np.float32) * 0.05
    x[0, :256] = 0
    x[1, :256] = 0.75
    x[2, :256] *= 1e-6
    return x


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return gguf.quants.dequantize(data, qtype)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_legacy_types_are_gguf_bytes(qtype):
    x = sample_weights()
    ours = quantize(x, qtype)  # rows regrouped for speed: blocks must come out the same
    assert np.array_equal(ours, gguf.quants.quantize(x, qtype))
    odd = x[:5, :96]  # a size that does not regroup
    assert np.array_equal(quantize(odd, qtype), gguf.quants.quantize(odd, qtype))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_legacy_types_error_bound(qtype):
    x = sample_weights()
    error = np.abs(_dequantize(quantize(x, qtype), qtype) - x)
    if qtype == Q.BF16:
        assert (error <= np.abs(x) * 2.0**-8).all()  # 8 significant bits, round to nearest
        return
    block = GGML_QUANT_SIZES[qtype][0]
    blocks, error = x.reshape(-1, block), error.reshape(-1, block)
    amax, low, high = np.abs(blocks).max(1), blocks.min(1), blocks.max(1)
    step, fraction = {
        Q.Q8_0: (amax / 127, 0.5),
        Q.Q4_0: (amax / 8, 1.0),  # levels -8..7 around the signed max: the far side can lose a step
        Q.Q5_0: (amax / 16, 1.0),
        Q.Q4_1: ((high - low) / 15, 0.5),
        Q.Q5_1: ((high - low) / 31, 0.5),
    }[qtype]
    bound = step * fraction * (1 + 2.0**-9) + np.abs(blocks).max(1) * 2.0**-10  # fp16 scale and min
    assert (error.max(1) <= bound + FP16_FLOOR).all()


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_k_quant_error_bound(qtype):
    """No element is further off than one step of a single grid spanning its whole super-block:
    every K-quant block could code its 256 values on that grid, and its per-sub-block scales do better."""
    x = sample_weights()
    data = quantize(x, qtype)
    assert data.dtype == np.uint8 and data.shape == (x.shape[0], x.shape[1] // 256 * GGML_QUANT_SIZES[qtype][1])
    error = np.abs(_dequantize(data, qtype) - x).reshape(-1, 256)
    blocks = x.reshape(-1, 256)
    _, levels, affine = K_GRIDS[qtype]
    if affine:
        span = np.maximum(blocks.max(1), 0) - np.minimum(blocks.min(1), 0)
    else:
        span = 2 * np.abs(blocks).max(1)
    assert (error.max(1) <= span / levels + FP16_FLOOR).all()
    zero, constant, tiny = (x.shape[1] // 256) * np.arange(3)  # the first block of rows 0, 1, 2
    assert error[zero].max() == 0
    assert error[constant].max() <= 0.75 * 2.0**-9  # fp16 scale rounding only
    assert error[tiny].max() <= np.abs(blocks[tiny]).max()


def test_k_quant_precision_follows_bits():
    x = sample_weights()
    types = K_TYPES + [Q.Q4_0, Q.Q5_0, Q.Q8_0]
    rmse = {q: float(np.sqrt(((_dequantize(quantize(x, q), q) - x) ** 2).mean())) for q in types}
    assert rmse[Q.Q2_K] > rmse[Q.Q3_K] > rmse[Q.Q4_K] > rmse[Q.Q5_K] > rmse[Q.Q6_K] > rmse[Q.Q8_0]
    # each K-quant beats the legacy type of its width (same bits per weight or more for the legacy one)
    assert rmse[Q.Q4_K] < rmse[Q.Q4_0] and rmse[Q.Q5_K] < rmse[Q.Q5_0]


def test_rows_must_split_into_blocks():
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        quantize(np.zeros((2, 128), dtype=np.float32), Q.Q4_K)
    with pytest.raises(NotImplementedError):
        quantize(np.zeros((2, 256), dtype=np.float32), Q.IQ2_XXS)  # a type neither gguf nor qwenvl writes


# ----------------------------------------------------------------------------------------------
# Against llama.cpp's own quantizer


def _ggml_quantize():
    import llama_cpp

    library = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    function = library.ggml_quantize_chunk
    function.restype = ctypes.c_size_t
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]

    def run(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        block, size = GGML_QUANT_SIZES[qtype]
        out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
        function(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return run


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("qtype", K_TYPES + LEGACY, ids=lambda q: q.name)
def test_bytes_equal_llama_cpp_reference(qtype):
    x = sample_weights(seed=1)
    assert np.array_equal(quantize(x, qtype), _ggml_quantize()(x, qtype))


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.IQ4_XS, Q.IQ2_XXS, Q.IQ3_S, Q.IQ1_S], ids=lambda q: q.name)
def test_iq_tensors_are_read_through_gguf(tmp_path, qtype):
    """Types qwenvl cannot write but reads: the stored blocks reach gguf's dequantizer intact."""
    from qwenvl.weights.gguf import open_gguf_file

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (8, 512 // block, size), dtype=np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # a sane fp16 scale d
    raw = blocks.reshape(8, -1)
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_gguf_file(path) as file:
        tensor = file.tensor("blk.0.ffn_up.weight")
    assert tensor.shape == (8, 512)
    assert np.array_equal(tensor.numpy(), gguf.quants.dequantize(raw, qtype))
