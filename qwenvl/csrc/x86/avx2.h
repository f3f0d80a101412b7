// AVX2 decoders (with FMA and F16C): each gives the same fp32 values as the formats' scalar decoders
// (formats.h), eight lanes at a time, with the same operations (a product of an fp16 scale and a
// small code is exact, so d * q + m rounds once, fused or not).
#pragma once

#include "../formats.h"

#if !QK_AVX2
#error "x86/avx2.h needs AVX2, FMA and F16C"
#endif

namespace qk {
namespace x256 {

// ---------------------------------------------------------------------------------------------
// Block scales (the same exact products as the formats' prepare)

template <class F>
inline void prepare(const uint8_t* b, Scales* s) {
  F::prepare(b, s);
}

inline __m256 u8x8_to_ps(const uint8_t* p) {  // 8 unsigned bytes as fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

inline void k_scales8(const uint8_t* b, Scales* s) {  // s0 = s1 = d * scale, off = off1 = -(dmin * min)
  uint8_t q[16];
  k_scale_codes(b, q);
  const __m256 scale = _mm256_mul_ps(u8x8_to_ps(q), _mm256_set1_ps(load_half(b)));
  const __m256 minimum = _mm256_mul_ps(u8x8_to_ps(q + 8), _mm256_set1_ps(-load_half(b + 2)));
  _mm256_storeu_ps(s->s0, scale);
  _mm256_storeu_ps(s->s1, scale);
  _mm256_storeu_ps(s->off, minimum);
  _mm256_storeu_ps(s->off1, minimum);
}

template <>
inline void prepare<Q4_K>(const uint8_t* b, Scales* s) {
  k_scales8(b, s);
}

template <>
inline void prepare<Q5_K>(const uint8_t* b, Scales* s) {
  k_scales8(b, s);
}

template <>
inline void prepare<Q6_K>(const uint8_t* b, Scales* s) {  // s0[g], s1[g]: d times scales 2g, 2g + 1
  const __m128i scales = _mm_loadu_si128((const __m128i*)(b + 192));
  // even bytes to the low 8, odd bytes to the high 8
  const __m128i split = _mm_shuffle_epi8(scales, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  const __m256 d = _mm256_set1_ps(load_half(b + 208));
  _mm256_storeu_ps(s->s0, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(split)), d));
  _mm256_storeu_ps(s->s1, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(split, 8))), d));
  _mm256_storeu_ps(s->off, _mm256_setzero_ps());
  _mm256_storeu_ps(s->off1, _mm256_setzero_ps());
}

// ---------------------------------------------------------------------------------------------
// Codes: the 32 codes of group g, one byte each, in value order

inline __m256i nibbles16(const uint8_t* p) {  // 16 bytes: their low nibbles, then their high nibbles
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
  return _mm256_and_si256(both, _mm256_set1_epi8(0xF));
}

inline __m256i nibbles32(const uint8_t* p, int high) {  // the low or high nibbles of 32 bytes
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  return _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0xF));
}

inline __m256i bits_to_bytes(uint32_t bits) {  // byte i: 0xFF where bit i is set, else 0
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                             _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101,
                                                                0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

// byte i of 32 bytes at p: 0xFF where its bit `bit` is set
inline __m256i bit_plane(const uint8_t* p, int bit) {
  const __m256i mask = _mm256_set1_epi8((char)(1 << bit));
  return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_loadu_si256((const __m256i*)p), mask), mask);
}

inline __m256i q5k_codes(const uint8_t* b, int g) {
  const __m256i low = nibbles32(b + 48 + (g / 2) * 32, g % 2);
  return _mm256_or_si256(low, _mm256_and_si256(bit_plane(b + 16, g), _mm256_set1_epi8(16)));
}

inline __m256i q6k_codes(const uint8_t* b, int g) {  // 6-bit codes 0..63
  const int half = g / 4, part = g % 4;
  const __m256i ql = _mm256_loadu_si256((const __m256i*)(b + half * 64 + (part % 2) * 32));
  const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + half * 32));
  const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(ql, (part / 2) * 4), _mm256_set1_epi8(0xF));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, part * 2), _mm256_set1_epi8(3));
  return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
}

inline __m256i q2k_codes(const uint8_t* b, int g) {
  const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 16 + (g / 4) * 32));
  return _mm256_and_si256(_mm256_srli_epi16(q, (g % 4) * 2), _mm256_set1_epi8(3));
}

inline __m256i q3k_codes(const uint8_t* b, int g) {  // low | high << 2, 0..7
  const __m256i q = _mm256_loadu_si256((const __m256i*)(b + 32 + (g / 4) * 32));
  const __m256i low = _mm256_and_si256(_mm256_srli_epi16(q, (g % 4) * 2), _mm256_set1_epi8(3));
  return _mm256_or_si256(low, _mm256_and_si256(bit_plane(b, g), _mm256_set1_epi8(4)));
}

// ---------------------------------------------------------------------------------------------
// vec<F>(blk, g, s, w): group g's 32 weights as fp32 in four ymm registers, in value order

inline __m256 i8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
inline __m256 u8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

// the 32 signed bytes of `codes` times d (exact products)
inline void scaled(__m256i codes, __m256 d, __m256 w[4]) {
  const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
  w[0] = _mm256_mul_ps(d, i8_to_ps(lo));
  w[1] = _mm256_mul_ps(d, i8_to_ps(_mm_unpackhi_epi64(lo, lo)));
  w[2] = _mm256_mul_ps(d, i8_to_ps(hi));
  w[3] = _mm256_mul_ps(d, i8_to_ps(_mm_unpackhi_epi64(hi, hi)));
}

// the 32 signed bytes: the first 16 times d0, the others times d1
inline void scaled2(__m256i codes, __m256 d0, __m256 d1, __m256 w[4]) {
  const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
  w[0] = _mm256_mul_ps(d0, i8_to_ps(lo));
  w[1] = _mm256_mul_ps(d0, i8_to_ps(_mm_unpackhi_epi64(lo, lo)));
  w[2] = _mm256_mul_ps(d1, i8_to_ps(hi));
  w[3] = _mm256_mul_ps(d1, i8_to_ps(_mm_unpackhi_epi64(hi, hi)));
}

// the 32 unsigned bytes: d0 * code + m0 for the first 16, d1 * code + m1 for the others, each
// rounded once (d * code is exact)
inline void affine2(__m256i codes, __m256 d0, __m256 m0, __m256 d1, __m256 m1, __m256 w[4]) {
  const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
  w[0] = _mm256_fmadd_ps(d0, u8_to_ps(lo), m0);
  w[1] = _mm256_fmadd_ps(d0, u8_to_ps(_mm_unpackhi_epi64(lo, lo)), m0);
  w[2] = _mm256_fmadd_ps(d1, u8_to_ps(hi), m1);
  w[3] = _mm256_fmadd_ps(d1, u8_to_ps(_mm_unpackhi_epi64(hi, hi)), m1);
}

inline void affine(__m256i codes, float d, float m, __m256 w[4]) {
  const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
  affine2(codes, dv, mv, dv, mv, w);
}

template <class F>
inline void vec(const uint8_t* b, int g, const Scales& s, __m256 w[4]);

template <>
inline void vec<Q8_0>(const uint8_t* b, int, const Scales& s, __m256 w[4]) {
  scaled(_mm256_loadu_si256((const __m256i*)(b + 2)), _mm256_set1_ps(s.s0[0]), w);
}

template <>
inline void vec<Q4_0>(const uint8_t* b, int, const Scales& s, __m256 w[4]) {
  scaled(_mm256_sub_epi8(nibbles16(b + 2), _mm256_set1_epi8(8)), _mm256_set1_ps(s.s0[0]), w);
}

template <>
inline void vec<Q4_1>(const uint8_t* b, int, const Scales& s, __m256 w[4]) {
  affine(nibbles16(b + 4), s.s0[0], s.off[0], w);
}

template <>
inline void vec<Q5_0>(const uint8_t* b, int, const Scales& s, __m256 w[4]) {
  // code - 16: the nibble minus 16 where the fifth bit is clear
  const __m256i minus = _mm256_andnot_si256(bits_to_bytes(load_u32(b + 2)), _mm256_set1_epi8(16));
  scaled(_mm256_sub_epi8(nibbles16(b + 6), minus), _mm256_set1_ps(s.s0[0]), w);
}

template <>
inline void vec<Q5_1>(const uint8_t* b, int, const Scales& s, __m256 w[4]) {
  const __m256i high = _mm256_and_si256(bits_to_bytes(load_u32(b + 4)), _mm256_set1_epi8(16));
  affine(_mm256_or_si256(nibbles16(b + 8), high), s.s0[0], s.off[0], w);
}

template <>
inline void vec<Q2_K>(const uint8_t* b, int g, const Scales& s, __m256 w[4]) {
  affine2(q2k_codes(b, g), _mm256_set1_ps(s.s0[g]), _mm256_set1_ps(s.off[g]), _mm256_set1_ps(s.s1[g]),
          _mm256_set1_ps(s.off1[g]), w);
}

template <>
inline void vec<Q3_K>(const uint8_t* b, int g, const Scales& s, __m256 w[4]) {
  scaled2(_mm256_sub_epi8(q3k_codes(b, g), _mm256_set1_epi8(4)), _mm256_set1_ps(s.s0[g]), _mm256_set1_ps(s.s1[g]), w);
}

template <>
inline void vec<Q4_K>(const uint8_t* b, int g, const Scales& s, __m256 w[4]) {
  affine(nibbles32(b + 16 + (g / 2) * 32, g % 2), s.s0[g], s.off[g], w);
}

template <>
inline void vec<Q5_K>(const uint8_t* b, int g, const Scales& s, __m256 w[4]) {
  affine(q5k_codes(b, g), s.s0[g], s.off[g], w);
}

template <>
inline void vec<Q6_K>(const uint8_t* b, int g, const Scales& s, __m256 w[4]) {
  scaled2(_mm256_sub_epi8(q6k_codes(b, g), _mm256_set1_epi8(32)), _mm256_set1_ps(s.s0[g]), _mm256_set1_ps(s.s1[g]),
          w);
}

template <>
inline void vec<F16>(const uint8_t* b, int, const Scales&, __m256 w[4]) {
  for (int i = 0; i < 4; ++i) w[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b + 16 * i)));
}

inline __m256 bf16_to_ps(__m128i v) {  // 8 bf16 values
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

template <>
inline void vec<BF16>(const uint8_t* b, int, const Scales&, __m256 w[4]) {
  for (int i = 0; i < 4; ++i) w[i] = bf16_to_ps(_mm_loadu_si128((const __m128i*)(b + 16 * i)));
}

template <>
inline void vec<F32>(const uint8_t* b, int, const Scales&, __m256 w[4]) {
  for (int i = 0; i < 4; ++i) w[i] = _mm256_loadu_ps((const float*)(b + 32 * i));
}

// ---------------------------------------------------------------------------------------------
// The factored GEMV (formats whose weights are scale * code, and the K-quants with a minimum):
// codes<F>(blk, g) gives group g's 32 stored codes (unsigned, the format's offset not yet taken off)
// as bytes in value order. Q8_0's codes are its (signed) bytes.

template <class F>
constexpr bool kFactored = std::is_same_v<F, Q8_0> || std::is_same_v<F, Q4_0> || std::is_same_v<F, Q5_0> ||
                           std::is_same_v<F, Q3_K> || std::is_same_v<F, Q6_K> || std::is_same_v<F, Q4_K> ||
                           std::is_same_v<F, Q5_K>;

template <class F>
inline __m256i codes(const uint8_t* b, int g);

template <>
inline __m256i codes<Q4_0>(const uint8_t* b, int) {
  return nibbles16(b + 2);
}

template <>
inline __m256i codes<Q5_0>(const uint8_t* b, int) {
  return _mm256_or_si256(nibbles16(b + 6), _mm256_and_si256(bits_to_bytes(load_u32(b + 2)), _mm256_set1_epi8(16)));
}

template <>
inline __m256i codes<Q3_K>(const uint8_t* b, int g) {
  return q3k_codes(b, g);
}

template <>
inline __m256i codes<Q6_K>(const uint8_t* b, int g) {
  return q6k_codes(b, g);
}

template <>
inline __m256i codes<Q4_K>(const uint8_t* b, int g) {
  return nibbles32(b + 16 + (g / 2) * 32, g % 2);
}

template <>
inline __m256i codes<Q5_K>(const uint8_t* b, int g) {
  return q5k_codes(b, g);
}

// Group g's 32 codes minus the format's offset as fp32 in four registers. Q8_0: in value order (each
// register widens 8 of its bytes from memory). The others in "split order": the 32 code bytes
// (each < 128) are read as 8 dwords, and register i holds byte i of each (codes i, 4 + i, 8 + i, ...,
// 28 + i), converted without a shift where it can: byte i (i < 3) masked in place and put in the
// mantissa of 2^23 is the float 2^23 + code * 2^(8i); subtracting 2^23 + offset * 2^(8i) leaves
// (code - offset) * 2^(8i) exactly. Byte 3 is shifted down. split_x puts x in the same order, scaled
// so that every product is (code - offset) * x * 2^16 (register i's x values times 2^(16 - 8i), byte
// 3's times 2^16: exact for |x| < 2^111), and the GEMV scales its sums back by 2^-16 (exact too):
// the FMAs see the products code * x would give, times a power of two.
template <class F>
constexpr bool kSplit = kFactored<F> && !std::is_same_v<F, Q8_0>;

constexpr int kMagic = 0x4B000000;  // the bits of 2^23: integers below 2^23 in its mantissa add to it

template <int kOffset>
inline __m256 split_byte(__m256i bits, int i) {  // bits: 2^23's exponent and code << 8i
  const float offset = (float)(kOffset > 0 ? kOffset : 0) * (float)(1 << (8 * (i % 3)));
  return _mm256_sub_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(8388608.0f + offset));
}

template <int kOffset>
inline void split(__m256i v, __m256 c[4]) {
  const __m256i magic = _mm256_set1_epi32(kMagic);
  c[0] = split_byte<kOffset>(_mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFF)), magic), 0);
  c[1] = split_byte<kOffset>(_mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFF00)), magic), 1);
  c[2] = split_byte<kOffset>(_mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFF0000)), magic), 2);
  c[3] = split_byte<kOffset>(_mm256_or_si256(_mm256_srli_epi32(v, 24), magic), 3);
}

template <class F>
inline void code_values(const uint8_t* b, int g, __m256 c[4]) {
  if constexpr (std::is_same_v<F, Q8_0>) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) c[i] = i8_to_ps(_mm_loadl_epi64((const __m128i*)(b + 2 + 8 * i)));
  } else {
    split<F::kOffset>(codes<F>(b, g), c);
  }
}

constexpr float kSplitScale = 65536.0f;  // the products' factor in split order

// x in split order, in place: within each run of 32 values, value 4j + i moves to 8i + j, times
// 2^(16 - 8i) (i < 3) or 2^16 (i = 3)
inline void split_x(float* x, int64_t n) {
  float run[32];
  const float factor[4] = {kSplitScale, kSplitScale / 256, kSplitScale / 65536, kSplitScale};
  for (int64_t k = 0; k + 32 <= n; k += 32) {
    memcpy(run, x + k, sizeof run);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) x[k + 8 * i + j] = run[4 * j + i] * factor[i];
  }
}

// the scales of group g in split order: lanes 0-3 hold codes below 16, lanes 4-7 the others
template <class F>
inline __m256 split_scale(const Scales& s, int g) {
  if constexpr (F::kHalves) return _mm256_set_m128(_mm_set1_ps(s.s1[g]), _mm_set1_ps(s.s0[g]));
  return _mm256_set1_ps(s.s0[g]);
}

// 8 fp32 values as bf16, rounded to nearest even, NaN kept a (quiet) NaN: float_to_bf16's bits
inline __m128i ps_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i halves = _mm256_blendv_epi8(rounded, quiet, nan);  // each 0 .. 0xFFFF
  return _mm_packus_epi32(_mm256_castsi256_si128(halves), _mm256_extracti128_si256(halves, 1));
}

// Streaming from memory: while reading a block of NR rows, fetch the same block of the next NR
// rows (the next tile, NR * row_bytes further on: rows are contiguous). Prefetches never fault.
template <class F, int NR>
inline void prefetch_next_tile(const uint8_t* block, int64_t row_bytes) {
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    for (int offset = 0; offset < F::kBytes; offset += 64)
      _mm_prefetch((const char*)(block + (NR + r) * row_bytes + offset), _MM_HINT_T0);
}

inline float reduce8(__m256 v) {  // a fixed order: the two halves, then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace x256
}  // namespace qk
