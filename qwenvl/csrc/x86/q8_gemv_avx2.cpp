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

constexpr int kMR = 4;  // x rows sharing one decode of the weights

inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// 16 bytes of nibble pairs as 32 codes: the low nibbles (values 0-15), then the high ones (16-31)
inline __m256i nibbles(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128((const __m128i*)p), low = _mm_set1_epi8(0xF);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
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
// The 32-value formats: one group a block. codes(b): its 32 codes; wo(b, ws): its minimum factor
// (q8.cpp's Q8Format: -offset * ws, or the stored minimum).

struct SmallQ4_0 {
  static constexpr bool kSigned = false, kMins = true;
  static __m256i codes(const uint8_t* b) { return nibbles(b + 2); }
  static float wo(const uint8_t*, float ws) { return -8.0f * ws; }
};

struct SmallQ4_1 {
  static constexpr bool kSigned = false, kMins = true;
  static __m256i codes(const uint8_t* b) { return nibbles(b + 4); }
  static float wo(const uint8_t* b, float) { return load_half(b + 2); }
};

struct SmallQ5_0 {
  static constexpr bool kSigned = false, kMins = true;
  static __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 6), fifth_bits(load_u32(b + 2))); }
  static float wo(const uint8_t*, float ws) { return -16.0f * ws; }
};

struct SmallQ5_1 {
  static constexpr bool kSigned = false, kMins = true;
  static __m256i codes(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 8), fifth_bits(load_u32(b + 4))); }
  static float wo(const uint8_t* b, float) { return load_half(b + 2); }
};

struct SmallQ8_0 {
  static constexpr bool kSigned = true, kMins = false;
  static __m256i codes(const uint8_t* b) { return load256(b + 2); }
  static float wo(const uint8_t*, float) { return 0.0f; }
};

// x rows [m0, m0 + MR) against one W row of a 32-value format, 8 blocks at a time
template <class S, int kBytes, int MR>
void small_dot(const Activations& x, int64_t m0, const uint8_t* row, int64_t n, const Gemv& out) {
  const int64_t Gp = x.groups;
  __m256 acc_d[MR], acc_m[MR];
  for (int i = 0; i < MR; ++i) acc_d[i] = acc_m[i] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < x.real; c += kLanes) {
    const int here = (int)std::min<int64_t>(kLanes, x.real - c);
    alignas(32) float ws[kLanes] = {0}, wo[kLanes] = {0}, scale[MR][kLanes];
    for (int l = 0; l < here; ++l) {
      const uint8_t* b = row + (c + l) * kBytes;
      ws[l] = load_half(b), wo[l] = S::wo(b, ws[l]);
    }
    __m256 dx[MR];
    for (int i = 0; i < MR; ++i) {
      dx[i] = _mm256_loadu_ps(x.dx.data() + (m0 + i) * Gp + c);  // the padding groups' dx are 0
      _mm256_store_ps(scale[i], _mm256_mul_ps(dx[i], _mm256_load_ps(ws)));
    }
    for (int l = 0; l < here; ++l) {
      const __m256i cv = S::codes(row + (c + l) * kBytes);
      const __m256i cu = S::kSigned ? _mm256_abs_epi8(cv) : cv;
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.codes(m0 + i) + (c + l) * 32));
        const __m256i pairs = _mm256_maddubs_epi16(cu, S::kSigned ? _mm256_sign_epi8(xv, cv) : xv);
        const __m256 lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc_d[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale[i][l]), lanes, acc_d[i]);
      }
    }
    if (S::kMins)
      for (int i = 0; i < MR; ++i) {
        const int64_t xa = (m0 + i) * Gp + c;
        const __m256i mi = _mm256_add_epi32(_mm256_loadu_si256((const __m256i*)(x.qs0.data() + xa)),
                                            _mm256_loadu_si256((const __m256i*)(x.qs1.data() + xa)));
        acc_m[i] = _mm256_fmadd_ps(_mm256_mul_ps(dx[i], _mm256_load_ps(wo)), _mm256_cvtepi32_ps(mi), acc_m[i]);
      }
  }
  for (int i = 0; i < MR; ++i) store(out, m0 + i, n, sum_lanes(acc_d[i]) + sum_lanes(acc_m[i]));
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

// x rows [m0, m0 + MR) against one W row of a K-quant, a superblock (8 groups) at a time
template <class Q, int kBytes, int MR>
void k_dot(const Activations& x, int64_t m0, const uint8_t* row, int64_t n, const Gemv& out) {
  const int64_t Gp = x.groups;
  __m256 acc_d[MR], acc_m[MR];
  for (int i = 0; i < MR; ++i) acc_d[i] = acc_m[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < x.real; c += kLanes) {
    const uint8_t* b = row + (c / kLanes) * kBytes;
    KScales s;
    Q::prepare(b, &s);
    alignas(32) float scale[MR][kLanes];
    __m256 dx[MR];
    const int8_t* xq[MR];
    for (int i = 0; i < MR; ++i) {
      dx[i] = _mm256_loadu_ps(x.dx.data() + (m0 + i) * Gp + c);
      _mm256_store_ps(scale[i], _mm256_mul_ps(dx[i], _mm256_set1_ps(s.ws)));
      xq[i] = x.codes(m0 + i) + c * 32;
    }
    Q::groups(b, [&](int g, __m256i cv) {
      const __m256i mult = Q::kHalves ? _mm256_set_m128i(_mm_set1_epi16(s.isc1[g]), _mm_set1_epi16(s.isc0[g]))
                                      : _mm256_set1_epi16(s.isc0[g]);
      for (int i = 0; i < MR; ++i) {
        const __m256i pairs = _mm256_maddubs_epi16(cv, _mm256_loadu_si256((const __m256i*)(xq[i] + g * 32)));
        const __m256 lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, mult));
        acc_d[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale[i][g]), lanes, acc_d[i]);
      }
    });
    for (int i = 0; i < MR; ++i) {
      const int64_t xa = (m0 + i) * Gp + c;
      const __m256i qs0 = _mm256_loadu_si256((const __m256i*)(x.qs0.data() + xa));
      const __m256i qs1 = _mm256_loadu_si256((const __m256i*)(x.qs1.data() + xa));
      const __m256i mi = Q::kHalves
                             ? _mm256_add_epi32(_mm256_mullo_epi32(s.imin0, qs0), _mm256_mullo_epi32(s.imin1, qs1))
                             : _mm256_mullo_epi32(s.imin0, _mm256_add_epi32(qs0, qs1));
      acc_m[i] = _mm256_fmadd_ps(_mm256_mul_ps(dx[i], _mm256_set1_ps(s.wo)), _mm256_cvtepi32_ps(mi), acc_m[i]);
    }
  }
  for (int i = 0; i < MR; ++i) store(out, m0 + i, n, sum_lanes(acc_d[i]) + sum_lanes(acc_m[i]));
}

// Which kernel a format takes: Dot<MR>::run(x, m0, row, n, out), or none (kHas false: Q2_K, Q3_K)
template <class F>
struct Kernel {
  static constexpr bool kHas = false;
};
template <class S, class F>
struct SmallKernel {
  static constexpr bool kHas = true;
  template <int MR>
  static void dot(const Activations& x, int64_t m0, const uint8_t* row, int64_t n, const Gemv& out) {
    small_dot<S, F::kBytes, MR>(x, m0, row, n, out);
  }
};
template <class Q, class F>
struct KKernel {
  static constexpr bool kHas = true;
  template <int MR>
  static void dot(const Activations& x, int64_t m0, const uint8_t* row, int64_t n, const Gemv& out) {
    k_dot<Q, F::kBytes, MR>(x, m0, row, n, out);
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

template <class F>
void rows(const Activations& x, const QkGemv& c, const Gemv& out, int64_t n0, int64_t n1) {
  using Kn = Kernel<F>;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = c.w + n * c.row_bytes;
    int64_t m = 0;
    for (; m + kMR <= x.M; m += kMR) Kn::template dot<kMR>(x, m, row, n, out);
    switch (x.M - m) {
      case 3: Kn::template dot<3>(x, m, row, n, out); break;
      case 2: Kn::template dot<2>(x, m, row, n, out); break;
      case 1: Kn::template dot<1>(x, m, row, n, out); break;
      default: break;
    }
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
