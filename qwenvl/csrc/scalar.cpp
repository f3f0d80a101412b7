// The scalar path: portable C++, no instruction set beyond the compiler's baseline. It is the
// reference the other paths are tested against (tests/csrc/kernel_driver.cpp) and the path of CPUs
// without a SIMD file of their own. Built with -ffp-contract=off, so its sums are the same bits on
// every machine.
#include "formats.h"

namespace qk {

namespace {

constexpr int kRowsAtOnce = 16;  // x rows multiplied per decoded w group

// one w row against x rows m0 .. m0 + rows (rows <= kRowsAtOnce), each group of w decoded once for
// all of them. Per x row: 32 lane sums over the groups, then the lanes in order, then the tail; the
// same operations whatever the other rows, so a row gives the same bits alone or in a batch.
template <class F>
void rows_dot(const Gemv& a, int64_t n, int64_t m0, int rows) {
  const uint8_t* w = a.w + n * a.row_bytes;
  const int64_t K = a.K;
  float lanes[kRowsAtOnce][32] = {}, values[32];
  Scales s;
  for (int64_t blk = 0; blk < K / F::kValues; ++blk) {
    const uint8_t* b = w + blk * F::kBytes;
    F::prepare(b, &s);
    for (int g = 0; g < F::kValues / 32; ++g) {
      F::scalar(b, g, &s, values);
      for (int r = 0; r < rows; ++r) {
        const float* xg = a.x + (m0 + r) * K + blk * F::kValues + g * 32;
        for (int i = 0; i < 32; ++i) lanes[r][i] += values[i] * xg[i];
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    float sum = 0;
    for (int i = 0; i < 32; ++i) sum += lanes[r][i];
    store(a, m0 + r, n, sum + tail_dot<F>(w, a.x + (m0 + r) * K, K));
  }
}

template <class F>
void gemv_format(const Gemv& a, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < a.N; ++n)
    for (int64_t m = 0; m < a.M; m += kRowsAtOnce)
      rows_dot<F>(a, n, m, (int)(a.M - m < kRowsAtOnce ? a.M - m : kRowsAtOnce));
}

template <class F>
void dequant_row(const uint8_t* row, int64_t K, void* out, int pieces) {
  Scales s;
  float values[32];
  for (int64_t blk = 0; blk < K / F::kValues; ++blk) {
    const uint8_t* b = row + blk * F::kBytes;
    F::prepare(b, &s);
    for (int g = 0; g < F::kValues / 32; ++g) {
      F::scalar(b, g, &s, values);
      for (int i = 0; i < 32; ++i) put_value(out, K, blk * F::kValues + g * 32 + i, values[i], pieces);
    }
  }
  tail_values<F>(row, K, out, pieces);
}

}  // namespace

int gemv(const QkGemv& c) {
  return dispatch(c.type, [&](auto format) {
    using F = typename decltype(format)::type;
    std::vector<float> xf((size_t)(c.M * c.K));
    load_x(c.x, c.x_bf16, c.M, c.K, c.ldx, xf.data());
    Gemv a = gemv_args(c);
    a.x = xf.data();
    gemv_format<F>(a, c.threads);
  });
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
