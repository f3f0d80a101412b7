// NEON decoders for the AArch64 path (arm/neon.cpp): each gives exactly the values of the formats'
// scalar decoders (formats.h), four lanes at a time, by the same operations (a product, then a sum,
// never fused: the library is built with -ffp-contract=off).
//
// vec<F>(blk, g, s, v): the 32 weights of group g as v[0..7], weight 4j + i in lane i of v[j].
#pragma once

#include "../formats.h"

#if !defined(__aarch64__) || !defined(__ARM_NEON)
#error "arm/neon.h is for AArch64 (Advanced SIMD)"
#endif

#include <arm_neon.h>

namespace qk {
namespace neon {

// 16 small integers as 4 x 4 fp32 (exact)
inline void u8_to_f32(uint8x16_t v, float32x4_t* out) {
  const uint16x8_t lo = vmovl_u8(vget_low_u8(v)), hi = vmovl_high_u8(v);
  out[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
  out[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
  out[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
  out[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

inline void s8_to_f32(int8x16_t v, float32x4_t* out) {
  const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_high_s8(v);
  out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  out[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
  out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  out[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

// v[j] = scale * v[j] (+ offset), for 4 vectors (16 weights): the scalar decoders' operations
inline void scale4(float32x4_t* v, float scale) {
  for (int j = 0; j < 4; ++j) v[j] = vmulq_n_f32(v[j], scale);
}

inline void affine4(float32x4_t* v, float scale, float offset) {
  const float32x4_t m = vdupq_n_f32(offset);
  for (int j = 0; j < 4; ++j) v[j] = vaddq_f32(vmulq_n_f32(v[j], scale), m);
}

// 32 signed codes (two vectors of 16) times one scale per 16 of them
inline void signed32(int8x16_t c0, int8x16_t c1, float s0, float s1, float32x4_t* v) {
  s8_to_f32(c0, v);
  s8_to_f32(c1, v + 4);
  scale4(v, s0);
  scale4(v + 4, s1);
}

// 32 unsigned codes times a scale plus an offset per 16 of them
inline void affine32(uint8x16_t c0, uint8x16_t c1, float s0, float m0, float s1, float m1, float32x4_t* v) {
  u8_to_f32(c0, v);
  u8_to_f32(c1, v + 4);
  affine4(v, s0, m0);
  affine4(v + 4, s1, m1);
}

inline uint8x16_t low_nibbles(uint8x16_t v) { return vandq_u8(v, vdupq_n_u8(0xF)); }
inline uint8x16_t high_nibbles(uint8x16_t v) { return vshrq_n_u8(v, 4); }

// byte i = `value` where bit i of the 16 bits is set, else 0
inline uint8x16_t bits_to_bytes(uint32_t bits, uint8_t value) {
  const uint8x16_t spread = vcombine_u8(vdup_n_u8((uint8_t)bits), vdup_n_u8((uint8_t)(bits >> 8)));
  const uint8x16_t lanes = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  return vandq_u8(vtstq_u8(spread, lanes), vdupq_n_u8(value));
}

// byte i = `value` where bit `bit` of byte i of p is set (16 bytes)
inline uint8x16_t bit_of_bytes(const uint8_t* p, int bit, uint8_t value) {
  return vandq_u8(vtstq_u8(vld1q_u8(p), vdupq_n_u8((uint8_t)(1 << bit))), vdupq_n_u8(value));
}

// the bytes of p shifted right by `shift` (0-7) and masked
inline uint8x16_t field(const uint8_t* p, int shift, uint8_t mask) {
  return vandq_u8(vshlq_u8(vld1q_u8(p), vdupq_n_s8((int8_t)-shift)), vdupq_n_u8(mask));
}

inline int8x16_t minus(uint8x16_t codes, uint8_t offset) {  // codes - offset as int8 (|.| < 128)
  return vreinterpretq_s8_u8(vsubq_u8(codes, vdupq_n_u8(offset)));
}

template <class F>
inline void vec(const uint8_t* b, int g, const Scales& s, float32x4_t* v);

template <>
inline void vec<Q8_0>(const uint8_t* b, int, const Scales& s, float32x4_t* v) {
  signed32(vld1q_s8((const int8_t*)(b + 2)), vld1q_s8((const int8_t*)(b + 18)), s.s0[0], s.s0[0], v);
}

template <>
inline void vec<Q4_0>(const uint8_t* b, int, const Scales& s, float32x4_t* v) {
  const uint8x16_t q = vld1q_u8(b + 2);
  signed32(minus(low_nibbles(q), 8), minus(high_nibbles(q), 8), s.s0[0], s.s0[0], v);
}

template <>
inline void vec<Q4_1>(const uint8_t* b, int, const Scales& s, float32x4_t* v) {
  const uint8x16_t q = vld1q_u8(b + 4);
  affine32(low_nibbles(q), high_nibbles(q), s.s0[0], s.off[0], s.s0[0], s.off[0], v);
}

template <>
inline void vec<Q5_0>(const uint8_t* b, int, const Scales& s, float32x4_t* v) {
  const uint32_t qh = load_u32(b + 2);
  const uint8x16_t q = vld1q_u8(b + 6);
  const uint8x16_t lo = vorrq_u8(low_nibbles(q), bits_to_bytes(qh, 16));
  const uint8x16_t hi = vorrq_u8(high_nibbles(q), bits_to_bytes(qh >> 16, 16));
  signed32(minus(lo, 16), minus(hi, 16), s.s0[0], s.s0[0], v);
}

template <>
inline void vec<Q5_1>(const uint8_t* b, int, const Scales& s, float32x4_t* v) {
  const uint32_t qh = load_u32(b + 4);
  const uint8x16_t q = vld1q_u8(b + 8);
  const uint8x16_t lo = vorrq_u8(low_nibbles(q), bits_to_bytes(qh, 16));
  const uint8x16_t hi = vorrq_u8(high_nibbles(q), bits_to_bytes(qh >> 16, 16));
  affine32(lo, hi, s.s0[0], s.off[0], s.s0[0], s.off[0], v);
}

template <>
inline void vec<Q2_K>(const uint8_t* b, int g, const Scales& s, float32x4_t* v) {
  const uint8_t* q = b + 16 + (g / 4) * 32;
  const int shift = (g % 4) * 2;
  affine32(field(q, shift, 3), field(q + 16, shift, 3), s.s0[g], s.off[g], s.s1[g], s.off1[g], v);
}

template <>
inline void vec<Q3_K>(const uint8_t* b, int g, const Scales& s, float32x4_t* v) {
  const uint8_t* q = b + 32 + (g / 4) * 32;
  const int shift = (g % 4) * 2;
  const uint8x16_t c0 = vorrq_u8(field(q, shift, 3), bit_of_bytes(b, g, 4));
  const uint8x16_t c1 = vorrq_u8(field(q + 16, shift, 3), bit_of_bytes(b + 16, g, 4));
  signed32(minus(c0, 4), minus(c1, 4), s.s0[g], s.s1[g], v);
}

template <>
inline void vec<Q4_K>(const uint8_t* b, int g, const Scales& s, float32x4_t* v) {
  const uint8_t* q = b + 16 + (g / 2) * 32;
  const int shift = (g % 2) * 4;
  affine32(field(q, shift, 0xF), field(q + 16, shift, 0xF), s.s0[g], s.off[g], s.s0[g], s.off[g], v);
}

template <>
inline void vec<Q5_K>(const uint8_t* b, int g, const Scales& s, float32x4_t* v) {
  const uint8_t* q = b + 48 + (g / 2) * 32;
  const int shift = (g % 2) * 4;
  const uint8x16_t c0 = vorrq_u8(field(q, shift, 0xF), bit_of_bytes(b + 16, g, 16));
  const uint8x16_t c1 = vorrq_u8(field(q + 16, shift, 0xF), bit_of_bytes(b + 32, g, 16));
  affine32(c0, c1, s.s0[g], s.off[g], s.s0[g], s.off[g], v);
}

template <>
inline void vec<Q6_K>(const uint8_t* b, int g, const Scales& s, float32x4_t* v) {
  const int half = g / 4, part = g % 4;
  const uint8_t* ql = b + half * 64 + (part % 2) * 32;
  const uint8_t* qh = b + 128 + half * 32;
  const int lshift = (part / 2) * 4, hshift = part * 2;
  uint8x16_t c[2];
  for (int h = 0; h < 2; ++h)
    c[h] = vorrq_u8(field(ql + 16 * h, lshift, 0xF), vshlq_n_u8(field(qh + 16 * h, hshift, 3), 4));
  signed32(minus(c[0], 32), minus(c[1], 32), s.s0[g], s.s1[g], v);
}

template <>
inline void vec<F16>(const uint8_t* b, int, const Scales&, float32x4_t* v) {
  for (int j = 0; j < 8; ++j) v[j] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t*)(b + 8 * j))));
}

inline float32x4_t bf16_to_f32(uint16x4_t v) { return vreinterpretq_f32_u32(vshll_n_u16(v, 16)); }

template <>
inline void vec<BF16>(const uint8_t* b, int, const Scales&, float32x4_t* v) {
  for (int j = 0; j < 8; ++j) v[j] = bf16_to_f32(vld1_u16((const uint16_t*)(b + 8 * j)));
}

template <>
inline void vec<F32>(const uint8_t* b, int, const Scales&, float32x4_t* v) {
  for (int j = 0; j < 8; ++j) v[j] = vld1q_f32((const float*)(b + 16 * j));
}

// float_to_bf16 (common.h) four lanes at a time: round to nearest even, NaN stays NaN
inline uint16x4_t f32_to_bf16(float32x4_t v) {
  const uint32x4_t bits = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
  const uint32x4_t rounded = vshrq_n_u32(vaddq_u32(bits, vaddq_u32(lsb, vdupq_n_u32(0x7FFF))), 16);
  const uint32x4_t quiet = vorrq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(0x40));
  const uint32x4_t nan = vcgtq_u32(vandq_u32(bits, vdupq_n_u32(0x7FFFFFFF)), vdupq_n_u32(0x7F800000));
  return vmovn_u32(vbslq_u32(nan, quiet, rounded));
}

}  // namespace neon
}  // namespace qk
