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

// The factored form for the formats whose weight is scale * code (code minus the format's offset)
// or, for Q4_K / Q5_K, scale * code + minimum: per (x row, w row) pair and group, the 32 exact
// products code * x summed in fp32 (one product, three FMAs: 8 lanes), then acc += scale * sum (Q3_K,
// Q6_K: a scale per 16 weights, two sums). The minimum: mins += the block's 8 minimums times x's 8
// group sums (xsum, once per call), one FMA per block. The same operations whatever NR and MB are.
template <class F, int NR, int MB>
void gemv_tile_factored(const Gemv& a, int64_t n, int64_t m0) {
  constexpr int G = F::kValues / 32;
  constexpr bool kMin = F::kOffset < 0;
  __m256 acc[NR][MB], mins[NR][MB];
  Scales s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) acc[r][m] = mins[r][m] = _mm256_setzero_ps();
  const float* x = a.x + m0 * a.K;
  for (int64_t blk = 0; blk < a.K / F::kValues; ++blk) {
    const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
    prefetch_next_tile<F, NR>(row, a.row_bytes);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) prepare<F>(row + r * a.row_bytes, &s[r]);
    if constexpr (kMin) {
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        const __m256 sums = _mm256_loadu_ps(a.xsum + (m0 + m) * a.ldxs + blk * G);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) mins[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(s[r].off), sums, mins[r][m]);
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const float* xg = x + blk * F::kValues + g * 32;
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        __m256 c[4];
        code_values<F>(row + r * a.row_bytes, g, c);
        const __m256 scale = split_scale<F>(s[r], g);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) {
          const float* xm = xg + m * a.K;
          __m256 sum = _mm256_mul_ps(c[0], _mm256_loadu_ps(xm));
#pragma GCC unroll 4
          for (int i = 1; i < 4; ++i) sum = _mm256_fmadd_ps(c[i], _mm256_loadu_ps(xm + 8 * i), sum);
          acc[r][m] = _mm256_fmadd_ps(scale, sum, acc[r][m]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      float v = reduce8(acc[r][m]);
      if constexpr (kSplit<F>) v *= 1.0f / kSplitScale;  // exact
      if constexpr (kMin) v += reduce8(mins[r][m]);
      store(a, m0 + m, n + r, v);
    }
}

// accumulators per (x row, w row) pair
template <class F>
constexpr int kAccumulators = kFactored<F> && F::kOffset < 0 ? 2 : 1;

// w rows per tile for MB x rows: at least 8 independent accumulators (an FMA's latency is 4 cycles,
// two issue per cycle), at most 8 (16 ymm registers: the accumulators, 4 weights and temporaries)
template <class F>
constexpr int tile_rows(int mb) {
  const int pairs = 4 / kAccumulators<F>;
  return pairs / mb > 1 ? pairs / mb : 1;
}

// rows of x per pass over w (each pass decodes w once)
template <class F>
constexpr int kChunkRows = 8 / kAccumulators<F>;

template <class F, int MB>
void gemv_pass(const Gemv& a, int64_t m0, int threads) {
  constexpr int NR = tile_rows<F>(MB);
  const int64_t tiles = a.N / NR, chunk = min_chunk(tiles, threads);
  if constexpr (kFactored<F>) {
#pragma omp parallel for num_threads(threads) schedule(guided, chunk)
    for (int64_t t = 0; t < tiles; ++t) gemv_tile_factored<F, NR, MB>(a, t * NR, m0);
    for (int64_t n = tiles * NR; n < a.N; ++n) gemv_tile_factored<F, 1, MB>(a, n, m0);
  } else {
#pragma omp parallel for num_threads(threads) schedule(guided, chunk)
    for (int64_t t = 0; t < tiles; ++t) gemv_tile<F, NR, MB>(a, t * NR, m0);
    for (int64_t n = tiles * NR; n < a.N; ++n) gemv_tile<F, 1, MB>(a, n, m0);
  }
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

// x's sum over each group of 32 values, [M, K / 32]: eight lanes, then reduce8
void group_sums(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K / 32; ++j) {
      const float* v = x + m * K + j * 32;
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8)),
                                       _mm256_add_ps(_mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24)));
      out[m * (K / 32) + j] = reduce8(sum);
    }
}

template <class F>
void gemv_format(const QkGemv& c) {
  constexpr int C = kChunkRows<F>;
  std::vector<float> xf((size_t)(c.M * c.K)), xsum;
  load_x(c.x, c.x_bf16, c.M, c.K, c.ldx, xf.data());
  Gemv a = gemv_args(c);
  a.x = xf.data();
  if constexpr (kFactored<F> && F::kOffset < 0) {  // the group sums of x as it is
    xsum.resize((size_t)(c.M * (c.K / 32)));
    group_sums(a.x, c.M, c.K, xsum.data());
    a.xsum = xsum.data();
    a.ldxs = c.K / 32;
  }
  if constexpr (kSplit<F>) split_x(xf.data(), c.M * c.K);  // K is a multiple of 32
  for (int64_t m0 = 0; m0 < a.M; m0 += C) gemv_chunk<F, C>(a, m0, a.M - m0 < C ? a.M - m0 : C, c.threads);
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
