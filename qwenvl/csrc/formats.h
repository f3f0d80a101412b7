// The GGML formats and their scalar decoders: the reference every ISA path is tested against.
//
// Every decoder gives exactly the fp32 values gguf.quants.dequantize gives (the same operations in
// the same order, or operations whose results are provably the same: a product of an fp16 scale and
// a small code is exact, so d * q + m rounds once whether fused or not).
//
// Each block holds kValues weights in kBytes, read 32 at a time ("groups"). prepare(blk, s) fills the
// scales of every group g of the block; the weights are then
//   w = s.s0[g] * code + s.off[g]     for the group's first 16 weights,
//   w = s.s1[g] * code + s.off1[g]    for its second 16 (s1 == s0, off1 == off but where kHalves),
// where code is the stored code minus kOffset, exactly as gguf computes them.
//   scalar(blk, g, s, out)   the 32 weights of group g as fp32
//   at(row, k)               one value of a float format's row (kFloat formats only)
// kOffset -1 marks formats with a minimum (off != 0); kHalves a scale (and minimum) per 16 weights.
#pragma once

#include "common.h"

namespace qk {

struct Scales {  // of one block's groups; s0 and off adjacent, for one 16-float store
  float s0[8], off[8], s1[8], off1[8];
};

inline void one_scale(Scales* s, float d, float off) {  // the 32-value formats
  s->s0[0] = s->s1[0] = d;
  s->off[0] = s->off1[0] = off;
}

struct Q8_0 {
  static constexpr int kValues = 32, kBytes = 34, kBits = 8, kOffset = 0;
  static constexpr bool kFloat = false, kHalves = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), 0); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    for (int i = 0; i < 32; ++i) out[i] = (float)(int8_t)b[2 + i] * s->s0[0];
  }
};

struct Q4_0 {
  static constexpr int kValues = 32, kBytes = 18, kBits = 4, kOffset = 8;
  static constexpr bool kFloat = false, kHalves = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), 0); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    for (int i = 0; i < 16; ++i) {
      out[i] = s->s0[0] * (float)((b[2 + i] & 0xF) - 8);
      out[i + 16] = s->s0[0] * (float)((b[2 + i] >> 4) - 8);
    }
  }
};

struct Q4_1 {
  static constexpr int kValues = 32, kBytes = 20, kBits = 4, kOffset = -1;
  static constexpr bool kFloat = false, kHalves = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), load_half(b + 2)); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    for (int i = 0; i < 16; ++i) {
      out[i] = s->s0[0] * (float)(b[4 + i] & 0xF) + s->off[0];
      out[i + 16] = s->s0[0] * (float)(b[4 + i] >> 4) + s->off[0];
    }
  }
};

struct Q5_0 {
  static constexpr int kValues = 32, kBytes = 22, kBits = 5, kOffset = 16;
  static constexpr bool kFloat = false, kHalves = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), 0); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    const uint32_t qh = load_u32(b + 2);
    for (int i = 0; i < 16; ++i) {
      out[i] = s->s0[0] * (float)((int)((b[6 + i] & 0xF) | (((qh >> i) & 1) << 4)) - 16);
      out[i + 16] = s->s0[0] * (float)((int)((b[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
    }
  }
};

struct Q5_1 {
  static constexpr int kValues = 32, kBytes = 24, kBits = 5, kOffset = -1;
  static constexpr bool kFloat = false, kHalves = false;
  static void prepare(const uint8_t* b, Scales* s) { one_scale(s, load_half(b), load_half(b + 2)); }
  static void scalar(const uint8_t* b, int, const Scales* s, float* out) {
    const uint32_t qh = load_u32(b + 4);
    for (int i = 0; i < 16; ++i) {
      out[i] = s->s0[0] * (float)((b[8 + i] & 0xF) | (((qh >> i) & 1) << 4)) + s->off[0];
      out[i + 16] = s->s0[0] * (float)((b[8 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) + s->off[0];
    }
  }
};

// Q2_K: 16 bytes of 4-bit scale | 4-bit min pairs (one per 16 weights), 64 bytes of 2-bit codes,
// d, dmin. w = (d * scale) * code - dmin * min.
struct Q2_K {
  static constexpr int kValues = 256, kBytes = 84, kBits = 2, kOffset = -1;
  static constexpr bool kFloat = false, kHalves = true;
  static void prepare(const uint8_t* b, Scales* s) {
    const float d = load_half(b + 80), dmin = load_half(b + 82);
    for (int g = 0; g < 8; ++g) {
      s->s0[g] = d * (float)(b[2 * g] & 0xF);
      s->s1[g] = d * (float)(b[2 * g + 1] & 0xF);
      s->off[g] = -(dmin * (float)(b[2 * g] >> 4));
      s->off1[g] = -(dmin * (float)(b[2 * g + 1] >> 4));
    }
  }
  static void scalar(const uint8_t* b, int g, const Scales* s, float* out) {
    const uint8_t* q = b + 16 + (g / 4) * 32;
    const int shift = (g % 4) * 2;
    for (int i = 0; i < 32; ++i) {
      const float code = (float)((q[i] >> shift) & 3);
      out[i] = i < 16 ? s->s0[g] * code + s->off[g] : s->s1[g] * code + s->off1[g];
    }
  }
};

// Q3_K: 32 bytes of high bits, 64 bytes of 2-bit low codes, 12 bytes of 16 six-bit scales, d.
// w = (d * (scale - 32)) * (code - 4), code = low | high << 2.
struct Q3_K {
  static constexpr int kValues = 256, kBytes = 110, kBits = 3, kOffset = 4;
  static constexpr bool kFloat = false, kHalves = true;
  static int scale(const uint8_t* sc, int j) {  // the 16 scales, unpacked as gguf does
    const int low = j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4;
    const int high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (low | (high << 4)) - 32;
  }
  static void prepare(const uint8_t* b, Scales* s) {
    const float d = load_half(b + 108);
    for (int g = 0; g < 8; ++g) {
      s->s0[g] = d * (float)scale(b + 96, 2 * g);
      s->s1[g] = d * (float)scale(b + 96, 2 * g + 1);
      s->off[g] = s->off1[g] = 0;
    }
  }
  static void scalar(const uint8_t* b, int g, const Scales* s, float* out) {
    const uint8_t* q = b + 32 + (g / 4) * 32;
    const int shift = (g % 4) * 2;
    for (int i = 0; i < 32; ++i) {
      const int code = ((q[i] >> shift) & 3) | (((b[i] >> g) & 1) << 2);
      out[i] = (i < 16 ? s->s0[g] : s->s1[g]) * (float)(code - 4);
    }
  }
};

// Q4_K / Q5_K: d, dmin, then 8 six-bit scales and 8 six-bit mins packed in 12 bytes, unpacked as
// llama.cpp does (bytes 0-7 become the scales, 8-15 the mins)
inline void k_scale_codes(const uint8_t* b, uint8_t q[16]) {
  uint32_t u[4];
  memcpy(u, b + 4, 12);
  u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
  const uint32_t mins_low = u[1] & 0x3f3f3f3f;
  u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
  u[2] = mins_low;
  u[0] &= 0x3f3f3f3f;
  memcpy(q, u, 16);
}

inline void k_scales(const uint8_t* b, Scales* s) {  // s0 = d * scale, off = -(dmin * min): exact
  const float d = load_half(b), dmin = load_half(b + 2);
  uint8_t q[16];
  k_scale_codes(b, q);
  for (int j = 0; j < 8; ++j) {
    s->s0[j] = s->s1[j] = d * (float)q[j];
    s->off[j] = s->off1[j] = -(dmin * (float)q[8 + j]);
  }
}

struct Q4_K {  // d, dmin, 12 bytes of scales, 128 bytes of nibbles
  static constexpr int kValues = 256, kBytes = 144, kBits = 4, kOffset = -1;
  static constexpr bool kFloat = false, kHalves = false;
  static void prepare(const uint8_t* b, Scales* s) { k_scales(b, s); }
  static void scalar(const uint8_t* b, int g, const Scales* s, float* out) {
    const uint8_t* q = b + 16 + (g / 2) * 32;
    const int shift = (g % 2) * 4;
    for (int i = 0; i < 32; ++i) out[i] = s->s0[g] * (float)((q[i] >> shift) & 0xF) + s->off[g];
  }
};

struct Q5_K {  // d, dmin, 12 bytes of scales, 32 bytes of high bits, 128 bytes of nibbles
  static constexpr int kValues = 256, kBytes = 176, kBits = 5, kOffset = -1;
  static constexpr bool kFloat = false, kHalves = false;
  static void prepare(const uint8_t* b, Scales* s) { k_scales(b, s); }
  static void scalar(const uint8_t* b, int g, const Scales* s, float* out) {
    const uint8_t* qh = b + 16;
    const uint8_t* q = b + 48 + (g / 2) * 32;
    const int shift = (g % 2) * 4;
    for (int i = 0; i < 32; ++i) {
      const int q5 = ((q[i] >> shift) & 0xF) | (((qh[i] >> g) & 1) << 4);
      out[i] = s->s0[g] * (float)q5 + s->off[g];
    }
  }
};

struct Q6_K {  // 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales, d
  static constexpr int kValues = 256, kBytes = 210, kBits = 6, kOffset = 32;
  static constexpr bool kFloat = false, kHalves = true;
  static void prepare(const uint8_t* b, Scales* s) {  // s0[g], s1[g]: d times scales 2g, 2g + 1 (exact)
    const float d = load_half(b + 208);
    for (int g = 0; g < 8; ++g) {
      s->s0[g] = d * (float)(int8_t)b[192 + 2 * g];
      s->s1[g] = d * (float)(int8_t)b[193 + 2 * g];
      s->off[g] = s->off1[g] = 0;
    }
  }
  static void scalar(const uint8_t* b, int g, const Scales* s, float* out) {
    const int half = g / 4, part = g % 4;
    const uint8_t* ql = b + half * 64 + (part % 2) * 32;
    const uint8_t* qh = b + 128 + half * 32;
    const int lshift = (part / 2) * 4, hshift = part * 2;
    for (int i = 0; i < 32; ++i) {
      const int q = (((ql[i] >> lshift) & 0xF) | (((qh[i] >> hshift) & 3) << 4)) - 32;
      out[i] = (i < 16 ? s->s0[g] : s->s1[g]) * (float)q;
    }
  }
};

// The float formats have no blocks (GGML's block size is 1): rows of any length K. Their kernels read
// them 32 values at a time like the block formats and take the last K % 32 values one by one, with
// at(row, k). The block formats' K is always a multiple of kValues.
struct F16 {
  static constexpr int kValues = 32, kBytes = 64, kBits = 0, kOffset = 0;
  static constexpr bool kFloat = true, kHalves = false;
  static float at(const uint8_t* row, int64_t k) { return load_half(row + 2 * k); }
  static void prepare(const uint8_t*, Scales*) {}
  static void scalar(const uint8_t* b, int, const Scales*, float* out) {
    for (int i = 0; i < 32; ++i) out[i] = at(b, i);
  }
};

struct BF16 {
  static constexpr int kValues = 32, kBytes = 64, kBits = 0, kOffset = 0;
  static constexpr bool kFloat = true, kHalves = false;
  static float at(const uint8_t* row, int64_t k) {
    uint16_t v;
    memcpy(&v, row + 2 * k, 2);
    return bf16_to_float(v);
  }
  static void prepare(const uint8_t*, Scales*) {}
  static void scalar(const uint8_t* b, int, const Scales*, float* out) {
    for (int i = 0; i < 32; ++i) out[i] = at(b, i);
  }
};

struct F32 {
  static constexpr int kValues = 32, kBytes = 128, kBits = 0, kOffset = 0;
  static constexpr bool kFloat = true, kHalves = false;
  static float at(const uint8_t* row, int64_t k) {
    float v;
    memcpy(&v, row + 4 * k, 4);
    return v;
  }
  static void prepare(const uint8_t*, Scales*) {}
  static void scalar(const uint8_t* b, int, const Scales*, float* out) { memcpy(out, b, 128); }
};

// sum of w[k] * x[k] over the last K % 32 values of a float format's row, in order (0 for the
// block formats, whose K is a multiple of kValues)
template <class F>
inline float tail_dot(const uint8_t* w, const float* x, int64_t K) {
  float sum = 0.0f;
  if constexpr (F::kFloat)
    for (int64_t k = K / 32 * 32; k < K; ++k) sum += F::at(w, k) * x[k];
  return sum;
}

// the last K % 32 values of a float format's row (nothing for the block formats), as put_value does
template <class F>
inline void tail_values(const uint8_t* row, int64_t K, void* out, int pieces) {
  if constexpr (F::kFloat)
    for (int64_t k = K / 32 * 32; k < K; ++k) put_value(out, K, k, F::at(row, k), pieces);
}

// dispatch(type, fn): fn(Format<F>{}) for the format of GGMLQuantizationType `type`, then QK_OK;
// QK_UNSUPPORTED_TYPE for the others.
template <class F>
struct Format {
  using type = F;
};

template <class Fn>
int dispatch(int type, Fn&& fn) {
  switch (type) {  // GGMLQuantizationType values
    case 0: fn(Format<F32>{}); return QK_OK;
    case 1: fn(Format<F16>{}); return QK_OK;
    case 2: fn(Format<Q4_0>{}); return QK_OK;
    case 3: fn(Format<Q4_1>{}); return QK_OK;
    case 6: fn(Format<Q5_0>{}); return QK_OK;
    case 7: fn(Format<Q5_1>{}); return QK_OK;
    case 8: fn(Format<Q8_0>{}); return QK_OK;
    case 10: fn(Format<Q2_K>{}); return QK_OK;
    case 11: fn(Format<Q3_K>{}); return QK_OK;
    case 12: fn(Format<Q4_K>{}); return QK_OK;
    case 13: fn(Format<Q5_K>{}); return QK_OK;
    case 14: fn(Format<Q6_K>{}); return QK_OK;
    case 30: fn(Format<BF16>{}); return QK_OK;
    default: return QK_UNSUPPORTED_TYPE;
  }
}

inline bool supported(int type) {
  return dispatch(type, [](auto) {}) == QK_OK;
}

}  // namespace qk
