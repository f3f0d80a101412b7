"""The activation-quantizing GEMM and GEMV (``qk_gemm_q8``, ``qk_gemv_q8``, --kernel q8): every ISA
library this machine runs gives the scalar reference's bits for every format it takes, at 1-600 rows
and widths that are not a multiple of 256 where the format allows; the GEMV gives the GEMM's bits; a
row's result is the same alone or batched; the products stay close to the exact ones; the float
formats are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T
from isa_paths import kernels
from test_quant_linear import random_blocks, reference, reference_weight

from qwenvl.ops import isa
from qwenvl.ops.native import Q8_TYPES

Q8 = sorted(Q8_TYPES, key=int)
K_QUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
OUT_ROWS = 37  # not a multiple of the panel's 16 rows nor of the AVX2 tile's 2


def widths(ggml_type: T) -> list[int]:
    """K values: several 256-blocks for the K-quants; for the 32-value formats also widths whose
    groups do not fill the 8-group accumulation step."""
    return [256, 768] if ggml_type in K_QUANTS else [32, 224, 896]


def q8(lib, ggml_type: T, x: torch.Tensor, blocks: torch.Tensor, bias=None, out_dtype=None, gemv=False) -> torch.Tensor:
    out = torch.empty(x.shape[0], blocks.shape[0], dtype=out_dtype or x.dtype)
    (lib.gemv_q8 if gemv else lib.gemm_q8)(int(ggml_type), x, blocks, bias, out)
    return out


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32).numpy()


def other_isas() -> list[str]:
    return [name for name in isa.ISAS if name != "scalar"]


@pytest.mark.parametrize("name", other_isas())
@pytest.mark.parametrize("ggml_type", Q8, ids=lambda t: t.name)
def test_every_isa_gives_the_scalar_bits(name: str, ggml_type: T) -> None:
    lib, scalar = kernels(name), kernels("scalar")
    for k in widths(ggml_type):
        blocks = torch.from_numpy(random_blocks(ggml_type, OUT_ROWS, k, seed=k))
        bias = torch.randn(OUT_ROWS, generator=torch.Generator().manual_seed(k))
        for rows in (1, 5, 600) if k == widths(ggml_type)[0] else (3, 40):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
            x[0, :32] = 0  # an all-zero activation block (scale 0)
            for dtype, b in ((torch.float32, None), (torch.bfloat16, bias)):
                xs = x.to(dtype)
                np.testing.assert_array_equal(
                    bits(q8(lib, ggml_type, xs, blocks, b)), bits(q8(scalar, ggml_type, xs, blocks, b))
                )


@pytest.mark.parametrize("name", ["scalar", *other_isas()])
@pytest.mark.parametrize("ggml_type", Q8, ids=lambda t: t.name)
def test_the_gemv_gives_the_scalar_gemm_bits(name: str, ggml_type: T) -> None:
    """The decode GEMV (1-16 rows, read from the stored blocks) equals the scalar q8 GEMM bit for bit,
    fp32 and bf16 in and out, with and without bias, rows alone or batched, strided rows."""
    lib, scalar = kernels(name), kernels("scalar")
    for k in widths(ggml_type):
        blocks = torch.from_numpy(random_blocks(ggml_type, OUT_ROWS, k, seed=k + 1))
        bias = torch.randn(OUT_ROWS, generator=torch.Generator().manual_seed(k))
        x = torch.randn(16, k, generator=torch.Generator().manual_seed(k + 2)) * 3
        x[1, :32] = 0  # an all-zero activation block (scale 0)
        for dtype, b in ((torch.float32, None), (torch.bfloat16, bias)):
            xs = x.to(dtype)
            want = bits(q8(scalar, ggml_type, xs, blocks, b))
            for rows in (1, 3, 4, 7, 16):
                got = q8(lib, ggml_type, xs[:rows], blocks, b, gemv=True)
                np.testing.assert_array_equal(bits(got), want[:rows])
            np.testing.assert_array_equal(bits(q8(lib, ggml_type, xs[9:10], blocks, b, gemv=True)), want[9:10])
            strided = torch.zeros(16, k + 40, dtype=dtype)
            strided[:, :k] = xs
            np.testing.assert_array_equal(bits(q8(lib, ggml_type, strided[:, :k], blocks, b, gemv=True)), want)


@pytest.mark.parametrize("name", ["scalar", *other_isas()])
@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_a_row_is_the_same_alone_or_batched(name: str, ggml_type: T) -> None:
    lib = kernels(name)
    k = widths(ggml_type)[-1]
    blocks = torch.from_numpy(random_blocks(ggml_type, OUT_ROWS, k, seed=1))
    x = torch.randn(23, k, generator=torch.Generator().manual_seed(2))
    batched = q8(lib, ggml_type, x, blocks)
    for row in (0, 11, 22):
        np.testing.assert_array_equal(bits(q8(lib, ggml_type, x[row : row + 1], blocks)), bits(batched[row : row + 1]))
    strided = torch.zeros(23, k + 64)  # rows further apart than K
    strided[:, :k] = x
    np.testing.assert_array_equal(bits(q8(lib, ggml_type, strided[:, :k], blocks)), bits(batched))


@pytest.mark.parametrize("ggml_type", Q8, ids=lambda t: t.name)
def test_products_are_close_to_the_exact_ones(ggml_type: T) -> None:
    """int8 activations (per 32 values) cost under 1% of the sum of |products| on random data."""
    lib = kernels(isa.best())
    k = widths(ggml_type)[-1]
    raw = random_blocks(ggml_type, OUT_ROWS, k, seed=3)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(OUT_ROWS, generator=torch.Generator().manual_seed(5))
    got = q8(lib, ggml_type, x, torch.from_numpy(raw), bias).double()
    want, scale = reference(x, reference_weight(raw, ggml_type), bias)
    assert ((got - want).abs() <= 0.01 * scale).all()
    assert ((got - want).abs() > 0).any()  # it is not the exact path


@pytest.mark.parametrize("ggml_type", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_the_float_formats_are_refused(ggml_type: T) -> None:
    lib = kernels(isa.best())
    raw = random_blocks(ggml_type, 4, 64)
    assert not lib.lib.qk_q8_supports(int(ggml_type))
    for gemv in (False, True):
        with pytest.raises(ValueError, match="q8"):
            q8(lib, ggml_type, torch.randn(2, 64), torch.from_numpy(raw), gemv=gemv)


def test_the_q8_layer_quantizes_prompts_and_decode_rows() -> None:
    """kernel="q8": many rows through the q8 GEMM, decode rows through the q8 GEMV (the same bits as
    in a prompt); float formats stay exact."""
    from qwenvl.quant.linear import quant_linear_from_ggml

    raw = random_blocks(T.Q5_0, OUT_ROWS, 224, seed=6)
    exact = quant_linear_from_ggml(raw, T.Q5_0, (OUT_ROWS, 224), kernel="blocks")
    layer = quant_linear_from_ggml(raw, T.Q5_0, (OUT_ROWS, 224), kernel="q8")
    assert layer.q8 and layer.kernel == "q8" and not layer.exact and "(q8)" in layer.describe()
    x = torch.randn(40, 224, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(bits(layer(x)), bits(q8(kernels(isa.best()), T.Q5_0, x, layer.blocks)))
    lib = kernels(isa.best())
    np.testing.assert_array_equal(bits(layer(x[:3])), bits(q8(lib, T.Q5_0, x[:3], layer.blocks, gemv=True)))
    np.testing.assert_array_equal(bits(layer(x[:3])), bits(layer(x)[:3]))  # decode rows: a prompt's bits
    assert not torch.equal(layer(x[:3]), exact(x[:3]))
    floats = quant_linear_from_ggml(random_blocks(T.F16, 4, 64), T.F16, (4, 64), kernel="q8")
    assert not floats.q8 and floats.exact


def test_bench_refuses_an_unknown_kernel() -> None:
    from qwenvl.bench import BenchOptions
    from qwenvl.errors import QwenVLError

    with pytest.raises(QwenVLError, match="--kernel 'fast'"):
        BenchOptions(kernel="fast").validate()
    assert BenchOptions(kernel="q8").validate().kernel == "q8"
