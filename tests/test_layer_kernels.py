"""The compiled per-layer helpers — RMSNorm (residual add fused in) and SwiGLU's silu(gate) * up — against
torch's ops and fp64, row by row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from isa_paths import rms_norm, silu_mul

from qwenvl import ops
from qwenvl.models.text import RMSNorm

SHAPES = [(1, 896), (16, 896), (37, 896), (3, 20)]  # 20: not a multiple of the 16 summing lanes


def inputs(rows, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=generator) * 3).to(dtype)
    delta = torch.randn(rows, dim, generator=generator).to(dtype)
    weight = (torch.randn(dim, generator=generator) * 0.5 + 1).to(dtype)
    return x, delta, weight


def reference(h, weight, eps=1e-6):
    """fp64 x / rms(x) * w, then rounded to the dtype once."""
    h64 = h.double()
    return (h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(h.dtype)


@pytest.mark.parametrize("rows, dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_torch_and_fp64(native_isa, rows, dim, dtype):
    x, delta, weight = inputs(rows, dim, dtype)
    h, normed = rms_norm(native_isa, x, weight, 1e-6)
    assert h is x
    ours, torch_y, exact = normed.double(), F.rms_norm(x, (dim,), weight, 1e-6).double(), reference(x, weight).double()
    if dtype == torch.float32:  # fp32 sums in another order: a few ulp
        assert torch.allclose(ours, exact, rtol=2e-6, atol=1e-7)
        assert torch.allclose(ours, torch_y, rtol=2e-6, atol=1e-7)
    else:  # one rounding to bf16 of nearly the same fp32 value: equal but for rare ties, one ulp apart
        assert (ours == torch_y).double().mean() > 0.999
        assert torch.allclose(ours, exact, rtol=2**-7, atol=0)

    total, normed_sum = rms_norm(native_isa, x, weight, 1e-6, delta=delta)
    assert torch.equal(total, x + delta)  # the residual add, rounded to the dtype as torch rounds it
    h, normed_again = rms_norm(native_isa, x + delta, weight, 1e-6)
    assert torch.equal(normed_sum, normed_again)


def test_rows_do_not_depend_on_each_other(native_isa):
    x, delta, weight = inputs(16, 896, torch.bfloat16)
    _, batched = rms_norm(native_isa, x, weight, 1e-6, delta=delta)
    for i in range(16):
        _, alone = rms_norm(native_isa, x[i : i + 1], weight, 1e-6, delta=delta[i : i + 1])
        assert torch.equal(alone[0], batched[i])


def test_module_uses_the_kernel_and_falls_back_elsewhere(native_isa):
    norm = RMSNorm(20, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 20))
    x, delta, _ = inputs(3, 20, torch.float32)
    h, y = norm.add_and_norm(x, delta)
    assert torch.equal(h, x + delta) and torch.allclose(y, F.rms_norm(x + delta, (20,), norm.weight, 1e-6), rtol=2e-6)
    strided = torch.randn(3, 40)[:, ::2]  # not contiguous: torch's op
    assert torch.equal(norm(strided), F.rms_norm(strided, (20,), norm.weight, 1e-6))
    half = norm.half()  # fp16: torch's op
    x16 = x.half()
    assert torch.equal(half(x16), F.rms_norm(x16, (20,), half.weight, 1e-6))


def gate_up_rows(rows, inter, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(rows, 2 * inter, generator=generator) * 4
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.0, -88.0, 1e-30, -1e-30])  # extremes
    return gate_up.to(dtype)


@pytest.mark.parametrize("rows, inter", [(1, 4864), (16, 4864), (3, 20)])  # 20: a 16-lane tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_matches_torch_and_fp64(native_isa, rows, inter, dtype):
    gate_up = gate_up_rows(rows, inter, dtype)
    ours = silu_mul(native_isa, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    torch_y = F.silu(gate).mul_(up)
    assert ours.shape == (rows, inter) and torch.isfinite(ours).all()
    g64, u64 = gate.double(), up.double()
    exact = g64 * torch.sigmoid(g64) * u64
    vanishing = g64 < -80  # silu(g) < 1e-33: both sides are (sub)normal dust, not compared bit for bit
    assert (ours[vanishing].abs() < 1e-30).all()
    ours, torch_y, exact = ours[~vanishing].double(), torch_y[~vanishing].double(), exact[~vanishing]
    if dtype == torch.float32:  # exp to ~2 ulp, then two roundings
        assert torch.allclose(ours, exact, rtol=1e-6, atol=1e-30)
    else:  # bf16: silu rounded, then the product — as torch; a near-tie may land one ulp apart
        assert (ours == torch_y).double().mean() > 0.999
        assert torch.allclose(ours, torch_y, rtol=2**-7, atol=0)


def test_silu_mul_rows_are_independent_and_swiglu_falls_back(native_isa):
    gate_up = gate_up_rows(16, 64, torch.bfloat16)
    batched = silu_mul(native_isa, gate_up)
    for i in range(16):
        assert torch.equal(silu_mul(native_isa, gate_up[i : i + 1])[0], batched[i])
    assert torch.equal(ops.swiglu(gate_up.view(16, 1, 128)), batched.view(16, 1, 64))
    half = gate_up.half()  # fp16: torch's ops
    gate, up = half.chunk(2, dim=-1)
    assert torch.equal(ops.swiglu(half), F.silu(gate) * up)
    nan = torch.tensor([[float("nan"), 1.0]])
    assert torch.isnan(silu_mul(native_isa, nan)).all() and torch.isnan(silu_mul(native_isa, nan.bfloat16())).all()
