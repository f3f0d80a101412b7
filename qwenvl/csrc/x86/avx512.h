// AVX-512 decoders shared by the AVX-512 GEMV (avx512.cpp) and the AMX tiles (amx.cpp): each gives
// the same values as the formats' scalar decoders (formats.h), 16 lanes at a time.
#pragma once

#include "../formats.h"

#if !QK_AVX512
#error "x86/avx512.h needs AVX-512 F/BW/VL/DQ (and AVX2, FMA, F16C)"
#endif

namespace qk {
namespace x512 {

// Block scales with AVX-512 where it pays (the same exact products as the formats' prepare).
template <class F>
inline void prepare(const uint8_t* b, Scales* s) {
  F::prepare(b, s);
}

inline void k_scales16(const uint8_t* b, Scales* s) {  // s0 = d * scale, off = -(dmin * min): exact
  uint8_t q[16];
  k_scale_codes(b, q);
  const float d = load_half(b), dmin = load_half(b + 2);
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q)));
  const __m512 factors = _mm512_insertf32x8(_mm512_set1_ps(d), _mm256_set1_ps(-dmin), 1);
  _mm512_storeu_ps(s->s0, _mm512_mul_ps(codes, factors));  // s0[0..7], then off[0..7]
}

template <>
inline void prepare<Q4_K>(const uint8_t* b, Scales* s) {
  k_scales16(b, s);
}

template <>
inline void prepare<Q5_K>(const uint8_t* b, Scales* s) {
  k_scales16(b, s);
}

template <>
inline void prepare<Q6_K>(const uint8_t* b, Scales* s) {  // s0[g], s1[g]: d times scales 2g, 2g + 1
  const __m512 scales = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 192))));
  const __m512i even_odd = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m512 v = _mm512_permutexvar_ps(even_odd, _mm512_mul_ps(scales, _mm512_set1_ps(load_half(b + 208))));
  _mm256_storeu_ps(s->s0, _mm512_castps512_ps256(v));
  _mm256_storeu_ps(s->s1, _mm512_extractf32x8_ps(v, 1));
}

// vec<F>(blk, g, s, w0, w1): group g's 32 weights in two zmm registers. Formats without a
// specialization (Q2_K, Q3_K) decode with the scalar decoder and load the result.
inline __m512 i8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
inline __m512 u8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

template <class F>
inline void vec(const uint8_t* b, int g, const Scales& s, __m512& w0, __m512& w1) {
  alignas(64) float values[32];
  F::scalar(b, g, &s, values);
  w0 = _mm512_load_ps(values);
  w1 = _mm512_load_ps(values + 16);
}

template <>
inline void vec<Q8_0>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]);
  w0 = _mm512_mul_ps(i8_to_ps(_mm_loadu_si128((const __m128i*)(b + 2))), d);
  w1 = _mm512_mul_ps(i8_to_ps(_mm_loadu_si128((const __m128i*)(b + 18))), d);
}

inline void nibbles(const uint8_t* p, __m128i& lo, __m128i& hi) {  // 16 bytes: low and high nibbles
  const __m128i v = _mm_loadu_si128((const __m128i*)p), mask = _mm_set1_epi8(0xF);
  lo = _mm_and_si128(v, mask);
  hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
}

template <>
inline void vec<Q4_0>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]);
  const __m128i eight = _mm_set1_epi8(8);
  __m128i lo, hi;
  nibbles(b + 2, lo, hi);
  w0 = _mm512_mul_ps(d, i8_to_ps(_mm_sub_epi8(lo, eight)));
  w1 = _mm512_mul_ps(d, i8_to_ps(_mm_sub_epi8(hi, eight)));
}

template <>
inline void vec<Q4_1>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]), m = _mm512_set1_ps(s.off[0]);
  __m128i lo, hi;
  nibbles(b + 4, lo, hi);
  w0 = _mm512_fmadd_ps(d, u8_to_ps(lo), m);  // d * code is exact: one rounding, as gguf's d * q + m
  w1 = _mm512_fmadd_ps(d, u8_to_ps(hi), m);
}

template <>
inline void vec<Q5_0>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]);
  uint32_t qh;
  memcpy(&qh, b + 2, 4);
  __m128i lo, hi;
  nibbles(b + 6, lo, hi);
  const __m128i sixteen = _mm_set1_epi8(16);  // code - 16: subtract 16 where the high bit is clear
  lo = _mm_mask_sub_epi8(lo, (__mmask16)~qh, lo, sixteen);
  hi = _mm_mask_sub_epi8(hi, (__mmask16)~(qh >> 16), hi, sixteen);
  w0 = _mm512_mul_ps(d, i8_to_ps(lo));
  w1 = _mm512_mul_ps(d, i8_to_ps(hi));
}

template <>
inline void vec<Q5_1>(const uint8_t* b, int, const Scales& s, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(s.s0[0]), m = _mm512_set1_ps(s.off[0]);
  uint32_t qh;
  memcpy(&qh, b + 4, 4);
  __m128i lo, hi;
  nibbles(b + 8, lo, hi);
  const __m128i sixteen = _mm_set1_epi8(16);
  lo = _mm_mask_add_epi8(lo, (__mmask16)qh, lo, sixteen);
  hi = _mm_mask_add_epi8(hi, (__mmask16)(qh >> 16), hi, sixteen);
  w0 = _mm512_fmadd_ps(d, u8_to_ps(lo), m);
  w1 = _mm512_fmadd_ps(d, u8_to_ps(hi), m);
}

inline __m256i nibbles32(const uint8_t* p, int high) {  // the low or high nibbles of 32 bytes
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  return _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0xF));
}

inline void affine32(__m256i codes, float scale, float offset, __m512& w0, __m512& w1) {
  const __m512 d = _mm512_set1_ps(scale), m = _mm512_set1_ps(offset);
  w0 = _mm512_fmadd_ps(d, u8_to_ps(_mm256_castsi256_si128(codes)), m);  // one rounding, as gguf
  w1 = _mm512_fmadd_ps(d, u8_to_ps(_mm256_extracti128_si256(codes, 1)), m);
}

inline __m256i q5k_high(const uint8_t* b, int g, __m256i codes) {
  const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 16));
  const __mmask32 bits = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << g)));
  return _mm256_mask_add_epi8(codes, bits, codes, _mm256_set1_epi8(16));
}

template <>
inline void vec<Q4_K>(const uint8_t* b, int g, const Scales& s, __m512& w0, __m512& w1) {
  affine32(nibbles32(b + 16 + (g / 2) * 32, g % 2), s.s0[g], s.off[g], w0, w1);
}

template <>
inline void vec<Q5_K>(const uint8_t* b, int g, const Scales& s, __m512& w0, __m512& w1) {
  affine32(q5k_high(b, g, nibbles32(b + 48 + (g / 2) * 32, g % 2)), s.s0[g], s.off[g], w0, w1);
}

inline __m256i q6k_codes(const uint8_t* b, int g) {  // 6-bit codes 0..63
  const int half = g / 4, part = g % 4;
  const __m256i ql = _mm256_loadu_si256((const __m256i*)(b + half * 64 + (part % 2) * 32));
  const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + half * 32));
  const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ql, (part / 2) * 4), _mm256_set1_epi8(0xF));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, part * 2), _mm256_set1_epi8(3));
  return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
}

template <>
inline void vec<Q6_K>(const uint8_t* b, int g, const Scales& s, __m512& w0, __m512& w1) {
  const __m256i q = _mm256_sub_epi8(q6k_codes(b, g), _mm256_set1_epi8(32));
  w0 = _mm512_mul_ps(_mm512_set1_ps(s.s0[g]), i8_to_ps(_mm256_castsi256_si128(q)));
  w1 = _mm512_mul_ps(_mm512_set1_ps(s.s1[g]), i8_to_ps(_mm256_extracti128_si256(q, 1)));
}

template <>
inline void vec<F16>(const uint8_t* b, int, const Scales&, __m512& w0, __m512& w1) {
  w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)b));
  w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(b + 32)));
}

inline __m512 bf16_to_ps(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

template <>
inline void vec<BF16>(const uint8_t* b, int, const Scales&, __m512& w0, __m512& w1) {
  w0 = bf16_to_ps(_mm256_loadu_si256((const __m256i*)b));
  w1 = bf16_to_ps(_mm256_loadu_si256((const __m256i*)(b + 32)));
}

template <>
inline void vec<F32>(const uint8_t* b, int, const Scales&, __m512& w0, __m512& w1) {
  w0 = _mm512_loadu_ps((const float*)b);
  w1 = _mm512_loadu_ps((const float*)(b + 64));
}

inline __m256i ps_to_bf16(__m512 v) {  // round to nearest even (no NaNs among weights)
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
#endif
}

#if QK_BF16
// ---------------------------------------------------------------------------------------------
// bf16 dot path (bf16 x, small codes): the 32 codes of a group become 32 exact bf16 numbers (small
// integers) and one vdpbf16ps per x row sums their 32 exact products in fp32 (16 lanes of pairs).
// The group's scale then multiplies the 16 lane sums into the row's accumulator.
// Codes of up to 5 bits go through a table: vpermw maps each 16-bit code to its bf16 value. Q6_K's
// 6-bit codes c (a 64-entry table costs twice as much) become the bf16 number 64 + c exactly (the
// bits of 64 with c in its mantissa: c << 1); once per block, -96 * scale times the sums of x over
// each run of 16 weights takes the 64 + 32 off (at the cost of ~2 bits of the fp32 sums).
// codes() returns the 32 codes of group g, one byte each in value order (Q6_K's pre-shifted).

inline __m256i two_nibbles(const uint8_t* p) {  // 16 bytes: their low nibbles, then their high ones
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
  // the high lane rotates each 16-bit word right by 4 (left by 12), bringing the high nibbles down
  const __m256i counts = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 12, 12, 12, 12, 12, 12, 12, 12);
  return _mm256_and_si256(_mm256_shldv_epi16(v, v, counts), _mm256_set1_epi8(0xF));
}

inline __m256i add_high_bits(__m256i codes, uint32_t bits) {  // + 16 where the 5th bit is set
  return _mm256_mask_add_epi8(codes, bits, codes, _mm256_set1_epi8(16));
}

template <class F>
inline __m256i codes(const uint8_t* b, int g);

template <>
inline __m256i codes<Q4_0>(const uint8_t* b, int) { return two_nibbles(b + 2); }

template <>
inline __m256i codes<Q4_1>(const uint8_t* b, int) { return two_nibbles(b + 4); }

template <>
inline __m256i codes<Q5_0>(const uint8_t* b, int) { return add_high_bits(two_nibbles(b + 6), load_u32(b + 2)); }

template <>
inline __m256i codes<Q5_1>(const uint8_t* b, int) { return add_high_bits(two_nibbles(b + 8), load_u32(b + 4)); }

template <>
inline __m256i codes<Q4_K>(const uint8_t* b, int g) { return nibbles32(b + 16 + (g / 2) * 32, g % 2); }

template <>
inline __m256i codes<Q5_K>(const uint8_t* b, int g) { return q5k_high(b, g, nibbles32(b + 48 + (g / 2) * 32, g % 2)); }

template <>
inline __m256i codes<Q6_K>(const uint8_t* b, int g) {  // (low 4 bits | high 2 bits << 4) << 1
  const int half = g / 4, part = g % 4;
  const __m256i ql = _mm256_loadu_si256((const __m256i*)(b + half * 64 + (part % 2) * 32));
  const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + half * 32));
  // 16-bit shifts: bits crossing between the two bytes of a word land outside the masks
  const __m256i lo = _mm256_and_si256(part < 2 ? _mm256_slli_epi16(ql, 1) : _mm256_srli_epi16(ql, 3),
                                      _mm256_set1_epi8(0x1E));
  const int up = 5 - 2 * part;  // high bit pair 2 * part .. 2 * part + 1 moves to bits 5-6
  const __m256i hi = up > 0 ? _mm256_slli_epi16(qh, up) : _mm256_srli_epi16(qh, -up);
  return _mm256_ternarylogic_epi32(hi, _mm256_set1_epi8(0x60), lo, 0xEA);  // (hi & 0x60) | lo
}

template <class F>
inline __m512i code_table() {  // bf16 of the codes 0 .. 31 minus the offset
  const int first = -(F::kOffset > 0 ? F::kOffset : 0);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(first)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(first + 16)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // small integers: exact
}

// the formats that take the dot path for bf16 x; the others (Q8_0, F16, BF16, F32) convert x to fp32:
// they decode as fast to fp32, and two FMAs beat one vdpbf16ps on this CPU
template <class F>
constexpr bool kDot = std::is_same_v<F, Q4_0> || std::is_same_v<F, Q4_1> || std::is_same_v<F, Q5_0> ||
                      std::is_same_v<F, Q5_1> || std::is_same_v<F, Q4_K> || std::is_same_v<F, Q5_K> ||
                      std::is_same_v<F, Q6_K>;

template <class F>
struct DotWeights {  // group g of a block as 32 exact bf16 values
  __m512i table;
  DotWeights() {
    if constexpr (F::kBits < 6) table = code_table<F>();
  }
  inline __m512i operator()(const uint8_t* b, int g) const {
    const __m512i code = _mm512_cvtepu8_epi16(codes<F>(b, g));
    if constexpr (F::kBits == 6) return _mm512_or_si512(code, _mm512_set1_epi16(0x4280));  // 64 + c
    return _mm512_permutexvar_epi16(code, table);
  }
};

inline __m512 q6k_minus(const uint8_t* b) {  // -96 * d * scale of the block's 16 weight runs, in order
  const __m512 scales = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 192))));
  return _mm512_mul_ps(_mm512_mul_ps(scales, _mm512_set1_ps(load_half(b + 208))), _mm512_set1_ps(-96.0f));
}

template <class F>
inline __m512 bf16_scale(const Scales& s, int g) {  // lanes 0-7 pair weights 0-15, 8-15 the rest
  if constexpr (F::kHalves)  // Q6_K: a scale per 16 weights
    return _mm512_insertf32x8(_mm512_set1_ps(s.s0[g]), _mm256_set1_ps(s.s1[g]), 1);
  return _mm512_set1_ps(s.s0[g]);
}
#endif  // QK_BF16

// Streaming from memory: while reading a block of NR rows, fetch the same block of the next NR
// rows (the next tile, NR * row_bytes further on: rows are contiguous). Prefetches never fault.
template <class F, int NR>
inline void prefetch_next_tile(const uint8_t* block, int64_t row_bytes) {
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    for (int offset = 0; offset < F::kBytes; offset += 64)
      _mm_prefetch((const char*)(block + (NR + r) * row_bytes + offset), _MM_HINT_T0);
}

}  // namespace x512
}  // namespace qk
