// Shared by every source file of every ISA build: scalar conversions, the GEMV's internal arguments,
// and the entry points that each ISA's file provides (exactly one such file per library).
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "qk_abi.h"

// What the compiler flags of this build allow (qwenvl/ops/isa.py chooses the flags per ISA).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QK_AVX2 1
#else
#define QK_AVX2 0
#endif
#if QK_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define QK_AVX512 1
#else
#define QK_AVX512 0
#endif
#if QK_AVX512 && defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
#define QK_BF16 1
#else
#define QK_BF16 0
#endif
#if QK_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define QK_AMX 1
#else
#define QK_AMX 0
#endif
#if QK_AVX2
#include <immintrin.h>
#endif

namespace qk {

// ---------------------------------------------------------------------------------------------
// Scalars

// Every fp16 value as fp32 (256 KB, filled once when the library loads): a scale is one load.
struct HalfTable {
  float value[65536];
  HalfTable();
};
extern const HalfTable kHalf;

inline const float* half_ptr(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return &kHalf.value[h];
}

inline float load_half(const uint8_t* p) { return *half_ptr(p); }

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40);
  return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline void store_as(float* p, float v) { *p = v; }
inline void store_as(uint16_t* p, float v) { *p = float_to_bf16(v); }

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

// exp(x) for x <= 0 (scores minus their maximum), branch-free so that loops over it vectorize:
// 2^n * e^r with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (~2 ulp).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (|.| < 2^22)
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}

// ---------------------------------------------------------------------------------------------
// The GEMV as the ISA files see it: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// Row invariance, the rule every ISA file keeps: every output y[m, n] is computed by the same
// sequence of operations whatever M is (each (x row, w row) pair has its own accumulators, updated
// group by group in the same order and reduced the same way), so a row's result does not depend on
// the rows computed with it.

struct Gemv {
  const float* x;  // [M, K] fp32 (fp32 paths: x converted once per call)
  int64_t M, K;
  const uint16_t* xb;  // [M, ldxb] bf16 (bf16 paths)
  int64_t ldxb;
  const float* xsum;  // sums of x over runs of it, where a path needs them (see the ISA file)
  int64_t ldxs;
  const uint8_t* w;
  int64_t N, row_bytes;
  const float* bias;  // [N] or null
  void* y;
  int64_t ldy;
  int y_bf16;
};

inline Gemv gemv_args(const QkGemv& c) {
  return Gemv{nullptr, c.M, c.K, nullptr, 0, nullptr, 0, c.w, c.N, c.row_bytes, c.bias, c.y, c.ldy, c.y_bf16};
}

inline void store(const Gemv& a, int64_t m, int64_t n, float v) {
  if (a.bias) v += a.bias[n];
  if (a.y_bf16)
    ((uint16_t*)a.y)[m * a.ldy + n] = float_to_bf16(v);
  else
    ((float*)a.y)[m * a.ldy + n] = v;
}

// Output tiles go to the threads in shrinking chunks (OpenMP's guided schedule: the first ones half
// the work, as a static split, so each thread streams through long runs of rows), each to whichever
// thread is free: a thread the OS (or another process) holds back does not hold the others at the end
// of the call. Chunks of no fewer than ~1/16 of a thread's share keep the handing-out cheap.
inline int64_t min_chunk(int64_t tiles, int threads) {
  const int64_t chunk = tiles / ((int64_t)threads * 16);
  return chunk > 0 ? chunk : 1;
}

// fp32 copy of x ([M, K], row stride ldx, fp32 or bf16) into out [M, K]
void load_x(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, float* out);

// value v of column k as fp32, or as `pieces` bf16 parts (part p at p * K + k) summing to it
inline void put_value(void* out, int64_t K, int64_t k, float v, int pieces) {
  if (!pieces) {
    ((float*)out)[k] = v;
    return;
  }
  for (int p = 0; p < pieces; ++p) {
    const uint16_t part = float_to_bf16(v);
    ((uint16_t*)out)[p * K + k] = part;
    v -= bf16_to_float(part);
  }
}

// ---------------------------------------------------------------------------------------------
// attention.cpp, layers.cpp and decoder.cpp (every build; their inner loops use what the build's flags allow)

int decode_attention(const QkDecodeAttention& call);
int rms_norm(const QkRmsNorm& call);
int silu_mul(const QkSiluMul& call);
int decode_step(const QkDecodeStep& call);  // decoder.cpp

// ---------------------------------------------------------------------------------------------
// Provided by the library's ISA file (scalar.cpp, x86/avx2.cpp, x86/avx512.cpp, ...).

int gemv(const QkGemv& call);        // QK_OK or QK_UNSUPPORTED_TYPE
int dequant(const QkDequant& call);  // QK_OK or QK_UNSUPPORTED_TYPE
#if QK_AMX
bool amx_ready();  // x86/amx.cpp: the kernel granted the tile state
#endif

}  // namespace qk
