// The activation-quantizing GEMM (q8.h): quantizing x, splitting the weight formats into integer
// codes and scales, the scalar reference tile, and the call that tiles the output over the threads.
// The tile of the build's ISA (x86/q8_avx2.cpp where AVX2 is compiled in) does the arithmetic; the
// quantization and the splits are this file's, shared by every build (integer work, and fp32 values
// copied, never computed: the same bits everywhere).
#include "q8.h"

#include <algorithm>

namespace qk {
namespace q8 {

namespace {

// ---------------------------------------------------------------------------------------------
// x: per 32 values, dx = amax / 127 and q = round-half-even(x * (1 / dx)) (0 where amax is 0)

void quantize_row(const float* x, int64_t K, Activations* a, int64_t m) {
  int8_t* q = a->q.data() + m * a->groups * 32;
  for (int64_t g = 0; g < K / 32; ++g) {
    const float* xg = x + g * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int32_t s0 = 0, s1 = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = (int)std::nearbyint(xg[i] * id);  // the default rounding: half to even
      q[g * 32 + i] = (int8_t)v;
      (i < 16 ? s0 : s1) += v;
    }
    a->dx[m * a->groups + g] = d;
    a->qs0[m * a->groups + g] = s0;
    a->qs1[m * a->groups + g] = s1;
  }
}

}  // namespace

Activations quantize(const QkGemv& c, int threads) {
  Activations a;
  a.M = c.M;
  a.groups = padded_groups(c.K), a.real = c.K / 32;
  a.q.assign((size_t)(c.M * a.groups * 32), 0);
  a.dx.assign((size_t)(c.M * a.groups), 0.0f);
  a.qs0.assign((size_t)(c.M * a.groups), 0);
  a.qs1.assign((size_t)(c.M * a.groups), 0);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> row((size_t)c.K);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < c.M; ++m) {
      const uint8_t* src = (const uint8_t*)c.x + m * c.ldx * (c.x_bf16 ? 2 : 4);
      load_x(src, c.x_bf16, 1, c.K, c.ldx, row.data());
      quantize_row(row.data(), c.K, &a, m);
    }
  }
  return a;
}

namespace {

// ---------------------------------------------------------------------------------------------
// The weight formats split as q8.h writes them: codes(b, g, out) the 32 codes of group g,
// scales(b, g, s) its scales.

struct Split {  // code offsets are applied by split_rows (wo = -offset * ws, imin = isc)
  int isc0 = 1, isc1 = 1, imin0 = 0, imin1 = 0;
  float ws = 0, wo = 0;
};

template <class F>
struct Q8Format;

template <>
struct Q8Format<Q4_0> {
  static constexpr Traits kTraits{false, false, true, false};
  static constexpr int kOffset = 8;
  static void codes(const uint8_t* b, int, uint8_t* out) {
    for (int i = 0; i < 16; ++i) out[i] = b[2 + i] & 0xF, out[i + 16] = b[2 + i] >> 4;
  }
  static void scales(const uint8_t* b, int, Split* s) { s->ws = load_half(b); }
};

template <>
struct Q8Format<Q4_1> {
  static constexpr Traits kTraits{false, false, true, false};
  static constexpr int kOffset = 0;
  static void codes(const uint8_t* b, int, uint8_t* out) {
    for (int i = 0; i < 16; ++i) out[i] = b[4 + i] & 0xF, out[i + 16] = b[4 + i] >> 4;
  }
  static void scales(const uint8_t* b, int, Split* s) {
    s->ws = load_half(b), s->wo = load_half(b + 2), s->imin0 = s->imin1 = 1;
  }
};

inline void five_bit_codes(const uint8_t* qs, uint32_t qh, uint8_t* out) {
  for (int i = 0; i < 16; ++i) {
    out[i] = (uint8_t)((qs[i] & 0xF) | (((qh >> i) & 1) << 4));
    out[i + 16] = (uint8_t)((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
  }
}

template <>
struct Q8Format<Q5_0> {
  static constexpr Traits kTraits{false, false, true, false};
  static constexpr int kOffset = 16;
  static void codes(const uint8_t* b, int, uint8_t* out) { five_bit_codes(b + 6, load_u32(b + 2), out); }
  static void scales(const uint8_t* b, int, Split* s) { s->ws = load_half(b); }
};

template <>
struct Q8Format<Q5_1> {
  static constexpr Traits kTraits{false, false, true, false};
  static constexpr int kOffset = 0;
  static void codes(const uint8_t* b, int, uint8_t* out) { five_bit_codes(b + 8, load_u32(b + 4), out); }
  static void scales(const uint8_t* b, int, Split* s) {
    s->ws = load_half(b), s->wo = load_half(b + 2), s->imin0 = s->imin1 = 1;
  }
};

template <>
struct Q8Format<Q8_0> {
  static constexpr Traits kTraits{true, false, false, false};
  static constexpr int kOffset = 0;
  static void codes(const uint8_t* b, int, uint8_t* out) { memcpy(out, b + 2, 32); }
  static void scales(const uint8_t* b, int, Split* s) { s->ws = load_half(b); }
};

template <>
struct Q8Format<Q2_K> {  // w = (d * sc) * code - dmin * min, per 16
  static constexpr Traits kTraits{false, true, true, true};
  static constexpr int kOffset = 0;
  static void codes(const uint8_t* b, int g, uint8_t* out) {
    const uint8_t* q = b + 16 + (g / 4) * 32;
    for (int i = 0; i < 32; ++i) out[i] = (q[i] >> ((g % 4) * 2)) & 3;
  }
  static void scales(const uint8_t* b, int g, Split* s) {
    s->isc0 = b[2 * g] & 0xF, s->isc1 = b[2 * g + 1] & 0xF;
    s->imin0 = b[2 * g] >> 4, s->imin1 = b[2 * g + 1] >> 4;
    s->ws = load_half(b + 80), s->wo = -load_half(b + 82);
  }
};

template <>
struct Q8Format<Q3_K> {  // w = (d * (scale - 32)) * (code - 4), per 16
  static constexpr Traits kTraits{false, true, true, true};
  static constexpr int kOffset = 4;
  static void codes(const uint8_t* b, int g, uint8_t* out) {
    const uint8_t* q = b + 32 + (g / 4) * 32;
    for (int i = 0; i < 32; ++i) out[i] = (uint8_t)(((q[i] >> ((g % 4) * 2)) & 3) | (((b[i] >> g) & 1) << 2));
  }
  static void scales(const uint8_t* b, int g, Split* s) {
    s->isc0 = Q3_K::scale(b + 96, 2 * g), s->isc1 = Q3_K::scale(b + 96, 2 * g + 1);
    s->ws = load_half(b + 108);
  }
};

inline void k_split(const uint8_t* b, int g, Split* s) {  // Q4_K / Q5_K: per 32, 6-bit scale and min
  uint8_t q[16];
  k_scale_codes(b, q);
  s->isc0 = s->isc1 = q[g], s->imin0 = s->imin1 = q[8 + g];
  s->ws = load_half(b), s->wo = -load_half(b + 2);
}

template <>
struct Q8Format<Q4_K> {
  static constexpr Traits kTraits{false, true, true, false};
  static constexpr int kOffset = 0;
  static void codes(const uint8_t* b, int g, uint8_t* out) {
    const uint8_t* q = b + 16 + (g / 2) * 32;
    for (int i = 0; i < 32; ++i) out[i] = (q[i] >> ((g % 2) * 4)) & 0xF;
  }
  static void scales(const uint8_t* b, int g, Split* s) { k_split(b, g, s); }
};

template <>
struct Q8Format<Q5_K> {
  static constexpr Traits kTraits{false, true, true, false};
  static constexpr int kOffset = 0;
  static void codes(const uint8_t* b, int g, uint8_t* out) {
    const uint8_t *qh = b + 16, *q = b + 48 + (g / 2) * 32;
    for (int i = 0; i < 32; ++i) out[i] = (uint8_t)(((q[i] >> ((g % 2) * 4)) & 0xF) | (((qh[i] >> g) & 1) << 4));
  }
  static void scales(const uint8_t* b, int g, Split* s) { k_split(b, g, s); }
};

template <>
struct Q8Format<Q6_K> {  // w = (d * scale) * (code - 32), per 16, int8 scales
  static constexpr Traits kTraits{false, true, true, true};
  static constexpr int kOffset = 32;
  static void codes(const uint8_t* b, int g, uint8_t* out) {
    const int half = g / 4, part = g % 4;
    const uint8_t *ql = b + half * 64 + (part % 2) * 32, *qh = b + 128 + half * 32;
    for (int i = 0; i < 32; ++i)
      out[i] = (uint8_t)(((ql[i] >> ((part / 2) * 4)) & 0xF) | (((qh[i] >> (part * 2)) & 3) << 4));
  }
  static void scales(const uint8_t* b, int g, Split* s) {
    s->isc0 = (int8_t)b[192 + 2 * g], s->isc1 = (int8_t)b[193 + 2 * g];
    s->ws = load_half(b + 208);
  }
};

template <class F>
constexpr bool kHasSplit = !F::kFloat;

// Rows [n0, n0 + rows) of W split into the panel (resized to fit; padding groups zero).
template <class F>
void split_rows(const QkGemv& c, int64_t n0, int64_t rows, Panel* p) {
  const int64_t Gp = padded_groups(c.K), G = c.K / 32;
  p->rows = rows, p->groups = Gp, p->real = G;
  p->codes.assign((size_t)(rows * Gp * 32), 0);
  p->isc16.assign((size_t)(rows * Gp * 16), 0);
  for (auto* v : {&p->imin0, &p->imin1}) v->assign((size_t)(rows * Gp), 0);
  for (auto* v : {&p->ws, &p->wo}) v->assign((size_t)(rows * Gp), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = c.w + (n0 + r) * c.row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = row + (g * 32 / F::kValues) * F::kBytes;
      const int sub = (int)(g % (F::kValues / 32));
      const int64_t at = r * Gp + g;
      Q8Format<F>::codes(b, sub, p->codes.data() + at * 32);
      Split s;
      Q8Format<F>::scales(b, sub, &s);
      if (Q8Format<F>::kOffset) {  // ws * isc * (code - offset) = ws * isc * code + (-offset * ws) * isc
        s.wo = -(float)Q8Format<F>::kOffset * s.ws;  // exact: a power of two times an fp16 value
        s.imin0 = s.isc0, s.imin1 = s.isc1;
      }
      p->imin0[at] = s.imin0, p->imin1[at] = s.imin1;
      p->ws[at] = s.ws, p->wo[at] = s.wo;
      for (int i = 0; i < 8; ++i) p->isc16[at * 16 + i] = (int16_t)s.isc0, p->isc16[at * 16 + 8 + i] = (int16_t)s.isc1;
    }
  }
}

constexpr int64_t kTileRows = 16;  // W rows per panel (split once, used by every x row)

template <class F>
void gemm_format(const QkGemv& c, TileKernel tile) {
  const Activations x = quantize(c, c.threads);
  const Gemv out = gemv_args(c);
  const Traits traits = Q8Format<F>::kTraits;
  const int64_t tiles = (c.N + kTileRows - 1) / kTileRows;
#pragma omp parallel num_threads(c.threads)
  {
    Panel panel;
#pragma omp for schedule(guided, min_chunk(tiles, c.threads))
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * kTileRows, rows = std::min(kTileRows, c.N - n0);
      split_rows<F>(c, n0, rows, &panel);
      tile(x, panel, traits, 0, c.M, n0, out);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The reference tile: q8.h's arithmetic, one (x row, w row) pair at a time.

inline float sum8(const float* a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

void tile_scalar(const Activations& x, const Panel& p, const Traits& t, int64_t m0, int64_t m1, int64_t n0,
                 const Gemv& out) {
  const int64_t Gp = p.groups;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t r = 0; r < p.rows; ++r) {
      float acc_d[kLanes] = {0}, acc_m[kLanes] = {0};
      for (int64_t g = 0; g < Gp; ++g) {
        const int8_t* q = x.codes(m) + g * 32;
        const int64_t xa = m * Gp + g, wa = r * Gp + g;
        const uint8_t* code = p.codes.data() + wa * 32;
        const float s = x.dx[xa] * p.ws[wa];
        for (int j = 0; j < kLanes && g < p.real; ++j) {
          int32_t lane = 0;
          for (int i = 4 * j; i < 4 * j + 4; ++i) lane += (t.is_signed ? (int32_t)(int8_t)code[i] : (int32_t)code[i]) * q[i];
          acc_d[j] = std::fma(s, (float)(lane * p.isc16[wa * 16 + 2 * j]), acc_d[j]);
        }
        if (t.mins) {
          const int32_t mi = p.imin0[wa] * x.qs0[xa] + p.imin1[wa] * x.qs1[xa];
          acc_m[g % kLanes] = std::fma(x.dx[xa] * p.wo[wa], (float)mi, acc_m[g % kLanes]);
        }
      }
      store(out, m, n0 + r, sum8(acc_d) + sum8(acc_m));
    }
}

// ---------------------------------------------------------------------------------------------
// The reference GEMV: q8.h's arithmetic for one (x row, w row) pair, each group split from its
// stored block as split_rows splits it (so the same integers and fp32 factors as gemm_q8's).

template <class F>
float dot_row(const Activations& x, int64_t m, const uint8_t* row, const Traits& t) {
  float acc_d[kLanes] = {0}, acc_m[kLanes] = {0};
  uint8_t code[32];
  for (int64_t g = 0; g < x.real; ++g) {
    const uint8_t* b = row + (g * 32 / F::kValues) * F::kBytes;
    const int sub = (int)(g % (F::kValues / 32));
    Q8Format<F>::codes(b, sub, code);
    Split s;
    Q8Format<F>::scales(b, sub, &s);
    if (Q8Format<F>::kOffset) {
      s.wo = -(float)Q8Format<F>::kOffset * s.ws;
      s.imin0 = s.isc0, s.imin1 = s.isc1;
    }
    const int64_t xa = m * x.groups + g;
    const int8_t* q = x.codes(m) + g * 32;
    const float scale = x.dx[xa] * s.ws;
    for (int j = 0; j < kLanes; ++j) {
      int32_t lane = 0;
      for (int i = 4 * j; i < 4 * j + 4; ++i) lane += (t.is_signed ? (int32_t)(int8_t)code[i] : (int32_t)code[i]) * q[i];
      acc_d[j] = std::fma(scale, (float)(lane * (j < kLanes / 2 ? s.isc0 : s.isc1)), acc_d[j]);
    }
    if (t.mins) {
      const int32_t mi = s.imin0 * x.qs0[xa] + s.imin1 * x.qs1[xa];
      acc_m[g % kLanes] = std::fma(x.dx[xa] * s.wo, (float)mi, acc_m[g % kLanes]);
    }
  }
  return sum8(acc_d) + sum8(acc_m);
}

void rows_scalar(const Activations& x, const QkGemv& c, const Gemv& out, int64_t n0, int64_t n1) {
  dispatch(c.type, [&](auto format) {
    using F = typename decltype(format)::type;
    if constexpr (kHasSplit<F>)
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < x.M; ++m) store(out, m, n, dot_row<F>(x, m, c.w + n * c.row_bytes, Q8Format<F>::kTraits));
  });
}

}  // namespace q8

bool q8_supported(int type) {
  bool found = false;
  dispatch(type, [&](auto format) { found = q8::kHasSplit<typename decltype(format)::type>; });
  return found;
}

constexpr int64_t kGemvChunk = 16;  // W rows per OpenMP work item of the GEMV

int gemv_q8(const QkGemv& c) {
  if (!q8_supported(c.type)) return QK_UNSUPPORTED_TYPE;
  const q8::Activations x = q8::quantize(c, 1);  // a few rows: not worth a parallel region
  const Gemv out = gemv_args(c);
  const int64_t chunks = (c.N + kGemvChunk - 1) / kGemvChunk;
#pragma omp parallel for num_threads(c.threads) schedule(guided, min_chunk(chunks, c.threads)) if (c.threads > 1)
  for (int64_t t = 0; t < chunks; ++t) {
    const int64_t n0 = t * kGemvChunk, n1 = std::min(c.N, n0 + kGemvChunk);
#if QK_AVX2
    if (q8::rows_avx2(x, c, out, n0, n1)) continue;
#endif
    q8::rows_scalar(x, c, out, n0, n1);
  }
  return QK_OK;
}

int gemm_q8(const QkGemv& c) {
#if QK_AVX2
  const q8::TileKernel tile = q8::tile_avx2;
#else
  const q8::TileKernel tile = q8::tile_scalar;
#endif
  if (!q8_supported(c.type)) return QK_UNSUPPORTED_TYPE;
  return dispatch(c.type, [&](auto format) {
    using F = typename decltype(format)::type;
    if constexpr (q8::kHasSplit<F>) q8::gemm_format<F>(c, tile);
  });
}

}  // namespace qk

extern "C" {

int qk_gemm_q8(const QkGemv* call) { return qk::gemm_q8(*call); }

int qk_gemv_q8(const QkGemv* call) { return qk::gemv_q8(*call); }

int qk_q8_supports(int32_t type) { return qk::q8_supported(type); }
}
