// The activation-quantizing GEMV on AVX2 (q8.h): gemm_q8's products read straight from the stored
// blocks. A group's 32 codes are decoded into one register (nibbles masked and shifted, high bits
// spread from their bit planes), multiplied with the int8 activations by maddubs (unsigned codes x
// signed activations; Q8_0's signed codes through abs/sign) and summed into 8 int32 lanes by madd
// (by ones, or by the K-quants' integer scales), then scaled into fp32 lanes by one fma; the minimum
// terms of 8 groups (one K-quant superblock, or 8 small blocks) go in by one more fma. The same
// operations in the same order as the scalar reference (q8.cpp, rows_scalar), so the same bits; up
// to 4 x rows share each decoded group. Built into every library compiled with AVX2; empty elsewhere.
#include <algorithm>

#include "../q8.h"

#if QK_AVX2

namespace qk {
namespace q8 {

namespace {

constexpr int kMR = 4;      // x rows sharing one decode of the weights
// Accumulator pairs a kernel keeps, x rows x W rows: with 1, one W row at a time (the fastest
// measured on Zen 3 for 1 x row: 2 or 4 W rows interleaved ran 1.1-1.8x slower, though with fewer
// instructions); -DQK_Q8_CHAINS=4 interleaves 4 W rows for a lone x row.
#ifndef QK_Q8_CHAINS
#define QK_Q8_CHAINS 1
#endif
constexpr int kChains = QK_Q8_CHAINS;

inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// 16 bytes of nibble pairs as 32 codes: the low nibbles (values 0-15), then the high ones (16-31):
// the bytes in both halves, the upper half shifted right by 4 (a 64-bit shift: masked after)
inline __m256i nibbles(const uint8_t* p) {
  const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
  return _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0xF));
}

// 0x10 in byte i where bit i of bits is set (the fifth bit of the Q5 formats' codes)
inline __m256i fifth_bits(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)bits),
      _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i all_but_own = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);  // byte k: every bit but k
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, all_but_own), _mm256_set1_epi64x(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// ---------------------------------------------------------------------------------------------
// The 32-value formats: one group a block. codes(b): its 32 codes; the minimum factor wo (q8.cpp's
// Q8Format): kOffset * ws (kOffset = -offset), or the stored fp16 minimum after the scale (kMinHalf).

struct SmallQ4_0 {
  static constexpr bool kSigned = false, kMins = true, kMinHalf = false;
  static constexpr float kOffset = -8.0f;
  static __m256i codes(const uint8_t* b) { return nibbles(b + 2); }
};

struct SmallQ4_1 {
  static constexpr bool kSigned = false, kMins = true, kMinHalf = true;
  static constexpr float kOffset = 0.0f;
  static __m256i codes(const uint8_t* b) { return nibbles(b + 4); }
};

struct SmallQ5_0 {
  static constexpr bool kSigned = false, kMins = true, kMinHalf = false;
  static constexpr float kOffset = -16.0f;
  static __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 6), fifth_bits(load_u32(b + 2))); }
};

struct SmallQ5_1 {
  static constexpr bool kSigned = false, kMins = true, kMinHalf = true;
  static constexpr float kOffset = 0.0f;
  static __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 8), fifth_bits(load_u32(b + 4))); }
};

struct SmallQ8_0 {
  static constexpr bool kSigned = true, kMins = false, kMinHalf = false;
  static constexpr float kOffset = 0.0f;
  static __m256i codes(const uint8_t* b) { return load256(b + 2); }
};

inline int half_bits(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return h;
}

// The fp16 values at p, p + stride, ... (8 of them; `here` < 8: zeros after) as fp32 (F16C: exact)
inline __m256 halves(const uint8_t* p, int64_t stride, int here) {
  __m128i h = _mm_setzero_si128();
  if (here == kLanes) {
    h = _mm_insert_epi16(h, half_bits(p), 0);
    h = _mm_insert_epi16(h, half_bits(p + stride), 1);
    h = _mm_insert_epi16(h, half_bits(p + 2 * stride), 2);
    h = _mm_insert_epi16(h, half_bits(p + 3 * stride), 3);
    h = _mm_insert_epi16(h, half_bits(p + 4 * stride), 4);
    h = _mm_insert_epi16(h, half_bits(p + 5 * stride), 5);
    h = _mm_insert_epi16(h, half_bits(p + 6 * stride), 6);
    h = _mm_insert_epi16(h, half_bits(p + 7 * stride), 7);
    return _mm256_cvtph_ps(h);
  }
  alignas(16) uint16_t tail[kLanes] = {0};
  for (int l = 0; l < here; ++l) memcpy(&tail[l], p + l * stride, 2);
  return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)tail));
}

// x rows [m0, m0 + MR) against W rows [n0, n0 + NR) of a 32-value format, 8 blocks at a time (the
// NR rows' accumulations are independent chains, for the out-of-order core to overlap)
template <class S, int kBytes, int MR, int NR>
void small_dot(const Activations& x, int64_t m0, const QkGemv& c, int64_t n0, const Gemv& out) {
  const int64_t Gp = x.groups;
  __m256 acc_d[MR][NR], acc_m[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc_d[i][r] = acc_m[i][r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = c.w + (n0 + r) * c.row_bytes;
  for (int64_t g0 = 0; g0 < x.real; g0 += kLanes) {
    const int here = (int)std::min<int64_t>(kLanes, x.real - g0);
    __m256 ws[NR], wo[NR], dx[MR];
    for (int r = 0; r < NR; ++r) {
      ws[r] = halves(rows[r] + g0 * kBytes, kBytes, here);  // 0 in the padding lanes
      wo[r] = S::kMinHalf ? halves(rows[r] + g0 * kBytes + 2, kBytes, here) : _mm256_mul_ps(ws[r], _mm256_set1_ps(S::kOffset));
    }
    __m256 scale[MR][NR];  // lane l: group g0 + l's dx * ws, broadcast by a lane permutation
    for (int i = 0; i < MR; ++i) {
      dx[i] = _mm256_loadu_ps(x.dx.data() + (m0 + i) * Gp + g0);  // the padding groups' dx are 0
      for (int r = 0; r < NR; ++r) scale[i][r] = _mm256_mul_ps(dx[i], ws[r]);
    }
    __m256i lane = _mm256_setzero_si256();
    for (int l = 0; l < here; ++l, lane = _mm256_add_epi32(lane, _mm256_set1_epi32(1))) {
      __m256i xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256((const __m256i*)(x.codes(m0 + i) + (g0 + l) * 32));
      for (int r = 0; r < NR; ++r) {
        const __m256i cv = S::codes(rows[r] + (g0 + l) * kBytes);
        const __m256i cu = S::kSigned ? _mm256_abs_epi8(cv) : cv;
        for (int i = 0; i < MR; ++i) {
          const __m256i pairs = _mm256_maddubs_epi16(cu, S::kSigned ? _mm256_sign_epi8(xv[i], cv) : xv[i]);
          const __m256 lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
          acc_d[i][r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(scale[i][r], lane), lanes, acc_d[i][r]);
        }
      }
    }
    if (S::kMins)
      for (int i = 0; i < MR; ++i) {
        const int64_t xa = (m0 + i) * Gp + g0;
        const __m256 mi = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(x.qs0.data() + xa)),
                                                              _mm256_loadu_si256((const __m256i*)(x.qs1.data() + xa))));
        for (int r = 0; r < NR; ++r) acc_m[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(dx[i], wo[r]), mi, acc_m[i][r]);
      }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) store(out, m0 + i, n0 + r, sum_lanes(acc_d[i][r]) + sum_lanes(acc_m[i][r]));
}

// ---------------------------------------------------------------------------------------------
// The K-quants: 8 groups a block. prepare(b, s) its scales; groups(b, fn) calls fn(g, codes) for
// g = 0 .. 7 in order.

struct KScales {
  float ws, wo;                  // the block's: every group has the same
  int16_t isc0[8], isc1[8];      // per group: the scale of its first 16 values, of its second 16
  __m256i imin0, imin1;          // the 8 groups' minimum multipliers (int32)
};

inline void k_prepare(const uint8_t* b, KScales* s) {  // Q4_K, Q5_K: a 6-bit scale and min per 32
  alignas(16) uint8_t q[16];
  k_scale_codes(b, q);
  for (int g = 0; g < 8; ++g) s->isc0[g] = s->isc1[g] = q[g];
  s->imin0 = s->imin1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8)));
  s->ws = load_half(b), s->wo = -load_half(b + 2);
}

struct KQ4 {
  static constexpr bool kHalves = false;
  static void prepare(const uint8_t* b, KScales* s) { k_prepare(b, s); }
  template <class Fn>
  static void groups(const uint8_t* b, Fn&& fn) {
    const __m256i low = _mm256_set1_epi8(0xF);
    for (int h = 0; h < 4; ++h) {
      const __m256i q = load256(b + 16 + h * 32);
      fn(2 * h, _mm256_and_si256(q, low));
      fn(2 * h + 1, _mm256_and_si256(_mm256_srli_epi16(q, 4), low));
    }
  }
};

struct KQ5 {
  static constexpr bool kHalves = false;
  static void prepare(const uint8_t* b, KScales* s) { k_prepare(b, s); }
  template <class Fn>
  static void groups(const uint8_t* b, Fn&& fn) {
    const __m256i low = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
    __m256i high = load256(b + 16);  // bit g of byte i: the fifth bit of value i of group g
    for (int h = 0; h < 4; ++h) {
      const __m256i q = load256(b + 48 + h * 32);
      for (int part = 0; part < 2; ++part) {
        const __m256i nib = part ? _mm256_and_si256(_mm256_srli_epi16(q, 4), low) : _mm256_and_si256(q, low);
        fn(2 * h + part, _mm256_or_si256(nib, _mm256_slli_epi16(_mm256_and_si256(high, one), 4)));
        high = _mm256_srli_epi16(high, 1);  // bit 0 of each byte: the next group's (16-bit shift, masked)
      }
    }
  }
};

struct KQ6 {
  static constexpr bool kHalves = true;
  static void prepare(const uint8_t* b, KScales* s) {
    const __m128i sc = _mm_loadu_si128((const __m128i*)(b + 192));  // scale 2g and 2g + 1 of group g
    const __m128i split = _mm_shuffle_epi8(sc, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    s->imin0 = _mm256_cvtepi8_epi32(split);
    s->imin1 = _mm256_cvtepi8_epi32(_mm_srli_si128(split, 8));
    for (int g = 0; g < 8; ++g) s->isc0[g] = (int8_t)b[192 + 2 * g], s->isc1[g] = (int8_t)b[193 + 2 * g];
    s->ws = load_half(b + 208), s->wo = -32.0f * s->ws;
  }
  template <class Fn>
  static void groups(const uint8_t* b, Fn&& fn) {
    const __m256i low = _mm256_set1_epi8(0xF), top = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; ++h) {
      const __m256i ql0 = load256(b + h * 64), ql1 = load256(b + h * 64 + 32), qh = load256(b + 128 + h * 32);
      fn(4 * h, _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_and_si256(_mm256_slli_epi16(qh, 4), top)));
      fn(4 * h + 1, _mm256_or_si256(_mm256_and_si256(ql1, low), _mm256_and_si256(_mm256_slli_epi16(qh, 2), top)));
      fn(4 * h + 2,
         _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low), _mm256_and_si256(qh, top)));
      fn(4 * h + 3, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), top)));
    }
  }
};

// x rows [m0, m0 + MR) against W rows [n0, n0 + NR) of a K-quant, a superblock (8 groups) at a time
template <class Q, int kBytes, int MR, int NR>
void k_dot(const Activations& x, int64_t m0, const QkGemv& c, int64_t n0, const Gemv& out) {
  const int64_t Gp = x.groups;
  __m256 acc_d[MR][NR], acc_m[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc_d[i][r] = acc_m[i][r] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < x.real; g0 += kLanes) {
    KScales s[NR];
    const uint8_t* b[NR];
    for (int r = 0; r < NR; ++r) b[r] = c.w + (n0 + r) * c.row_bytes + (g0 / kLanes) * kBytes, Q::prepare(b[r], &s[r]);
    alignas(32) float scale[MR][NR][kLanes];
    __m256 dx[MR];
    const int8_t* xq[MR];
    for (int i = 0; i < MR; ++i) {
      dx[i] = _mm256_loadu_ps(x.dx.data() + (m0 + i) * Gp + g0);
      for (int r = 0; r < NR; ++r) _mm256_store_ps(scale[i][r], _mm256_mul_ps(dx[i], _mm256_set1_ps(s[r].ws)));
      xq[i] = x.codes(m0 + i) + g0 * 32;
    }
    for (int r = 0; r < NR; ++r)
      Q::groups(b[r], [&](int g, __m256i cv) {
        const __m256i mult = Q::kHalves ? _mm256_set_m128i(_mm_set1_epi16(s[r].isc1[g]), _mm_set1_epi16(s[r].isc0[g]))
                                        : _mm256_set1_epi16(s[r].isc0[g]);
        for (int i = 0; i < MR; ++i) {
          const __m256i pairs = _mm256_maddubs_epi16(cv, _mm256_loadu_si256((const __m256i*)(xq[i] + g * 32)));
          const __m256 lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, mult));
          acc_d[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(scale[i][r][g]), lanes, acc_d[i][r]);
        }
      });
    for (int i = 0; i < MR; ++i) {
      const int64_t xa = (m0 + i) * Gp + g0;
      const __m256i qs0 = _mm256_loadu_si256((const __m256i*)(x.qs0.data() + xa));
      const __m256i qs1 = _mm256_loadu_si256((const __m256i*)(x.qs1.data() + xa));
      for (int r = 0; r < NR; ++r) {
        const __m256i mi = Q::kHalves ? _mm256_add_epi32(_mm256_mullo_epi32(s[r].imin0, qs0), _mm256_mullo_epi32(s[r].imin1, qs1))
                                      : _mm256_mullo_epi32(s[r].imin0, _mm256_add_epi32(qs0, qs1));
        acc_m[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(dx[i], _mm256_set1_ps(s[r].wo)), _mm256_cvtepi32_ps(mi), acc_m[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) store(out, m0 + i, n0 + r, sum_lanes(acc_d[i][r]) + sum_lanes(acc_m[i][r]));
}

// Which kernel a format takes: Kernel<F>::dot<MR, NR>(x, m0, c, n0, out), or none (kHas false: Q2_K, Q3_K)
template <class F>
struct Kernel {
  static constexpr bool kHas = false;
};
template <class S, class F>
struct SmallKernel {
  static constexpr bool kHas = true;
  template <int MR, int NR>
  static void dot(const Activations& x, int64_t m0, const QkGemv& c, int64_t n0, const Gemv& out) {
    small_dot<S, F::kBytes, MR, NR>(x, m0, c, n0, out);
  }
};
template <class Q, class F>
struct KKernel {
  static constexpr bool kHas = true;
  template <int MR, int NR>
  static void dot(const Activations& x, int64_t m0, const QkGemv& c, int64_t n0, const Gemv& out) {
    k_dot<Q, F::kBytes, MR, NR>(x, m0, c, n0, out);
  }
};
template <>
struct Kernel<Q4_0> : SmallKernel<SmallQ4_0, Q4_0> {};
template <>
struct Kernel<Q4_1> : SmallKernel<SmallQ4_1, Q4_1> {};
template <>
struct Kernel<Q5_0> : SmallKernel<SmallQ5_0, Q5_0> {};
template <>
struct Kernel<Q5_1> : SmallKernel<SmallQ5_1, Q5_1> {};
template <>
struct Kernel<Q8_0> : SmallKernel<SmallQ8_0, Q8_0> {};
template <>
struct Kernel<Q4_K> : KKernel<KQ4, Q4_K> {};
template <>
struct Kernel<Q5_K> : KKernel<KQ5, Q5_K> {};
template <>
struct Kernel<Q6_K> : KKernel<KQ6, Q6_K> {};

// x rows [m0, m0 + MR) against W rows [n0, n1): NR (= kChains / MR) rows at a time, then one by one
template <class F, int MR>
void rows_of(const Activations& x, int64_t m0, const QkGemv& c, int64_t n0, int64_t n1, const Gemv& out) {
  constexpr int NR = kChains / MR > 0 ? kChains / MR : 1;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) Kernel<F>::template dot<MR, NR>(x, m0, c, n, out);
  for (; n < n1; ++n) Kernel<F>::template dot<MR, 1>(x, m0, c, n, out);
}

template <class F>
void rows(const Activations& x, const QkGemv& c, const Gemv& out, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + kMR <= x.M; m += kMR) rows_of<F, kMR>(x, m, c, n0, n1, out);
  switch (x.M - m) {
    case 3: rows_of<F, 3>(x, m, c, n0, n1, out); break;
    case 2: rows_of<F, 2>(x, m, c, n0, n1, out); break;
    case 1: rows_of<F, 1>(x, m, c, n0, n1, out); break;
    default: break;
  }
}

}  // namespace

bool rows_avx2(const Activations& x, const QkGemv& c, const Gemv& out, int64_t n0, int64_t n1) {
  bool done = false;
  dispatch(c.type, [&](auto format) {
    using F = typename decltype(format)::type;
    if constexpr (Kernel<F>::kHas) {
      rows<F>(x, c, out, n0, n1);
      done = true;
    }
  });
  return done;
}

}  // namespace q8
}  // namespace qk

#endif  // QK_AVX2
