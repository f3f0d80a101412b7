// The AArch64 NEON path: the GEMV and the dequantization of every format, bit for bit the scalar
// reference's (scalar.cpp).
//
// The scalar GEMV keeps 32 lane sums per (x row, w row) pair, adds each group's 32 products w * x
// to them (a rounded product, then a rounded sum), then adds the lanes in order and the float
// formats' tail. This file does the same operations in the same order, four lanes to a register
// (eight accumulators per pair), with products and sums that are never fused (-ffp-contract=off):
// its results are the scalar path's bits, for every row count, and decoding a group once serves
// every x row of the tile. fp16 weights convert with the FCVTL instruction (base AArch64), which
// gives the scalar table's value for every fp16 number (a signalling NaN comes out quiet).
//
// The CPU's dot-product and fp16-arithmetic extensions (asimddp, asimdhp) add flags to the build
// (qwenvl/ops/isa.py) and are named by qk_extensions(); the exact kernels here use neither: an
// integer dot product needs integer activations, and fp16 arithmetic would round the products.
#include "neon.h"

namespace qk {

namespace {

using namespace neon;

// x rows per pass over w (each pass decodes w once for them) and w rows per tile: 8 fp32x4
// accumulators per pair, the tile's pairs within the 32 vector registers where they fit
constexpr int kChunkRows = 4;
constexpr int tile_rows(int mb) { return mb == 1 ? 2 : 1; }

template <class F, int NR, int MB>
void gemv_tile(const Gemv& a, int64_t n, int64_t m0) {
  float32x4_t acc[NR][MB][8];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < 8; ++j) acc[r][m][j] = vdupq_n_f32(0.0f);
  const float* x = a.x + m0 * a.K;
  Scales s[NR];
  for (int64_t blk = 0; blk < a.K / F::kValues; ++blk) {
    const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
    for (int r = 0; r < NR; ++r) {
      __builtin_prefetch(row + (NR + r) * a.row_bytes);  // the next tile's block (never faults)
      F::prepare(row + r * a.row_bytes, &s[r]);
    }
    for (int g = 0; g < F::kValues / 32; ++g) {
      const float* xg = x + blk * F::kValues + g * 32;
      for (int r = 0; r < NR; ++r) {
        float32x4_t w[8];
        vec<F>(row + r * a.row_bytes, g, s[r], w);
        for (int m = 0; m < MB; ++m)
          for (int j = 0; j < 8; ++j)
            acc[r][m][j] = vaddq_f32(acc[r][m][j], vmulq_f32(w[j], vld1q_f32(xg + m * a.K + 4 * j)));
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m) {
      float lanes[32];
      for (int j = 0; j < 8; ++j) vst1q_f32(lanes + 4 * j, acc[r][m][j]);
      float sum = 0;
      for (int i = 0; i < 32; ++i) sum += lanes[i];
      store(a, m0 + m, n + r, sum + tail_dot<F>(a.w + (n + r) * a.row_bytes, x + m * a.K, a.K));
    }
}

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
  for (int64_t m0 = 0; m0 < c.M; m0 += kChunkRows)
    gemv_chunk<F, kChunkRows>(a, m0, c.M - m0 < kChunkRows ? c.M - m0 : kChunkRows, c.threads);
}

// 4 values at k: fp32, or `pieces` bf16 parts (part p at p * K + k) summing to them, as put_value
inline void put4(void* out, int64_t K, int64_t k, float32x4_t v, int pieces) {
  if (!pieces) {
    vst1q_f32((float*)out + k, v);
    return;
  }
  for (int p = 0; p < pieces; ++p) {
    const uint16x4_t part = f32_to_bf16(v);
    vst1_u16((uint16_t*)out + p * K + k, part);
    v = vsubq_f32(v, bf16_to_f32(part));
  }
}

template <class F>
void dequant_row(const uint8_t* row, int64_t K, void* out, int pieces) {
  Scales s;
  for (int64_t blk = 0; blk < K / F::kValues; ++blk) {
    const uint8_t* b = row + blk * F::kBytes;
    F::prepare(b, &s);
    for (int g = 0; g < F::kValues / 32; ++g) {
      float32x4_t w[8];
      vec<F>(b, g, s, w);
      for (int j = 0; j < 8; ++j) put4(out, K, blk * F::kValues + g * 32 + 4 * j, w[j], pieces);
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
