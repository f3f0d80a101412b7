"""QuantLinear and the block kernels against gguf's own dequantization, computed live.

Weights: random matrices quantized with ``gguf.quants.quantize`` where gguf can quantize the type;
for the K-quants (which gguf only dequantizes) random bytes with sane fp16 scales — every byte
pattern is a valid block. The reference is float64 ``x @ dequantize(raw).T (+ bias)``.

Tolerances, per output element, with ``scale = |x| @ |W|.T + |bias|`` (the size of the summed terms):
- exact kernels, fp32 in and out: ``1e-6 · scale`` — fp32 accumulation over K = 512 terms is about
  √K·2⁻²⁴ ≈ 1e-7 (measured ≤ 7e-8 even at K = 4864, including the bf16 dot products' offset);
  a single wrong weight code is far above it.
- exact kernels, bf16 in and out: the reference uses the same bf16 input, so the only extra error is
  rounding the output (and, on the GEMM path, the bias) to bf16: ``2⁻⁸·(|y| + |bias|) + 1e-6 · scale``.
- re-quantized kernels: their stated weight error bound (see each test) times |x|, plus the bf16 terms.
Every kernel also has cosine ≥ 0.999 against the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from isa_paths import gemv, kernels_or_reason

from qwenvl import ops
from qwenvl.quant import linear
from qwenvl.quant.linear import (
    BlockQuantLinear,
    ConcatLinear,
    QuantEmbedding,
    quant_linear_from_ggml,
    quant_linear_from_parts,
)

BLOCK_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
K_QUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
# where each K-quant keeps its fp16 d (and dmin), the rest of a block being codes and small scales
K_QUANT_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108, None), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208, None)}
ROWS, COLS = 40, 512  # 512: two K-quant blocks (43 rows, with tile tails: the row-invariance test)
FEW, MANY = (1, 3, 6), 23  # row counts for the fused GEMV and the dequantize + GEMM paths
EPS = 1e-6

needs_kernels = pytest.mark.skipif(ops.kernels() is None, reason="the block kernels could not be built here")


def random_blocks(ggml_type: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, bytes per row] holding a random matrix of the type."""
    rng = np.random.default_rng(seed)
    if ggml_type not in K_QUANTS:
        weights = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        return gguf_quants.quantize(weights, ggml_type).view(np.uint8).reshape(rows, -1)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)

    def halves(low: float, high: float) -> np.ndarray:
        values = rng.uniform(low, high, raw.shape[:2]).astype(np.float16)
        return values.view(np.uint8).reshape(*raw.shape[:2], 2)

    d, dmin = K_QUANT_SCALES[ggml_type]
    raw[..., d : d + 2] = halves(1e-4, 1e-3)
    if dmin is not None:
        raw[..., dmin : dmin + 2] = halves(0, 1e-3)
    return raw.reshape(rows, -1)


def reference_weight(raw: np.ndarray, ggml_type: T) -> np.ndarray:
    return gguf_quants.dequantize(raw, ggml_type).reshape(raw.shape[0], -1).astype(np.float32)


def reference(x: torch.Tensor, weight: np.ndarray, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ W.T + b, |x| @ |W|.T + |b|) in float64, from x as given (bf16 x is used as it is)."""
    w = torch.from_numpy(weight).double()
    x = x.double()
    y, scale = x @ w.T, x.abs() @ w.abs().T
    if bias is not None:
        y, scale = y + bias.double(), scale + bias.double().abs()
    return y, scale


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    excess = ((y.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"
    assert cosine(y, ref) >= 0.999


# ----------------------------------------------------------------------------------------------
# The kernels' weights are gguf's weights


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact_and_pieces_sum_to_it(native_isa, ggml_type: T) -> None:
    raw = random_blocks(ggml_type, ROWS, COLS)
    expected = reference_weight(raw, ggml_type)
    blocks = torch.from_numpy(raw)
    got = native_isa.dequantize(blocks, ggml_type, COLS).numpy()
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    pieces = linear.EXACT_PIECES.get(ggml_type, 3)
    parts = native_isa.dequantize(blocks, ggml_type, COLS, pieces=pieces).float().reshape(ROWS, pieces, COLS)
    assert torch.equal(parts.sum(dim=1), torch.from_numpy(expected))  # the exact prefill path's claim
    if pieces > 1 and ggml_type not in (T.Q4_1, T.Q5_1):  # one piece fewer would round
        # (Q4_1/Q5_1: d·q + m often fits 16 bits, but not always — e.g. a large min with a small d)
        fewer = native_isa.dequantize(blocks, ggml_type, COLS, pieces=pieces - 1)
        assert not torch.equal(fewer.float().reshape(ROWS, pieces - 1, COLS).sum(dim=1), torch.from_numpy(expected))


def test_every_path_names_its_isa(native_isa) -> None:
    """The library of each path is the one asked for, and the process's choice follows QWENVL_ISA."""
    assert ops.kernels().path == native_isa.path and ops.path() == native_isa.isa
    assert all(native_isa.lib.qk_supports(t) for t in BLOCK_TYPES) and not native_isa.lib.qk_supports(T.IQ4_NL)


# ----------------------------------------------------------------------------------------------
# Exact layers


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_linear_is_exact(native_isa, ggml_type: T) -> None:
    raw = random_blocks(ggml_type, ROWS, COLS)
    weight = reference_weight(raw, ggml_type)
    bias = torch.randn(ROWS) * 0.1
    layer = quant_linear_from_ggml(raw, ggml_type, (ROWS, COLS), bias=bias, kernel="blocks")
    assert isinstance(layer, BlockQuantLinear) and layer.exact and "exact" in layer.describe()
    for rows in (*FEW, MANY):
        x = torch.randn(rows, COLS)
        ref, scale = reference(x, weight, bias)
        assert_within(layer(x), ref, EPS * scale)

        xb = x.bfloat16()
        ref, scale = reference(xb, weight, bias)
        y = layer(xb)
        assert y.dtype == torch.bfloat16
        assert_within(y, ref, 2**-8 * (ref.abs() + bias.abs()) + EPS * scale)


def bits(y: torch.Tensor) -> torch.Tensor:
    return y.view(torch.int16 if y.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_decode_rows_do_not_depend_on_each_other(native_isa, ggml_type: T, dtype: torch.dtype) -> None:
    """A batched step's rows must not depend on each other: row i of an M-row call is bit for bit
    x[i]'s 1-row result on the same path, for every M the fused GEMV takes (AVX-512 below
    ``amx_min_rows`` bf16 rows, AMX tiles from there on where the CPU has them)."""
    out_rows = 43  # tails after the 4- and 2-row tiles (and the 16-row AMX tiles)
    raw = random_blocks(ggml_type, out_rows, COLS, seed=5)
    layer = quant_linear_from_ggml(raw, ggml_type, (out_rows, COLS), bias=torch.randn(out_rows), kernel="blocks")
    most = layer.gemv_max_rows
    x = (torch.randn(most, COLS) * torch.logspace(-2, 2, most)[:, None]).to(dtype)

    def fp32_out(x: torch.Tensor, amx: bool) -> torch.Tensor:  # the kernel's sums before any bf16 rounding
        return gemv(native_isa, x, layer.blocks, ggml_type, COLS, out=torch.empty(x.shape[0], out_rows), amx=amx)

    def layer_out(x: torch.Tensor, amx: bool) -> torch.Tensor:
        out = torch.empty(x.shape[0], out_rows, dtype=x.dtype)
        return gemv(native_isa, x, layer.blocks, ggml_type, COLS, bias=layer.bias, out=out, amx=amx)

    for run in (layer_out, fp32_out):
        alone = {amx: torch.cat([bits(run(x[i : i + 1], amx)) for i in range(most)]) for amx in (False, True)}
        for rows in range(1, most + 1):
            amx = dtype == torch.bfloat16 and rows >= layer.amx_min_rows
            together = bits(run(x[:rows], amx))
            differ = (together != alone[amx][:rows]).any(dim=1).nonzero().flatten().tolist()
            assert not differ, f"{rows} rows (amx={amx}): rows {differ} differ from their 1-row results"
            if run is layer_out:  # the layer takes the same path as this call
                assert torch.equal(bits(layer(x[:rows])), together)


AMX_TYPES = sorted(linear.AMX_TYPES, key=int)
AMX = kernels_or_reason("amx")
needs_amx = pytest.mark.skipif(isinstance(AMX, str), reason=AMX if isinstance(AMX, str) else "")


@needs_amx
@pytest.mark.parametrize("ggml_type", AMX_TYPES, ids=lambda t: t.name)
def test_amx_path_is_exact(ggml_type: T) -> None:
    """bf16 x on AMX tiles: the same exact weights and the same fp32 bound as the AVX-512 path, for
    1-16 rows and a row count past 16 (two tile passes)."""
    torch.manual_seed(7)
    raw = random_blocks(ggml_type, ROWS + 3, COLS, seed=7)  # rows past a 16-row tile
    weight = reference_weight(raw, ggml_type)
    blocks, bias = torch.from_numpy(raw), torch.randn(ROWS + 3) * 0.1
    for rows in (1, 5, 16, 19):
        x = torch.randn(rows, COLS).bfloat16()
        ref, scale = reference(x, weight, bias)
        out = torch.empty(rows, ROWS + 3)
        got = gemv(AMX, x, blocks, ggml_type, COLS, bias=bias, out=out, amx=True)
        assert_within(got, ref, EPS * scale)
        vector = gemv(AMX, x, blocks, ggml_type, COLS, bias=bias, out=torch.empty_like(out))
        assert not torch.equal(got, vector) or rows == 1  # really another path (sums in another order)


@needs_amx
@pytest.mark.parametrize("ggml_type", [T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_amx_takes_strided_and_unaligned_rows(ggml_type: T) -> None:
    """x rows inside a wider buffer (an even stride, an odd one, a start two bytes off alignment) give
    the bits of the same rows contiguous: the tiles' x layout (and the sums that formats with a
    minimum or Q6_K take from it) does not depend on where the rows lie."""
    raw = random_blocks(ggml_type, ROWS, COLS, seed=11)
    blocks = torch.from_numpy(raw)
    assert COLS % 2 == 0
    for rows in (5, 16):
        for extra, start in ((4, 0), (4, 1), (3, 0)):  # even stride; start off alignment; odd stride
            x = torch.randn(rows, COLS + extra).bfloat16()[:, start : start + COLS]
            strided = gemv(AMX, x, blocks, ggml_type, COLS, out=torch.empty(rows, ROWS), amx=True)
            packed = gemv(AMX, x.contiguous(), blocks, ggml_type, COLS, out=torch.empty(rows, ROWS), amx=True)
            assert torch.equal(strided, packed), (rows, extra, start)


@needs_amx
def test_amx_can_be_turned_off(monkeypatch) -> None:
    raw = random_blocks(T.Q5_0, ROWS, COLS)
    monkeypatch.setenv("QWENVL_ISA", "amx")
    ops.kernels.cache_clear()
    try:
        layer = quant_linear_from_ggml(raw, T.Q5_0, (ROWS, COLS), kernel="blocks")
        assert layer.amx_min_rows <= layer.gemv_max_rows and "AMX" in layer.describe()
        monkeypatch.setenv("QWENVL_AMX", "0")
        layer = quant_linear_from_ggml(raw, T.Q5_0, (ROWS, COLS), kernel="blocks")
        assert layer.amx_min_rows > layer.gemv_max_rows and "AMX" not in layer.describe()
        monkeypatch.delenv("QWENVL_ISA")
        ops.kernels.cache_clear()
        assert ops.path() == "avx512"  # auto stops below AMX
    finally:
        ops.kernels.cache_clear()


@needs_kernels
@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_default_kernel_of_the_registry_formats_is_exact(ggml_type: T) -> None:
    raw = random_blocks(ggml_type, ROWS, COLS)
    layer = quant_linear_from_ggml(raw, ggml_type, (ROWS, COLS))
    assert layer.kernel == linear.DEFAULT_KERNELS[ggml_type] and layer.exact
    x = torch.randn(2, 5, COLS)  # [..., in] inputs keep their leading dims
    ref, scale = reference(x.reshape(-1, COLS), reference_weight(raw, ggml_type), None)
    y = layer(x)
    assert y.shape == (2, 5, ROWS)
    assert_within(y.reshape(-1, ROWS), ref, EPS * scale)


@needs_kernels
def test_other_input_dtypes_compute_in_fp32() -> None:
    raw = random_blocks(T.Q5_0, ROWS, COLS)
    layer = quant_linear_from_ggml(raw, T.Q5_0, (ROWS, COLS))
    x = torch.randn(3, COLS).half()
    y = layer(x)
    assert y.dtype == torch.float16
    assert torch.equal(y, layer(x.float()).half())


@needs_kernels
def test_prefill_in_chunks_matches_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = random_blocks(T.Q8_0, ROWS, COLS)
    layer = quant_linear_from_ggml(raw, T.Q8_0, (ROWS, COLS), bias=torch.randn(ROWS), kernel="blocks")
    x = torch.randn(MANY, COLS).bfloat16()
    whole = layer(x)
    monkeypatch.setattr(linear, "PREFILL_CHUNK_BYTES", 7 * COLS * 2 * layer.pieces)  # 7 rows per chunk
    assert torch.equal(layer(x), whole)
    linear._buffers.__dict__.clear()  # a fresh buffer
    assert torch.equal(layer(x), whole)


@needs_kernels
def test_fewer_pieces_is_reported_as_rounding() -> None:
    raw = random_blocks(T.Q8_0, ROWS, COLS)
    layer = BlockQuantLinear(torch.from_numpy(raw), T.Q8_0, (ROWS, COLS), pieces=1)
    assert not layer.exact and "re-quantized" in layer.describe()
    x = torch.randn(MANY, COLS).bfloat16()
    ref, scale = reference(x, reference_weight(raw, T.Q8_0), None)
    # each weight rounded to bf16 (2^-9 relative), the output too
    assert_within(layer(x), ref, 2**-9 * scale + 2**-8 * ref.abs() + EPS * scale)


@needs_kernels
@pytest.mark.skipif(not linear._onednn_linear_available(), reason="this torch has no oneDNN packed linear")
@pytest.mark.parametrize("ggml_type", [T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_packed_prefill_weights_give_the_same_bits(ggml_type: T) -> None:
    """pack_prefill keeps the one-piece prefill weights dequantized in oneDNN's layout: the same
    weights, the same sums — a prefill's output does not change, only its speed."""
    raw = random_blocks(ggml_type, ROWS, COLS)
    layer = BlockQuantLinear(torch.from_numpy(raw), ggml_type, (ROWS, COLS), bias=torch.randn(ROWS), pieces=1)
    inputs = [torch.randn(rows, COLS).bfloat16() for rows in (17, MANY, 300)]
    decode_x = torch.randn(4, COLS).bfloat16()
    before = [layer(x) for x in inputs] + [layer(decode_x), layer(inputs[1].float())]
    assert layer.packed_bytes == 0
    assert layer.pack_prefill() == ROWS * COLS * 2 == layer.packed_bytes
    after = [layer(x) for x in inputs] + [layer(decode_x), layer(inputs[1].float())]
    for old, new in zip(before, after):
        assert torch.equal(old, new)
    strided = torch.randn(MANY, 2 * COLS).bfloat16()[:, ::2]  # rows need not be contiguous
    assert torch.equal(layer(strided), layer(strided.contiguous()))


@needs_kernels
def test_exact_prefill_is_never_packed() -> None:
    raw = random_blocks(T.Q8_0, ROWS, COLS)
    layer = BlockQuantLinear(torch.from_numpy(raw), T.Q8_0, (ROWS, COLS))  # exact: 3 pieces
    assert layer.pack_prefill() == 0 and layer.packed_bytes == 0


# ----------------------------------------------------------------------------------------------
# Re-quantized layers, each within its stated bound


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q5_0, T.F16, T.BF16], ids=lambda t: t.name)
def test_dense_bf16_rounds_each_weight_once(ggml_type: T) -> None:
    raw = random_blocks(ggml_type, ROWS, COLS)
    layer = quant_linear_from_ggml(raw, ggml_type, (ROWS, COLS), kernel="dense")
    assert layer.exact == (ggml_type == T.BF16)
    for rows in (1, MANY):
        x = torch.randn(rows, COLS).bfloat16()
        ref, scale = reference(x, reference_weight(raw, ggml_type), None)
        assert_within(layer(x), ref, 2**-9 * scale + 2**-8 * ref.abs() + EPS * scale)


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q5_0, T.Q6_K], ids=lambda t: t.name)
def test_int8_requantization_bound(ggml_type: T) -> None:
    """Per-row int8: each weight moves by at most half its row's step (max|w|/127, bf16-rounded)."""
    raw = random_blocks(ggml_type, ROWS, COLS)
    weight = reference_weight(raw, ggml_type)
    layer = quant_linear_from_ggml(raw, ggml_type, (ROWS, COLS), kernel="int8")
    assert not layer.exact
    step = layer.scales.float().double() * (1 + 2**-8)
    for rows in (1, MANY):
        x = torch.randn(rows, COLS).bfloat16()
        ref, scale = reference(x, weight, None)
        # the kernel rounds to bf16 twice (the dot product, then times the scale)
        bound = x.double().abs().sum(1, keepdim=True) * step / 2 + 2**-8 * ref.abs() + EPS * scale
        assert_within(layer(x), ref, bound)


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_int4_keeps_codes_and_rounds_scales(ggml_type: T) -> None:
    """Groups of 32: w = (code - 8)·scale + zero with scale, zero rounded to bf16 (2^-9 relative);
    the kernel itself rounds weights (or partial sums) to bf16 once more, and the output."""
    rows = 48  # the int4 kernel wants a multiple of 16 rows
    raw = random_blocks(ggml_type, rows, COLS)
    weight = reference_weight(raw, ggml_type)
    layer = quant_linear_from_ggml(raw, ggml_type, (rows, COLS), kernel="int4")
    codes, scales, zeros = linear.nibble_codes(torch.from_numpy(raw), ggml_type, (rows, COLS))
    rebuilt = (codes.double() - 8) * scales.double().repeat_interleave(32, 1) + zeros.double().repeat_interleave(32, 1)
    assert torch.allclose(rebuilt, torch.from_numpy(weight).double(), rtol=0, atol=1e-7)  # codes are exact
    per_weight = 2**-9 * (8 * scales.abs() + zeros.abs()).double().repeat_interleave(32, 1)
    for n in (1, MANY):
        x = torch.randn(n, COLS).bfloat16()
        ref, scale = reference(x, weight, None)
        bound = x.double().abs() @ per_weight.T + 2**-9 * scale + 2**-8 * ref.abs()
        assert_within(layer(x), ref, bound)


# ----------------------------------------------------------------------------------------------
# Building from GGUF tensors


@needs_kernels
def test_parts_of_one_format_share_a_layer_and_mixed_formats_concatenate() -> None:
    q, k = random_blocks(T.Q5_0, 32, COLS, seed=2), random_blocks(T.Q5_0, 8, COLS, seed=3)
    v = random_blocks(T.Q8_0, 8, COLS, seed=4)
    bias = torch.randn(48)
    weight = np.concatenate([reference_weight(q, T.Q5_0), reference_weight(k, T.Q5_0), reference_weight(v, T.Q8_0)])
    fused = quant_linear_from_parts([(q, T.Q5_0, (32, COLS)), (k, T.Q5_0, (8, COLS)), (v, T.Q8_0, (8, COLS))], bias)
    assert isinstance(fused, ConcatLinear) and [p.out_features for p in fused.parts] == [40, 8]
    assert fused.exact
    for rows in (1, MANY):
        x = torch.randn(rows, COLS)
        ref, scale = reference(x, weight, bias)
        assert_within(fused(x), ref, EPS * scale)
    same = quant_linear_from_parts([(q, T.Q5_0, (32, COLS)), (k, T.Q5_0, (8, COLS))])
    assert isinstance(same, BlockQuantLinear) and same.out_features == 40


@needs_kernels
def test_quant_embedding_rows_are_gguf_rows() -> None:
    raw = random_blocks(T.Q5_0, ROWS, COLS)
    table = QuantEmbedding(torch.from_numpy(raw), T.Q5_0, (ROWS, COLS), torch.float32)
    ids = torch.tensor([[3, 0, 39], [3, 7, 7]])
    expected = torch.from_numpy(reference_weight(raw, T.Q5_0))[ids]
    assert torch.equal(table(ids), expected)


@needs_kernels
def test_bad_inputs_are_refused() -> None:
    raw = random_blocks(T.Q8_0, ROWS, COLS)
    with pytest.raises(ValueError, match="bytes do not hold"):
        quant_linear_from_ggml(raw, T.Q8_0, (ROWS + 1, COLS))
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_linear_from_ggml(raw, T.Q8_0, (ROWS, 100))
    with pytest.raises(ValueError, match="unknown kernel"):
        quant_linear_from_ggml(raw, T.Q8_0, (ROWS, COLS), kernel="fast")
    with pytest.raises(ValueError, match="int4 kernel takes"):
        quant_linear_from_ggml(random_blocks(T.Q8_0, 48, COLS), T.Q8_0, (48, COLS), kernel="int4")


def test_auto_falls_back_to_dense_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENVL_KERNELS", "0")
    ops.kernels.cache_clear()
    try:
        raw = random_blocks(T.Q5_0, ROWS, COLS)
        with pytest.warns(UserWarning, match="fall back to dense"):
            layer = quant_linear_from_ggml(raw, T.Q5_0, (ROWS, COLS))
        assert layer.kernel == "dense" and not layer.exact
    finally:
        ops.kernels.cache_clear()
