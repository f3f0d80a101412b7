"""The native ISA paths the kernel tests run: every ISA of ``qwenvl.ops.isa.ISAS``, each skipped with
its reason where this machine cannot run it (an ISA it runs is built once and cached)."""

from __future__ import annotations

import functools

import pytest
import torch

from qwenvl.ops import check_blocks, isa, native


@functools.cache
def kernels_or_reason(name: str) -> native.Kernels | str:
    """The loaded kernels of ``name``, or why this machine cannot run them."""
    try:
        isa.check(name)
    except isa.IsaError as error:
        return str(error)
    try:
        return native.load(name)
    except RuntimeError as error:
        return f"the {name} kernels could not be built here: {str(error).splitlines()[-1]}"


def kernels(name: str) -> native.Kernels:
    """The kernels of ``name``, or skip the test (with the reason)."""
    found = kernels_or_reason(name)
    if isinstance(found, str):
        pytest.skip(found)
    return found


# every ISA, as a pytest parameter (the id is its name)
ISAS = list(isa.ISAS)


# ----------------------------------------------------------------------------------------------
# The native calls as the tests make them: new output tensors, the layouts the calls require


def gemv(kernels, x, blocks, ggml_type, k, bias=None, out=None, amx=False):
    """``x @ W.T (+ bias)`` through ``kernels.gemv`` (x [M, k] with contiguous rows; ``out`` fp32/bf16
    [M, N] with contiguous rows, new in x's dtype if not given)."""
    check_blocks(blocks, ggml_type, blocks.shape[0], k)
    assert x.shape[1] == k and x.stride(1) == 1 and (out is None or out.stride(1) == 1)
    if out is None:
        out = torch.empty(x.shape[0], blocks.shape[0], dtype=x.dtype)
    kernels.gemv(int(ggml_type), x, blocks, bias, out, amx)
    return out


def rms_norm(kernels, x, weight, eps, delta=None):
    """(h, RMSNorm(h)) through ``kernels.rms_norm`` on contiguous copies."""
    return kernels.rms_norm(x.contiguous(), None if delta is None else delta.contiguous(), weight.contiguous(), eps)


def silu_mul(kernels, gate_up):
    return kernels.silu_mul(gate_up.contiguous())
