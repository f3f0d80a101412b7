// The activation-quantizing GEMM's tile on AVX2 (q8.h): the integer sums of 32 code x int8 products
// by maddubs (unsigned codes x signed activations; the signed Q8_0 codes through sign/abs) and madd
// (by ones, or by the K-quants' integer scales), eight groups' sums gathered into one vector by
// hadd, then q8.h's fp32 steps with eight groups in the eight lanes: the same operations, in the
// same order, as the scalar reference tile (q8.cpp), so the same bits. Built into every library
// compiled with AVX2 (avx2, avx512, amx); empty elsewhere.
#include "../q8.h"

#if QK_AVX2

namespace qk {
namespace q8 {

namespace {

// the integer sum of group g's 32 products, in 8 int32 lanes (lanes 0-3: first half, 4-7: second)
template <bool Signed, bool IntScale>
inline __m256i group_dot(__m256i xv, const uint8_t* code, const int16_t* isc16) {
  const __m256i cv = _mm256_loadu_si256((const __m256i*)code);
  const __m256i pairs = Signed ? _mm256_maddubs_epi16(_mm256_abs_epi8(cv), _mm256_sign_epi8(xv, cv))
                               : _mm256_maddubs_epi16(cv, xv);
  const __m256i mult = IntScale ? _mm256_loadu_si256((const __m256i*)isc16) : _mm256_set1_epi16(1);
  return _mm256_madd_epi16(pairs, mult);
}

// lane l of the result: the sum of the 8 lanes of v[l] (hadd keeps 128-bit halves apart; the last
// step joins them)
inline __m256i sum_lanes(__m256i v0, __m256i v1, __m256i v2, __m256i v3, __m256i v4, __m256i v5, __m256i v6,
                         __m256i v7) {
  const __m256i low = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
  const __m256i high = _mm256_hadd_epi32(_mm256_hadd_epi32(v4, v5), _mm256_hadd_epi32(v6, v7));
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20), _mm256_permute2x128_si256(low, high, 0x31));
}

// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), as the reference adds them
inline float sum_acc(__m256 acc) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

// NR panel rows (from r0) against x row m
template <bool Signed, bool IntScale, bool Mins, int NR>
void rows_dot(const Activations& x, const Panel& p, int ioff, int64_t m, int64_t r0, int64_t n0, const Gemv& out) {
  const int64_t Gp = p.groups;
  const int8_t* xq = x.codes(m);
  __m256 acc[NR];
  for (int n = 0; n < NR; ++n) acc[n] = _mm256_setzero_ps();
  for (int64_t c = 0; c < Gp; c += kLanes) {
    __m256i isum[NR];
    {
      __m256i v[NR][kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + (c + l) * 32));
        for (int n = 0; n < NR; ++n) {
          const int64_t at = (r0 + n) * Gp + c + l;
          v[n][l] = group_dot<Signed, IntScale>(xv, p.codes.data() + at * 32, p.isc16.data() + at * 16);
        }
      }
      for (int n = 0; n < NR; ++n)
        isum[n] = sum_lanes(v[n][0], v[n][1], v[n][2], v[n][3], v[n][4], v[n][5], v[n][6], v[n][7]);
    }
    const int64_t xa = m * Gp + c;
    const __m256i qs0 = _mm256_loadu_si256((const __m256i*)(x.qs0.data() + xa));
    const __m256i qs1 = _mm256_loadu_si256((const __m256i*)(x.qs1.data() + xa));
    const __m256 dx = _mm256_loadu_ps(x.dx.data() + xa);
    for (int n = 0; n < NR; ++n) {
      const int64_t wa = (r0 + n) * Gp + c;
      __m256i total = isum[n];
      if (ioff) {
        __m256i scaled = _mm256_add_epi32(qs0, qs1);
        if (IntScale)
          scaled = _mm256_add_epi32(
              _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i*)(p.isc0.data() + wa)), qs0),
              _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i*)(p.isc1.data() + wa)), qs1));
        total = _mm256_sub_epi32(total, _mm256_mullo_epi32(scaled, _mm256_set1_epi32(ioff)));
      }
      const __m256 t = _mm256_mul_ps(dx, _mm256_loadu_ps(p.ws.data() + wa));
      acc[n] = _mm256_fmadd_ps(t, _mm256_cvtepi32_ps(total), acc[n]);
      if (Mins) {
        const __m256i mi =
            _mm256_add_epi32(_mm256_mullo_epi32(_mm256_loadu_si256((const __m256i*)(p.imin0.data() + wa)), qs0),
                             _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i*)(p.imin1.data() + wa)), qs1));
        const __m256 u = _mm256_mul_ps(dx, _mm256_loadu_ps(p.wo.data() + wa));
        acc[n] = _mm256_fmadd_ps(u, _mm256_cvtepi32_ps(mi), acc[n]);
      }
    }
  }
  for (int n = 0; n < NR; ++n) store(out, m, n0 + r0 + n, sum_acc(acc[n]));
}

constexpr int kRows = 2;  // panel rows per x row load

template <bool Signed, bool IntScale, bool Mins>
void tile(const Activations& x, const Panel& p, int ioff, int64_t m0, int64_t m1, int64_t n0, const Gemv& out) {
  for (int64_t m = m0; m < m1; ++m) {
    int64_t r = 0;
    for (; r + kRows <= p.rows; r += kRows) rows_dot<Signed, IntScale, Mins, kRows>(x, p, ioff, m, r, n0, out);
    for (; r < p.rows; ++r) rows_dot<Signed, IntScale, Mins, 1>(x, p, ioff, m, r, n0, out);
  }
}

}  // namespace

void tile_avx2(const Activations& x, const Panel& p, const Traits& t, int64_t m0, int64_t m1, int64_t n0,
               const Gemv& out) {
  if (t.is_signed)
    tile<true, false, false>(x, p, t.ioff, m0, m1, n0, out);
  else if (!t.int_scale)
    (t.mins ? tile<false, false, true> : tile<false, false, false>)(x, p, t.ioff, m0, m1, n0, out);
  else
    (t.mins ? tile<false, true, true> : tile<false, true, false>)(x, p, t.ioff, m0, m1, n0, out);
}

}  // namespace q8
}  // namespace qk

#endif  // QK_AVX2
