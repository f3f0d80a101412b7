// The scalar path: portable C++, no instruction set beyond the compiler's baseline. It is the
// reference the other paths are tested against (tests/csrc/kernel_driver.cpp) and the path of CPUs
// without a SIMD file of their own. Built with -ffp-contract=off, so its sums are the same bits on
// every machine.
#include "formats.h"

namespace qk {

namespace {

// one (w row, x row) pair: 32 lane sums over the groups, then the lanes in order, then the tail
template <class F>
float row_dot(const uint8_t* w, const float* x, int64_t K) {
  float lanes[32] = {0}, values[32];
  Scales s;
  for (int64_t blk = 0; blk < K / F::kValues; ++blk) {
    const uint8_t* b = w + blk * F::kBytes;
    F::prepare(b, &s);
    for (int g = 0; g < F::kValues / 32; ++g) {
      F::scalar(b, g, &s, values);
      const float* xg = x + blk * F::kValues + g * 32;
      for (int i = 0; i < 32; ++i) lanes[i] += values[i] * xg[i];
    }
  }
  float sum = 0;
  for (int i = 0; i < 32; ++i) sum += lanes[i];
  return sum + tail_dot<F>(w, x, K);
}

template <class F>
void gemv_format(const Gemv& a, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < a.N; ++n)
    for (int64_t m = 0; m < a.M; ++m) store(a, m, n, row_dot<F>(a.w + n * a.row_bytes, a.x + m * a.K, a.K));
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
