// The activation-quantizing GEMM ("q8"): y = q8(x) @ W^T, for prefill on CPUs without bf16.
//
// Not exact (the exact kernels are the default; this path is chosen with --kernel q8). The rows of x
// are quantized per 32 values to int8 codes q with one fp32 scale dx (dx = amax / 127, q =
// round-half-even(x * (1 / dx)), as llama.cpp's Q8_0 activations), and every weight group of 32 is
// split into small integer codes and fp32 scales:
//
//   w_i = ws * (isc_h * code_i) + wo * imin_h          (h: the half of 16 the weight is in)
//
// (for Q4_0 ws = d, isc = 1, code = the nibble, wo = -8 d, imin = 1; for Q4_K ws = d, isc = the 6-bit
// scale, wo = -dmin, imin = the 6-bit min; a code offset always becomes such a "minimum", -offset *
// ws, exact as the offsets are powers of two: q8.cpp, Q8Format). A group's dot product with an
// activation block is then fp32 scales times exact integer sums:
//
//   lane j (0-7, the 4 values 4j .. 4j + 3): L_j = isc_h * sum of code_i * q_i   (maddubs + madd)
//   Mi = imin_0 * Qs_0 + imin_1 * Qs_1,  Qs_h = sum of q_i over half h
//
// The fp32 accumulation, which every ISA's version follows operation for operation (so every path
// gives the same bits; the integer sums are exact in any order):
//   accD[0..7] = accM[0..7] = 0;
//   for each group g:  accD[j] = fma(dx[g] * ws[g], (float)L_j, accD[j])     for j = 0 .. 7
//   for each group g, padded with zero groups to a multiple of 8 (formats with a minimum or offset):
//     accM[g % 8] = fma(dx[g] * wo[g], (float)Mi, accM[g % 8])
//   y = sum8(accD) + sum8(accM) (+ bias),
//   sum8(a) = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
// Every output depends only on its x row and w row: a row's result is the same alone or batched.
//
// The GEMV (qk_gemv_q8, for decode's 1-16 rows) computes these same products, in this same order, but
// straight from the stored blocks: no panel, every block read once per call for all the x rows. Its
// results are gemm_q8's, bit for bit (the scalar reference rows_scalar splits each group as split_rows
// does; the AVX2 rows decode the codes and scales into registers), so prompt and decode rows agree.
// Groups past K / 32 only ever add fma(0, 0, acc) = acc to the minimum lanes, so the GEMV skips them.
#pragma once

#include "formats.h"

namespace qk {
namespace q8 {

constexpr int kLanes = 8;  // groups per fp32 accumulation step

inline int64_t padded_groups(int64_t K) { return (K / 32 + kLanes - 1) / kLanes * kLanes; }

// The quantized rows of x: per row Gp (padded_groups) blocks of 32 codes, their scale and the sums of
// their two halves' codes. Padding blocks are zero.
struct Activations {
  int64_t M = 0, groups = 0, real = 0;  // groups: Gp; real: K / 32
  std::vector<int8_t> q;      // [M, Gp * 32]
  std::vector<float> dx;      // [M, Gp]
  std::vector<int32_t> qs0, qs1;  // [M, Gp]
  const int8_t* codes(int64_t m) const { return q.data() + m * groups * 32; }
};

// One tile of weight rows split as above: per row Gp groups (padding groups zero).
struct Panel {
  int64_t rows = 0, groups = 0, real = 0;
  std::vector<uint8_t> codes;      // [rows, Gp * 32]: code_i (int8 for the signed Q8_0)
  std::vector<int16_t> isc16;      // [rows, Gp, 16]: isc_0 x 8, isc_1 x 8 (madd's multipliers)
  std::vector<int32_t> imin0, imin1;  // [rows, Gp]
  std::vector<float> ws, wo;       // [rows, Gp]
};

// What the format's flags let a kernel skip.
struct Traits {
  bool is_signed;  // codes are int8 (Q8_0), else uint8 < 64
  bool int_scale;  // isc != 1 (the K-quants)
  bool mins;       // wo != 0 (a minimum, or a code offset)
  bool halves;     // imin_0 and imin_1 may differ (a scale or minimum per 16 values)
};

// y[m, n] for rows [m0, m1) and the panel's rows (W rows n0 ...), through Gemv's store (bias, bf16).
using TileKernel = void (*)(const Activations& x, const Panel& p, const Traits& t, int64_t m0, int64_t m1,
                            int64_t n0, const Gemv& out);

void tile_scalar(const Activations& x, const Panel& p, const Traits& t, int64_t m0, int64_t m1, int64_t n0,
                 const Gemv& out);
#if QK_AVX2
void tile_avx2(const Activations& x, const Panel& p, const Traits& t, int64_t m0, int64_t m1, int64_t n0,
               const Gemv& out);
#endif

#if QK_AVX2
// sum8 of 8 fp32 lanes: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), as the reference adds them
inline float sum_lanes(__m256 acc) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}
#endif

// x's rows quantized (threads: OpenMP threads over the rows; 1 runs on the caller's thread).
Activations quantize(const QkGemv& c, int threads);

// The GEMV's y[m, n] for every x row and the W rows [n0, n1), through Gemv's store (bias, bf16).
void rows_scalar(const Activations& x, const QkGemv& c, const Gemv& out, int64_t n0, int64_t n1);
#if QK_AVX2
// false (nothing written) for the formats without an AVX2 GEMV (Q2_K, Q3_K: the scalar rows then)
bool rows_avx2(const Activations& x, const QkGemv& c, const Gemv& out, int64_t n0, int64_t n1);
#endif

}  // namespace q8

// qk_gemv_q8: gemm_q8's results for few rows, straight from the blocks (QK_UNSUPPORTED_TYPE as gemm_q8)
int gemv_q8(const QkGemv& call);

// qk_gemm_q8: QK_OK, or QK_UNSUPPORTED_TYPE (the float formats and the types without a q8 split)
int gemm_q8(const QkGemv& call);
bool q8_supported(int type);

}  // namespace qk
