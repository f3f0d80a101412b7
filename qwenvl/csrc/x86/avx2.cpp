// The AVX2 path (AVX2 + FMA + F16C): x as fp32 (bf16 x converted once per call), each group of 32
// weights decoded to their exact fp32 values (x86/avx2.h) once for all x rows of the call, and one
// FMA per 8 weights per x row into that (x row, weight row) pair's 8-lane accumulator.
#include "avx2.h"

namespace qk {

namespace {

using namespace x256;

// NR output rows of w against MB (<= 8) rows of fp32 x starting at m0. Each pair (x row m, w row r)
// has one 8-lane accumulator, updated by four FMAs per group in value order and reduced by reduce8:
// the same operations whatever NR and MB are, so a row's result does not depend on the tiling.
template <class F, int NR, int MB>
void gemv_tile(const Gemv& a, int64_t n, int64_t m0) {
  constexpr int G = F::kValues / 32;
  __m256 acc[NR][MB];
  Scales s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  const float* x = a.x + m0 * a.K;
  for (int64_t blk = 0; blk < a.K / F::kValues; ++blk) {
    const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
    prefetch_next_tile<F, NR>(row, a.row_bytes);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) prepare<F>(row + r * a.row_bytes, &s[r]);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const float* xg = x + blk * F::kValues + g * 32;
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        __m256 w[4];
        vec<F>(row + r * a.row_bytes, g, s[r], w);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
          const float* xm = xg + m * a.K;
          __m256 sum = acc[r][m];
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) sum = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xm + 8 * i), sum);
          acc[r][m] = sum;
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const float tail = tail_dot<F>(a.w + (n + r) * a.row_bytes, x + m * a.K, a.K);
      store(a, m0 + m, n + r, reduce8(acc[r][m]) + tail);
    }
}

// w rows per tile for MB x rows: at least 8 independent accumulators (an FMA's latency is 4 cycles,
// two issue per cycle), at most 8 (16 ymm registers: the accumulators, 4 weights and temporaries)
constexpr int tile_rows(int mb) { return mb == 1 ? 8 : mb == 2 ? 4 : mb <= 4 ? 2 : 1; }

// rows of x per pass over w (each pass decodes w once)
constexpr int kChunkRows = 8;

template <class F, int MB>
void gemv_pass(const Gemv& a, int64_t m0, int threads) {
  constexpr int NR = tile_rows(MB);
  const int64_t tiles = a.N / NR, chunk = min_chunk(tiles, threads);
#pragma omp parallel for num_threads(threads) schedule(guided, chunk)
  for (int64_t t = 0; t < tiles; ++t) gemv_tile<F, NR, MB>(a, t * NR, m0);
  for (int64_t n = tiles * NR; n < a.N; ++n) gemv_tile<F, 1, MB>(a, n, m0);
}

template <class F, int MB>
void gemv_chunk(const Gemv& a, int64_t m0, int64_t rows, int threads) {  // rows <= MB
  if constexpr (MB > 1) {
    if (rows < MB) {
      gemv_chunk<F, MB - 1>(a, m0, rows, threads);
      return;
    }
  }
  gemv_pass<F, MB>(a, m0, threads);
}

template <class F>
void gemv_format(const QkGemv& c) {
  std::vector<float> xf((size_t)(c.M * c.K));
  load_x(c.x, c.x_bf16, c.M, c.K, c.ldx, xf.data());
  Gemv a = gemv_args(c);
  a.x = xf.data();
  for (int64_t m0 = 0; m0 < a.M; m0 += kChunkRows) {
    const int64_t rows = a.M - m0 < kChunkRows ? a.M - m0 : kChunkRows;
    gemv_chunk<F, kChunkRows>(a, m0, rows, c.threads);
  }
}

// 8 fp32 values at out (pieces == 0), or as `pieces` bf16 parts at out + p * K (put_value's layout)
inline void put8(void* out, int64_t K, int64_t k, __m256 v, int pieces) {
  if (!pieces) {
    _mm256_storeu_ps((float*)out + k, v);
    return;
  }
  for (int p = 0; p < pieces; ++p) {
    const __m128i part = ps_to_bf16(v);
    _mm_storeu_si128((__m128i*)((uint16_t*)out + p * K + k), part);
    v = _mm256_sub_ps(v, bf16_to_ps(part));  // exact: part is v rounded to 8 significant bits
  }
}

template <class F>
void dequant_row(const uint8_t* row, int64_t K, void* out, int pieces) {
  Scales s;
  for (int64_t blk = 0; blk < K / F::kValues; ++blk) {
    const uint8_t* b = row + blk * F::kBytes;
    prepare<F>(b, &s);
    for (int g = 0; g < F::kValues / 32; ++g) {
      __m256 w[4];
      vec<F>(b, g, s, w);
      for (int i = 0; i < 4; ++i) put8(out, K, blk * F::kValues + g * 32 + 8 * i, w[i], pieces);
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
