"""The block kernels on every row width they can meet, on every path this machine can run.

Issue: the float formats (F32 / F16 / BF16: GGML block size 1, so a row may hold any number of
values) once dropped the last K % 32 values of every row. These tests sweep K over every multiple of
the format's block size up to 2 × 256 + one block, plus the widths of the published Qwen2 / Qwen2-VL /
Qwen2.5-VL layers, with 1-16 x rows, fp32 and bf16 x, strided and unaligned x rows, against float64
products of gguf's dequantized weights (the bound of tests/test_quant_linear.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from isa_paths import ISAS, gemv, kernels_or_reason
from test_quant_linear import BLOCK_TYPES, EPS, assert_within, bits, random_blocks, reference, reference_weight

from qwenvl.ops import check_blocks
from qwenvl.quant.linear import AMX_TYPES

# in/out widths of the published layers: text hidden sizes and MLPs (0.5B … 7B), vision embed, MLPs
PUBLISHED_WIDTHS = (896, 1280, 1536, 2048, 3420, 3584, 4864, 5120, 8960, 11008, 18944)
OUT_ROWS = 7  # a 4-row tile, a 2-row tile and a single row
MOST_ROWS = 16


def kernel_paths() -> list:
    """(name, kernels, amx) for every ISA path — its vector GEMV, and the AMX library's tiles too —
    each skipped with the reason where this machine cannot run it."""
    paths = []
    for label, name, tiles in [*((name, name, False) for name in ISAS), ("amx-tiles", "amx", True)]:
        found = kernels_or_reason(name)
        skip = [pytest.mark.skip(reason=found)] if isinstance(found, str) else []
        paths.append(pytest.param((label, None if skip else found, tiles), id=label, marks=skip))
    return paths


PATHS = kernel_paths()


def widths(ggml_type: T) -> list[int]:
    block = GGML_QUANT_SIZES[ggml_type][0]
    sweep = range(block, 2 * 256 + max(block, 32) + 1, block)
    return [*sweep, *(k for k in PUBLISHED_WIDTHS if k % block == 0)]


def weights(ggml_type: T, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    raw = random_blocks(ggml_type, OUT_ROWS, k, seed=seed)
    return torch.from_numpy(raw), reference_weight(raw, ggml_type)


def check_products(lib, amx: bool, ggml_type: T, k: int, dtype: torch.dtype, seed: int) -> None:
    blocks, weight = weights(ggml_type, k, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(MOST_ROWS, k, generator=gen).to(dtype)
    ref, scale = reference(x, weight, None)
    got = gemv(lib, x, blocks, ggml_type, k, out=torch.empty(MOST_ROWS, OUT_ROWS), amx=amx)
    excess = ((got.double() - ref).abs() - EPS * scale).max().item()
    assert excess <= 0, f"{ggml_type.name} K={k} {dtype}: error exceeds the bound by {excess:.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_products_at_every_width(path, ggml_type: T) -> None:
    name, lib, amx = path
    if amx and ggml_type not in AMX_TYPES:
        pytest.skip(f"{ggml_type.name} does not run on AMX tiles")
    dtypes = (torch.bfloat16,) if amx else (torch.float32, torch.bfloat16)
    for i, k in enumerate(widths(ggml_type)):
        for dtype in dtypes:
            check_products(lib, amx, ggml_type, k, dtype, seed=i)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_rows_strided_and_alone(path, ggml_type: T) -> None:
    """At widths with a tail (and a published one): 1-16 rows each within the bound; every row of a
    16-row call bit for bit its 1-row result; x rows inside a wider buffer, at an odd offset and an odd
    stride, give the bits of the same rows contiguous."""
    name, lib, amx = path
    if amx and ggml_type not in AMX_TYPES:
        pytest.skip(f"{ggml_type.name} does not run on AMX tiles")
    block = GGML_QUANT_SIZES[ggml_type][0]
    ks = sorted({k for k in (block * 3, 2 * 256 + block, 200, 3420, 4864) if k % block == 0})
    dtypes = (torch.bfloat16,) if amx else (torch.float32, torch.bfloat16)
    for k in ks:
        blocks, weight = weights(ggml_type, k, seed=k)
        for dtype in dtypes:
            wide = torch.randn(MOST_ROWS, k + 9).to(dtype)
            x = wide[:, 1 : k + 1]  # odd start, row stride k + 9
            assert x.stride(0) == k + 9 and x.data_ptr() % 64 != 0

            def run(rows: torch.Tensor) -> torch.Tensor:
                out = torch.empty(rows.shape[0], OUT_ROWS)
                return gemv(lib, rows, blocks, ggml_type, k, out=out, amx=amx)

            together = run(x)
            assert torch.equal(bits(together), bits(run(x.contiguous()))), f"K={k}: strided rows differ"
            if not amx:  # the AMX path's 1-row results differ from its tiles' (tested in test_quant_linear)
                alone = torch.cat([run(x[i : i + 1]) for i in range(MOST_ROWS)])
                assert torch.equal(bits(together), bits(alone)), f"K={k} {dtype}: a row depends on the others"
            for rows in range(1, MOST_ROWS + 1):
                ref, scale = reference(x[:rows], weight, None)
                assert_within(run(x[:rows]), ref, EPS * scale)


@pytest.mark.parametrize("path", [p for p in PATHS if not p.values[0][2]])
@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_at_every_width(path, ggml_type: T) -> None:
    """fp32 rows bit for bit gguf's, and three bf16 pieces summing to them, at every width."""
    name, lib, _ = path
    for i, k in enumerate(widths(ggml_type)):
        blocks, weight = weights(ggml_type, k, seed=i)
        got = lib.dequantize(blocks, ggml_type, k).numpy()
        assert np.array_equal(got.view(np.uint32), weight.view(np.uint32)), f"{ggml_type.name} K={k}"
        parts = lib.dequantize(blocks, ggml_type, k, pieces=3).float().reshape(OUT_ROWS, 3, k)
        assert torch.equal(parts.sum(dim=1), torch.from_numpy(weight)), f"{ggml_type.name} K={k} pieces"


def test_block_formats_refuse_a_partial_block() -> None:
    blocks = torch.zeros(2, GGML_QUANT_SIZES[T.Q8_0][1] * 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_blocks(blocks, T.Q8_0, 2, 70)
