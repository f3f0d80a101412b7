"""GGML block quantization: ``gguf``'s quantizers where the package has them, ours where it has not.

``quantize(values, qtype)`` gives the bytes llama.cpp stores for a float32 array. F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 go to ``gguf.quants.quantize``; the K-quants (Q2_K … Q6_K), which
``gguf`` only dequantizes, are implemented here after llama.cpp's reference quantizers
(``quantize_row_q{2..6}_K_ref`` in ggml-quants.c, what ``llama-quantize`` runs without an importance
matrix): the same scale searches, in float32, vectorized over blocks. Sums run element by element in
order, as the C loops do, so most blocks come out byte-identical to llama.cpp's.

Every K-quant super-block holds 256 values; its sub-blocks of 16 or 32 values each get a 4- or 6-bit
scale (and, for Q2_K/Q4_K/Q5_K, a min) relative to the block's fp16 ``d`` / ``dmin``.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

Q = GGMLQuantizationType
GROUP_MAX_EPS = 1e-15  # llama.cpp: a group whose largest |x| is below this is all zeros
F32 = np.float32


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 [..., n] → what a GGUF stores: float32 / float16 arrays for F32 / F16, else the
    type's bytes (uint8 [..., n // block_size * type_size]). n must be a multiple of the block size."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    quantizer = K_QUANTIZERS.get(qtype)
    if quantizer is None:
        if qtype in (Q.F32, Q.F16) or values.shape[-1] % block_size(qtype):
            return gguf_quants.quantize(values, qtype)
        # Blocks are independent and stored in order: quantize long rows (gguf loops over rows)
        per_row = math.gcd(values.size // block_size(qtype), 1024)
        blocks = gguf_quants.quantize(values.reshape(-1, block_size(qtype) * per_row), qtype)
        return blocks.reshape(*values.shape[:-1], values.shape[-1] // block_size(qtype) * GGML_QUANT_SIZES[qtype][1])
    if values.shape[-1] % QK_K:
        raise ValueError(f"rows of {values.shape[-1]} values are not a multiple of the {qtype.name} block size {QK_K}")
    with np.errstate(all="ignore"):  # masked-out lanes of the searches divide by zero
        blocks = quantizer(values.reshape(-1, QK_K))
    return blocks.reshape(*values.shape[:-1], values.shape[-1] // QK_K * GGML_QUANT_SIZES[qtype][1])


# ----------------------------------------------------------------------------------------------
# Helpers (float32 throughout, like the C code)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: round half to even (its 1.5·2^23 trick), as int32."""
    return np.rint(x.astype(F32)).astype(np.int32)


def _sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis, element by element in order (a C loop's float32 rounding)."""
    return np.add.reduce(np.ascontiguousarray(np.moveaxis(x.astype(F32), -1, 0)), axis=0)


def _fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=F32).astype(np.float16)


def _abs_max_signed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest |x|, the x holding it — the first one on ties) per row."""
    index = np.argmax(np.abs(x), axis=-1)
    value = np.take_along_axis(x, index[..., None], axis=-1)[..., 0]
    return np.abs(value), value


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (numerator / denominator).astype(F32)


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine (scale, min) for groups x [G, n] with levels 0..nmax: the error-weighted search of
    llama.cpp's make_qkx2_quants (each trial starts from the best min so far, as there). Returns
    (scale [G], -min [G], levels [G, n] uint8)."""
    minimum = np.minimum(x.min(axis=-1), F32(0))
    xmax = x.max(axis=-1)
    flat = xmax == minimum
    sum_w = _sum(weights)
    sum_x = _sum(weights * x)

    def levels(numerator: F32) -> np.ndarray:
        span = np.where(flat, F32(1), xmax - minimum).astype(F32)
        iscale = (numerator / span).astype(F32)
        return np.clip(_nearest_int(iscale[:, None] * (x - minimum[:, None])), 0, nmax)

    def error(scale: np.ndarray, low: np.ndarray, level: np.ndarray) -> np.ndarray:
        diff = (scale[:, None] * level.astype(F32) + low[:, None]) - x
        diff = np.abs(diff) if use_mad else diff * diff
        return _sum(weights * diff)

    span = np.where(flat, F32(1), xmax - minimum).astype(F32)
    scale = (F32(1) / (F32(nmax) / span).astype(F32)).astype(F32)
    best_levels = levels(F32(nmax))
    best_error = error(scale, minimum, best_levels)
    for step in range(nstep + 1):
        trial = levels(F32(rmin) + F32(rdelta) * F32(step) + F32(nmax))
        lf = trial.astype(F32)
        wl = weights * lf
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * lf), _sum(wl * x)
        det = (sum_w * sum_l2 - sum_l * sum_l).astype(F32)
        this_scale = _safe_divide(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = _safe_divide(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive = this_min > 0
        this_scale = np.where(positive, _safe_divide(sum_xl, sum_l2), this_scale)
        this_min = np.where(positive, F32(0), this_min)
        this_error = error(this_scale, this_min, trial)
        better = (det > 0) & (this_error < best_error) & ~flat
        best_levels = np.where(better[:, None], trial, best_levels)
        best_error = np.where(better, this_error, best_error)
        scale = np.where(better, this_scale, scale)
        minimum = np.where(better, this_min, minimum).astype(F32)
    scale = np.where(flat, F32(0), scale).astype(F32)
    best_levels = np.where(flat[:, None], 0, best_levels)
    return scale, (F32(0) - minimum).astype(F32), best_levels.astype(np.uint8)  # +0.0, not -0.0


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale for groups x [G, n] with levels -nmax..nmax-1, weights x² (llama.cpp's
    make_qx_quants with rmse_type 1). Returns (scale [G], levels + nmax [G, n] uint8)."""
    amax, signed_max = _abs_max_signed(x)
    zero = amax < GROUP_MAX_EPS
    signed_max = np.where(zero, F32(1), signed_max).astype(F32)
    w = (x * x).astype(F32)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        level = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = level.astype(F32)
        return level, _sum(w * x * lf), _sum(w * lf * lf)

    level, sumlx, suml2 = trial((F32(-nmax) / signed_max).astype(F32))
    scale = np.where(suml2 > 0, _safe_divide(sumlx, suml2), F32(0)).astype(F32)
    best = (scale * sumlx).astype(F32)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / signed_max).astype(F32)
        candidate, sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        level = np.where(better[:, None], candidate, level)
        scale = np.where(better, _safe_divide(sumlx, suml2), scale)
        best = np.where(better, scale * sumlx, best).astype(F32)
    scale = np.where(zero, F32(0), scale).astype(F32)
    level = np.where(zero[:, None], -nmax, level)
    return scale, (level + nmax).astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale for groups x [G, n], levels -nmax..nmax-1, refined one level at a time
    (llama.cpp's make_q3_quants with do_rmse). Returns (scale [G], levels + nmax [G, n] uint8)."""
    amax, signed_max = _abs_max_signed(x)
    zero = amax < GROUP_MAX_EPS
    signed_max = np.where(zero, F32(1), signed_max).astype(F32)
    iscale = (F32(-nmax) / signed_max).astype(F32)
    level = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    w = (x * x).astype(F32)
    wx = (w * x).astype(F32)
    sumlx = _sum(wx * level.astype(F32))
    suml2 = _sum(w * level.astype(F32) * level.astype(F32))
    for _ in range(5):
        changed = np.zeros(x.shape[0], dtype=bool)
        for i in range(x.shape[1]):
            li = level[:, i].astype(F32)
            slx = (sumlx - wx[:, i] * li).astype(F32)
            sl2 = (suml2 - w[:, i] * li * li).astype(F32)
            new = np.clip(_nearest_int(_safe_divide(x[:, i] * sl2, slx)), -nmax, nmax - 1)
            nf = new.astype(F32)
            slx_new = (slx + wx[:, i] * nf).astype(F32)
            sl2_new = (sl2 + w[:, i] * nf * nf).astype(F32)
            accept = (slx > 0) & (new != level[:, i]) & (sl2_new > 0)
            accept &= slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
            level[:, i] = np.where(accept, new, level[:, i])
            sumlx = np.where(accept, slx_new, sumlx)
            suml2 = np.where(accept, sl2_new, suml2)
            changed |= accept
        if not changed.any():
            break
    scale = np.where(suml2 > 0, _safe_divide(sumlx, suml2), F32(0)).astype(F32)
    scale = np.where(zero, F32(0), scale)
    level = np.where(zero[:, None], -nmax, level)
    return scale, (level + nmax).astype(np.uint8)


def _requantize_affine(x: np.ndarray, levels: np.ndarray, d: np.ndarray, dm: np.ndarray, nmax: int) -> np.ndarray:
    """Levels of x [B, S, n] for sub-block scales d and mins dm [B, S]; sub-blocks with d == 0 keep
    the levels their search found (as the C code does)."""
    q = np.clip(_nearest_int(_safe_divide(x + dm[..., None], np.where(d == 0, F32(1), d)[..., None])), 0, nmax)
    return np.where((d == 0)[..., None], levels, q).astype(np.uint8)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: eight 6-bit scales and mins [B, 8] into 12 bytes."""
    packed = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return packed


def _affine_super_blocks(
    x: np.ndarray, sub: int, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: (d, dmin fp16 [B], scales 12 bytes [B, 12], levels [B, 256])."""
    n_blocks = x.shape[0]
    groups = x.reshape(-1, sub)
    av_x = np.sqrt(_sum(groups * groups) / F32(sub)).astype(F32)
    weights = (av_x[:, None] + np.abs(groups)).astype(F32)
    scales, mins, levels = make_qkx2_quants(groups, weights, nmax, rmin, rdelta, nstep, use_mad=False)
    scales, mins = scales.reshape(n_blocks, -1), mins.reshape(n_blocks, -1)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, _safe_divide(F32(63), max_scale), F32(0))
    inv_min = np.where(max_min > 0, _safe_divide(F32(63), max_min), F32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins), 63).astype(np.uint8)
    d = _fp16(max_scale / F32(63))
    dmin = _fp16(max_min / F32(63))
    sub_d = (d.astype(F32)[:, None] * ls.astype(F32)).astype(F32)
    sub_m = (dmin.astype(F32)[:, None] * lm.astype(F32)).astype(F32)
    x3 = x.reshape(n_blocks, -1, sub)
    final = _requantize_affine(x3, levels.reshape(x3.shape), sub_d, sub_m, nmax)
    return d, dmin, _pack_scales_k4(ls, lm), final.reshape(n_blocks, QK_K)


def _pack_pairs(levels: np.ndarray, shift: int, chunk: int) -> np.ndarray:
    """Bytes holding levels of ``8 // shift`` quarter/half chunks: byte l of chunk c gets
    levels[c*chunk*k + l + i*chunk] << (i*shift) for i in 0..k-1 (k values per byte)."""
    per_byte = 8 // shift
    n_blocks = levels.shape[0]
    groups = levels.reshape(n_blocks, -1, per_byte, chunk).astype(np.uint8)
    packed = np.zeros((n_blocks, groups.shape[1], chunk), dtype=np.uint8)
    for i in range(per_byte):
        packed |= groups[:, :, i, :] << np.uint8(i * shift)
    return packed.reshape(n_blocks, -1)


# ----------------------------------------------------------------------------------------------
# The K-quants: blocks [B, 256] float32 → bytes [B, type_size]


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _affine_super_blocks(x, 32, 15, -1.0, 0.1, 20)
    qs = _pack_pairs(levels, 4, 32)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _affine_super_blocks(x, 32, 31, -0.5, 0.1, 15)
    qs = _pack_pairs(levels & 0xF, 4, 32)
    high = (levels >> 4).reshape(x.shape[0], 8, 32)  # bit 4 of the 8 chunks of 32
    qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
    for chunk in range(8):
        qh |= high[:, chunk, :] << np.uint8(chunk)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    n_blocks = x.shape[0]
    scales, levels = make_qx_quants(x.reshape(-1, 16), 32)
    scales, levels = scales.reshape(n_blocks, 16), levels.reshape(n_blocks, 16, 16)
    max_abs, max_scale = _abs_max_signed(scales)
    zero = max_abs < GROUP_MAX_EPS
    iscale = _safe_divide(F32(-128), np.where(zero, F32(1), max_scale))
    d = _fp16(np.where(zero, F32(0), (F32(1) / iscale).astype(F32)))
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127)
    sc = np.where(zero[:, None], 0, sc).astype(np.int8)
    sub_d = (d.astype(F32)[:, None] * sc.astype(F32)).astype(F32)
    x3 = x.reshape(n_blocks, 16, 16)
    q = np.clip(_nearest_int(_safe_divide(x3, np.where(sub_d == 0, F32(1), sub_d)[..., None])), -32, 31) + 32
    levels = np.where((sub_d == 0)[..., None], levels, q).astype(np.uint8)
    levels = np.where(zero[:, None, None], 0, levels).reshape(n_blocks, QK_K)
    halves = levels.reshape(n_blocks, 2, 4, 32)  # two halves of 128, four chunks of 32
    low = halves & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = halves >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate(
        [ql.reshape(n_blocks, 128), qh.reshape(n_blocks, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)],
        axis=1,
    )


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    n_blocks = x.shape[0]
    scales, levels = make_q3_quants(x.reshape(-1, 16), 4)
    scales, levels = scales.reshape(n_blocks, 16), levels.reshape(n_blocks, 16, 16)
    max_abs, max_scale = _abs_max_signed(scales)
    has_scale = max_scale != 0
    iscale = _safe_divide(F32(-32), np.where(has_scale, max_scale, F32(1)))
    sc = np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
    sc = np.where(has_scale[:, None], sc, 32)  # stored 0 when the block has no scale
    stored = np.where(has_scale[:, None], sc, 0).astype(np.uint8)
    packed = np.zeros((n_blocks, 12), dtype=np.uint8)
    packed[:, 0:8] = (stored[:, 0:8] & 0xF) | ((stored[:, 8:16] & 0xF) << 4)
    high = stored >> 4
    for j in range(16):
        packed[:, 8 + j % 4] |= high[:, j] << np.uint8(2 * (j // 4))
    d = _fp16(np.where(has_scale, (F32(1) / iscale).astype(F32), F32(0)))
    sub_d = (d.astype(F32)[:, None] * (sc - 32).astype(F32)).astype(F32)
    x3 = x.reshape(n_blocks, 16, 16)
    q = np.clip(_nearest_int(_safe_divide(x3, np.where(sub_d == 0, F32(1), sub_d)[..., None])), -4, 3) + 4
    levels = np.where((sub_d == 0)[..., None], levels, q).astype(np.uint8).reshape(n_blocks, QK_K)
    # bit 2 of each level goes to hmask: byte m, bit (j // 32) for level j = 32 * bit + m
    hbits = (levels > 3).reshape(n_blocks, 8, 32).astype(np.uint8)
    hmask = np.zeros((n_blocks, 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= hbits[:, bit, :] << np.uint8(bit)
    qs = _pack_pairs(levels & 3, 2, 32)
    return np.concatenate([hmask, qs, packed, d.view(np.uint8).reshape(-1, 2)], axis=1)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    n_blocks = x.shape[0]
    groups = x.reshape(-1, 16)
    scales, mins, levels = make_qkx2_quants(groups, np.abs(groups), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(n_blocks, 16), mins.reshape(n_blocks, 16)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    iscale = np.where(max_scale > 0, _safe_divide(F32(15), max_scale), F32(0))
    imin = np.where(max_min > 0, _safe_divide(F32(15), max_min), F32(0))
    ls = np.where(max_scale[:, None] > 0, _nearest_int(iscale[:, None] * scales), 0).astype(np.uint8)
    lm = np.where(max_min[:, None] > 0, _nearest_int(imin[:, None] * mins), 0).astype(np.uint8)
    d = _fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
    dmin = _fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    sub_d = (d.astype(F32)[:, None] * (ls & 0xF).astype(F32)).astype(F32)
    sub_m = (dmin.astype(F32)[:, None] * lm.astype(F32)).astype(F32)
    x3 = x.reshape(n_blocks, 16, 16)
    final = _requantize_affine(x3, levels.reshape(x3.shape), sub_d, sub_m, 3).reshape(n_blocks, QK_K)
    qs = _pack_pairs(final, 2, 32)
    return np.concatenate(
        [ls | (lm << 4), qs, d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)], axis=1
    )


K_QUANTIZERS = {
    Q.Q2_K: quantize_q2_k,
    Q.Q3_K: quantize_q3_k,
    Q.Q4_K: quantize_q4_k,
    Q.Q5_K: quantize_q5_k,
    Q.Q6_K: quantize_q6_k,
}

__all__ = ["quantize", "block_size", "K_QUANTIZERS"]
