// The activation-quantizing GEMM's tile on AVX2 (q8.h): a group's 32 code x int8 products summed
// by maddubs (unsigned codes x signed activations; the signed Q8_0 codes through abs/sign) and madd
// (by ones, or by the K-quants' integer scales) into 8 int32 lanes, scaled into fp32 lanes by one
// fma; the minimum terms 8 groups at a time. The same operations, in the same order, as the scalar
// reference tile (q8.cpp), so the same bits. Tiles of MR x rows by NR weight rows share the loads.
// Built into every library compiled with AVX2 (avx2, avx512, amx); empty elsewhere.
#include "../q8.h"

#include <algorithm>

#if QK_AVX2

namespace qk {
namespace q8 {

namespace {

// MR x rows (from m0) against NR panel rows (from r0): per group, each pair's 8 lane sums scaled
// into its accD (the scale dx * ws broadcast from a vector of 8 groups' products); per 8 groups,
// the minimum terms of 8 groups at once into accM
template <bool Signed, bool IntScale, bool Mins, bool Halves, int MR, int NR>
void block_dot(const Activations& x, const Panel& p, int64_t m0, int64_t r0, int64_t n0, const Gemv& out) {
  const int64_t Gp = p.groups;
  __m256 acc_d[MR][NR], acc_m[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NR; ++n) acc_d[i][n] = acc_m[i][n] = _mm256_setzero_ps();
  alignas(32) float scale[MR][NR][kLanes];
  for (int64_t c = 0; c < Gp; c += kLanes) {
    __m256 dx[MR];
    for (int i = 0; i < MR; ++i) {
      dx[i] = _mm256_loadu_ps(x.dx.data() + (m0 + i) * Gp + c);
      for (int n = 0; n < NR; ++n)
        _mm256_store_ps(scale[i][n], _mm256_mul_ps(dx[i], _mm256_loadu_ps(p.ws.data() + (r0 + n) * Gp + c)));
    }
    const int lanes_here = (int)std::min<int64_t>(kLanes, p.real - c);  // the padding groups add nothing
    for (int l = 0; l < lanes_here; ++l) {
      __m256i xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256((const __m256i*)(x.codes(m0 + i) + (c + l) * 32));
      for (int n = 0; n < NR; ++n) {
        const int64_t at = (r0 + n) * Gp + c + l;
        const __m256i cv = _mm256_loadu_si256((const __m256i*)(p.codes.data() + at * 32));
        const __m256i mult =
            IntScale ? _mm256_loadu_si256((const __m256i*)(p.isc16.data() + at * 16)) : _mm256_set1_epi16(1);
        for (int i = 0; i < MR; ++i) {
          const __m256i pairs = Signed ? _mm256_maddubs_epi16(_mm256_abs_epi8(cv), _mm256_sign_epi8(xv[i], cv))
                                       : _mm256_maddubs_epi16(cv, xv[i]);
          const __m256 lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, mult));
          acc_d[i][n] = _mm256_fmadd_ps(_mm256_set1_ps(scale[i][n][l]), lanes, acc_d[i][n]);
        }
      }
    }
    if (Mins)
      for (int i = 0; i < MR; ++i) {
        const int64_t xa = (m0 + i) * Gp + c;
        const __m256i qs0 = _mm256_loadu_si256((const __m256i*)(x.qs0.data() + xa));
        const __m256i qs1 = _mm256_loadu_si256((const __m256i*)(x.qs1.data() + xa));
        for (int n = 0; n < NR; ++n) {
          const int64_t wa = (r0 + n) * Gp + c;
          // Mi = imin0 * Qs0 + imin1 * Qs1, with one product (imin0 == imin1) or none (both 1) where it can
          const __m256i imin0 = _mm256_loadu_si256((const __m256i*)(p.imin0.data() + wa));
          const __m256i mi =
              Halves ? _mm256_add_epi32(_mm256_mullo_epi32(imin0, qs0),
                                        _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i*)(p.imin1.data() + wa)), qs1))
              : IntScale ? _mm256_mullo_epi32(imin0, _mm256_add_epi32(qs0, qs1))
                         : _mm256_add_epi32(qs0, qs1);
          const __m256 u = _mm256_mul_ps(dx[i], _mm256_loadu_ps(p.wo.data() + wa));
          acc_m[i][n] = _mm256_fmadd_ps(u, _mm256_cvtepi32_ps(mi), acc_m[i][n]);
        }
      }
  }
  for (int i = 0; i < MR; ++i)
    for (int n = 0; n < NR; ++n) store(out, m0 + i, n0 + r0 + n, sum_lanes(acc_d[i][n]) + sum_lanes(acc_m[i][n]));
}

#ifndef QK_Q8_MR
#define QK_Q8_MR 4
#endif
#ifndef QK_Q8_NR
#define QK_Q8_NR 1
#endif
constexpr int kMR = QK_Q8_MR, kNR = QK_Q8_NR;  // x rows x panel rows per block

template <bool Signed, bool IntScale, bool Mins, bool Halves, int MR>
void rows_block(const Activations& x, const Panel& p, int64_t m, int64_t n0, const Gemv& out) {
  int64_t r = 0;
  for (; r + kNR <= p.rows; r += kNR) block_dot<Signed, IntScale, Mins, Halves, MR, kNR>(x, p, m, r, n0, out);
  for (; r < p.rows; ++r) block_dot<Signed, IntScale, Mins, Halves, MR, 1>(x, p, m, r, n0, out);
}

template <bool Signed, bool IntScale, bool Mins, bool Halves>
void tile(const Activations& x, const Panel& p, int64_t m0, int64_t m1, int64_t n0, const Gemv& out) {
  int64_t m = m0;
  for (; m + kMR <= m1; m += kMR) rows_block<Signed, IntScale, Mins, Halves, kMR>(x, p, m, n0, out);
  for (; m < m1; ++m) rows_block<Signed, IntScale, Mins, Halves, 1>(x, p, m, n0, out);
}

}  // namespace

void tile_avx2(const Activations& x, const Panel& p, const Traits& t, int64_t m0, int64_t m1, int64_t n0,
               const Gemv& out) {
  if (t.is_signed)  // Q8_0
    tile<true, false, false, false>(x, p, m0, m1, n0, out);
  else if (!t.int_scale)  // Q4_0, Q4_1, Q5_0, Q5_1
    tile<false, false, true, false>(x, p, m0, m1, n0, out);
  else if (!t.halves)  // Q4_K, Q5_K
    tile<false, true, true, false>(x, p, m0, m1, n0, out);
  else  // Q2_K, Q3_K, Q6_K
    tile<false, true, true, true>(x, p, m0, m1, n0, out);
}

}  // namespace q8
}  // namespace qk

#endif  // QK_AVX2
