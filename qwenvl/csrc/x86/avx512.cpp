// The AVX-512 path (F/BW/VL/DQ, with AVX2/FMA/F16C): fp32 x with two FMAs per 32 exact weights;
// with AVX512-BF16 + VBMI2 also the bf16 dot path for bf16 x and the small-code formats. The AMX
// build compiles this file too, with x86/amx.cpp beside it.
#include "avx512.h"

#if QK_AMX
#include "amx.h"
#endif

namespace qk {

namespace {

using namespace x512;

// NR output rows of w against MB (<= 16) rows of fp32 x starting at m0: each group of each w row
// is decoded once (two zmm of exact fp32 weights) for all MB rows; per x row two FMAs into the
// pair's accumulator.
template <class F, int NR, int MB>
void gemv_tile_f32(const Gemv& a, int64_t n, int64_t m0) {
  constexpr int G = F::kValues / 32;
  __m512 acc[NR][MB];
  Scales s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const float* x = a.x + m0 * a.K;
  for (int64_t blk = 0; blk < a.K / F::kValues; ++blk) {
    const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
    prefetch_next_tile<F, NR>(row, a.row_bytes);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) prepare<F>(row + r * a.row_bytes, &s[r]);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const float* xg = x + blk * F::kValues + g * 32;
      __m512 w0[NR], w1[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) vec<F>(row + r * a.row_bytes, g, s[r], w0[r], w1[r]);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const __m512 x0 = _mm512_loadu_ps(xg + m * a.K), x1 = _mm512_loadu_ps(xg + m * a.K + 16);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w1[r], x1, _mm512_fmadd_ps(w0[r], x0, acc[r][m]));
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const float tail = tail_dot<F>(a.w + (n + r) * a.row_bytes, x + m * a.K, a.K);
      store(a, m0 + m, n + r, _mm512_reduce_add_ps(acc[r][m]) + tail);
    }
}

// w rows per tile for MB x rows: up to 16 accumulators
constexpr int tile_rows(int mb) { return mb <= 4 ? 4 : mb <= 8 ? 2 : 1; }

// rows of x per pass over w (each pass decodes w once): more rows share the decoding, fewer keep
// the fp32 x rows in L1
constexpr int kChunkRows = 8;

template <class F, int MB, bool DOT>
void gemv_pass(const Gemv& a, int64_t m0, int threads);

template <class F, int MB, bool DOT>
void gemv_chunk(const Gemv& a, int64_t m0, int64_t rows, int threads) {  // rows <= MB
  if constexpr (MB > 1) {
    if (rows < MB) {
      gemv_chunk<F, MB - 1, DOT>(a, m0, rows, threads);
      return;
    }
  }
  gemv_pass<F, MB, DOT>(a, m0, threads);
}

template <class F, bool DOT>
void gemv_all(const Gemv& a, int threads) {
  constexpr int C = DOT ? 16 : kChunkRows;
  for (int64_t m0 = 0; m0 < a.M; m0 += C) gemv_chunk<F, C, DOT>(a, m0, a.M - m0 < C ? a.M - m0 : C, threads);
}

#if QK_BF16
// NR output rows of w against MB (<= 16) rows of bf16 x starting at m0: each group of each w row
// is decoded once for all MB rows; per x row one vdpbf16ps and one FMA by the scale. Formats with
// a minimum add off * (the group's sum of x), for all MB rows at once (lanes = x rows).
template <class F, int NR, int MB>
void gemv_tile_dot(const Gemv& a, int64_t n, int64_t m0) {
  constexpr bool kMin = F::kOffset < 0, kSixBits = F::kBits == 6;
  constexpr int G = F::kValues / 32;
  __m512 acc[NR][MB], acc_min[NR];
  Scales s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    acc_min[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  const DotWeights<F> weights;
  const uint16_t* x = a.xb + m0 * a.ldxb;
  for (int64_t blk = 0; blk < a.K / F::kValues; ++blk) {
    const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
    prefetch_next_tile<F, NR>(row, a.row_bytes);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) prepare<F>(row + r * a.row_bytes, &s[r]);
    if constexpr (kSixBits) {  // the 64 + 32 off every weight: -96 * scale times x's sums over 16
      __m512 minus[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) minus[r] = q6k_minus(row + r * a.row_bytes);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const __m512 sums = _mm512_loadu_ps(a.xsum + (m0 + m) * a.ldxs + blk * 16);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(minus[r], sums, acc[r][m]);
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const int64_t k = blk * F::kValues + g * 32;
      __m512i w[NR];
      __m512 scale[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        w[r] = weights(row + r * a.row_bytes, g);
        scale[r] = bf16_scale<F>(s[r], g);
      }
      if constexpr (kMin) {
        const __m512 xsum = _mm512_loadu_ps(a.xsum + (k / 32) * a.ldxs + m0);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) acc_min[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r].off[g]), xsum, acc_min[r]);
      }
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + m * a.ldxb + k));
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          const __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[r], xv);
          acc[r][m] = _mm512_fmadd_ps(scale[r], dot, acc[r][m]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    alignas(64) float mins[16];
    _mm512_store_ps(mins, acc_min[r]);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      float v = _mm512_reduce_add_ps(acc[r][m]);
      if constexpr (kMin) v += mins[m];
      store(a, m0 + m, n + r, v);
    }
  }
}

// x's sums over each run of `width` (16 or 32) values of each of its M bf16 rows, summed in order:
// the sum of row m's run j goes to out[j * run_stride + m * row_stride]
void x_run_sums(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int width, float* out, int64_t run_stride,
                int64_t row_stride) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K / width; ++j) {
      const uint16_t* run = x + m * ldx + j * width;
      float sum = 0;
      for (int i = 0; i < width; ++i) sum += bf16_to_float(run[i]);
      out[j * run_stride + m * row_stride] = sum;
    }
}
#endif  // QK_BF16

template <class F, int MB, bool DOT>
void gemv_pass(const Gemv& a, int64_t m0, int threads) {
  constexpr int NR = tile_rows(MB);
  const int64_t tiles = a.N / NR, chunk = min_chunk(tiles, threads);
#if QK_BF16
  if constexpr (DOT) {
#pragma omp parallel for num_threads(threads) schedule(guided, chunk)
    for (int64_t t = 0; t < tiles; ++t) gemv_tile_dot<F, NR, MB>(a, t * NR, m0);
    for (int64_t n = tiles * NR; n < a.N; ++n) gemv_tile_dot<F, 1, MB>(a, n, m0);
    return;
  }
#endif
#pragma omp parallel for num_threads(threads) schedule(guided, chunk)
  for (int64_t t = 0; t < tiles; ++t) gemv_tile_f32<F, NR, MB>(a, t * NR, m0);
  for (int64_t n = tiles * NR; n < a.N; ++n) gemv_tile_f32<F, 1, MB>(a, n, m0);
}

// the AVX-512 GEMV of one format: AMX tiles (where built and asked for), the bf16 dot path (bf16 x,
// small codes), else fp32 x and two FMAs per 32 weights
template <class F>
void gemv_format(const QkGemv& c) {
  const int64_t M = c.M, K = c.K;
  Gemv a = gemv_args(c);
#if QK_AMX
  if (c.x_bf16 && c.amx && amx_gemv(c)) return;
#endif
#if QK_BF16
  if constexpr (kDot<F>) {
    if (c.x_bf16) {
      // formats with a minimum: the sum of each group of 32 x values, x rows side by side
      const int64_t groups = K / 32, ld = (M + 15) / 16 * 16;
      std::vector<float> xsum;
      if (F::kOffset < 0) {
        xsum.assign((size_t)(groups * ld), 0.0f);
        x_run_sums((const uint16_t*)c.x, M, K, c.ldx, 32, xsum.data(), ld, 1);
      }
      // Q6_K: the sum of each run of 16 x values, [M, K/16]
      if (F::kBits == 6) {
        xsum.resize((size_t)(M * K / 16));
        x_run_sums((const uint16_t*)c.x, M, K, c.ldx, 16, xsum.data(), 1, K / 16);
      }
      a.xb = (const uint16_t*)c.x;
      a.ldxb = c.ldx;
      a.xsum = xsum.data();
      a.ldxs = F::kBits == 6 ? K / 16 : ld;
      gemv_all<F, true>(a, c.threads);
      return;
    }
  }
#endif
  std::vector<float> xf((size_t)(M * K));
  load_x(c.x, c.x_bf16, M, K, c.ldx, xf.data());
  a.x = xf.data();
  gemv_all<F, false>(a, c.threads);
}

template <class F>
void dequant_row(const uint8_t* row, int64_t K, void* out, int pieces) {
  Scales s;
  for (int64_t blk = 0; blk < K / F::kValues; ++blk) {
    const uint8_t* b = row + blk * F::kBytes;
    prepare<F>(b, &s);
    for (int g = 0; g < F::kValues / 32; ++g) {
      const int64_t k = blk * F::kValues + g * 32;
      __m512 w[2];
      vec<F>(b, g, s, w[0], w[1]);
      for (int h = 0; h < 2; ++h) {
        if (!pieces) {
          _mm512_storeu_ps((float*)out + k + 16 * h, w[h]);
          continue;
        }
        __m512 rest = w[h];
        for (int p = 0; p < pieces; ++p) {
          const __m256i part = ps_to_bf16(rest);
          _mm256_storeu_si256((__m256i*)((uint16_t*)out + p * K + k + 16 * h), part);
          rest = _mm512_sub_ps(rest, bf16_to_ps(part));  // exact: part is rest rounded to 8 bits
        }
      }
    }
  }
  tail_values<F>(row, K, out, pieces);
}

}  // namespace

int gemv(const QkGemv& c) {
  return dispatch(c.type, [&](auto format) { gemv_format<typename decltype(format)::type>(c); });
}

int dequant(const QkDequant& c) {
  return dispatch(c.type, [&](auto format) {
    using F = typename decltype(format)::type;
    const int64_t out_row = c.pieces ? (int64_t)c.pieces * c.K * 2 : c.K * 4;  // bytes
#pragma omp parallel for num_threads(c.threads) schedule(static)
    for (int64_t n = 0; n < c.N; ++n)
      dequant_row<F>(c.w + n * c.row_bytes, c.K, (uint8_t*)c.out + n * out_row, c.pieces);
  });
}

}  // namespace qk
