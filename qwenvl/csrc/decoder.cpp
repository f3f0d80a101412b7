// The fused decode step: every decoder layer of one decode step in one call (qk_decode_step), composed
// of the library's own calls (RMSNorm, block GEMV, decode attention, SwiGLU's product) so that each
// result is the bits the separate calls give; the rotary embedding and the residual adds are done here
// with torch's roundings. Built with -ffp-contract=off (qwenvl/ops/build.py): torch's elementwise ops
// round every product and sum, so no multiply-add may be contracted into an FMA.
#include <algorithm>

#include "common.h"
#include "q8.h"

namespace qk {

namespace {

int64_t output_width(const QkLinear& w) {
  int64_t n = 0;
  for (int i = 0; i < w.count; ++i) n += w.parts[i].N;
  return n;
}

int64_t input_width(const QkLinear& w) { return w.count > 0 ? w.parts[0].K : 0; }

// y[rows, N] = x[rows, K] @ W^T (+ bias) as qk_gemv (qk_gemv_q8 for a q8 part) computes it for these
// rows, part by part
int linear(const QkLinear& w, const void* x, void* y, int64_t rows, int32_t bf16, int32_t threads) {
  const int64_t width = output_width(w), size = bf16 ? 2 : 4;
  int64_t column = 0;
  for (int i = 0; i < w.count; ++i) {
    const QkLinearPart& part = w.parts[i];
    QkGemv call{};
    call.x = x;
    call.w = part.w;
    call.bias = part.bias;
    call.y = (uint8_t*)y + column * size;
    call.M = rows;
    call.K = part.K;
    call.ldx = part.K;
    call.N = part.N;
    call.row_bytes = part.row_bytes;
    call.ldy = width;
    call.type = part.type;
    call.x_bf16 = call.y_bf16 = bf16;
    call.threads = threads;
    call.amx = bf16 && rows >= part.amx_min_rows;
    if (const int status = part.q8 ? gemv_q8(call) : gemv(call)) return status;
    column += part.N;
  }
  return QK_OK;
}

// y = RMSNorm(x (+ delta, stored in sum)) as qk_rms_norm computes it
void norm(const void* x, const void* delta, void* sum, const void* w, void* y, int64_t rows, int64_t dim, float eps,
          int32_t bf16) {
  QkRmsNorm call{};
  call.x = x;
  call.delta = delta;
  call.sum = sum;
  call.w = w;
  call.y = y;
  call.rows = rows;
  call.dim = call.ldx = call.ldd = call.lds = call.ldy = dim;
  call.eps = eps;
  call.bf16 = bf16;
  rms_norm(call);
}

// out[r, h] = x[r, h] * cos[r] + roll(x[r, h], D / 2) * sin[r] for the first `heads` heads of each
// row of qkv (rows `width` apart), as torch's addcmul(x * cos, x.roll(D / 2, -1), sin) rounds it: the
// first product rounded to the dtype, then the sum with the second product in one fused multiply-add
// (fma), or with that product rounded to fp32 first.
template <class T>
void rotate(const T* qkv, int64_t width, const T* cos, const T* sin, T* out, int64_t rows, int heads, int D,
            bool fma) {
  const int half = D / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * D;
    const T* s = sin + r * D;
    for (int h = 0; h < heads; ++h) {
      const T* x = qkv + r * width + (int64_t)h * D;
      T* o = out + (r * heads + h) * D;
      for (int d = 0; d < D; ++d) {
        T product;
        store_as(&product, to_float(x[d]) * to_float(c[d]));
        const float turned = to_float(x[(d + half) % D]), by = to_float(s[d]);
        store_as(o + d, fma ? std::fma(turned, by, to_float(product)) : to_float(product) + turned * by);
      }
    }
  }
}

// x += delta (rounded to the dtype), as torch's add
template <class T>
void add_into(T* x, const T* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store_as(x + i, to_float(x[i]) + to_float(delta[i]));
}

template <class T>
int step(const QkDecodeStep& c) {
  const QkDecodeAttention& a = *c.attention;
  const int64_t rows = c.rows, hidden = c.hidden, D = a.D;
  const int64_t qk_heads = a.heads + a.kv_heads, qkv_width = (qk_heads + a.kv_heads) * D;
  int64_t inter = 0;
  for (int64_t l = 0; l < c.layer_count; ++l) inter = std::max(inter, output_width(c.layers[l].gate_up) / 2);
  // scratch: normed, residual sum, qkv, rotated q/k, attention out, o / down out, gate_up, swiglu
  std::vector<T> normed(rows * hidden), sum(rows * hidden), qkv(rows * qkv_width), rotated(rows * qk_heads * D),
      attended(rows * a.heads * D), projected(rows * hidden), gate_up(rows * 2 * inter), product(rows * inter);
  T* x = (T*)c.x;
  for (int64_t l = 0; l < c.layer_count; ++l) {
    const QkDecoderLayer& layer = c.layers[l];
    const int64_t layer_inter = output_width(layer.gate_up) / 2;
    if (output_width(layer.qkv) != qkv_width || input_width(layer.o) != a.heads * D ||
        output_width(layer.down) != hidden || input_width(layer.down) != layer_inter)
      return QK_BAD_SHAPE;
    norm(x, nullptr, nullptr, layer.input_norm, normed.data(), rows, hidden, c.eps, c.bf16);
    if (const int status = linear(layer.qkv, normed.data(), qkv.data(), rows, c.bf16, c.threads)) return status;
    rotate<T>(qkv.data(), qkv_width, (const T*)c.cos, (const T*)c.sin, rotated.data(), rows, (int)qk_heads, (int)D,
              c.rope_fma != 0);
    QkDecodeAttention call = a;
    call.q = rotated.data();
    call.k = rotated.data() + a.heads * D;
    call.v = qkv.data() + qk_heads * D;
    call.out = attended.data();
    call.q_row = call.k_row = qk_heads * D;
    call.v_row = qkv_width;
    call.layer = l;
    if (const int status = decode_attention(call)) return status;
    if (const int status = linear(layer.o, attended.data(), projected.data(), rows, c.bf16, c.threads)) return status;
    norm(x, projected.data(), sum.data(), layer.post_norm, normed.data(), rows, hidden, c.eps, c.bf16);
    if (const int status = linear(layer.gate_up, normed.data(), gate_up.data(), rows, c.bf16, c.threads))
      return status;
    QkSiluMul swiglu{};
    swiglu.gate_up = gate_up.data();
    swiglu.y = product.data();
    swiglu.rows = rows;
    swiglu.inter = layer_inter;
    swiglu.ldg = 2 * layer_inter;
    swiglu.ldy = layer_inter;
    swiglu.bf16 = c.bf16;
    swiglu.threads = c.threads;
    silu_mul(swiglu);
    if (const int status = linear(layer.down, product.data(), projected.data(), rows, c.bf16, c.threads))
      return status;
    std::copy(sum.begin(), sum.end(), x);
    add_into(x, projected.data(), rows * hidden);
  }
  return QK_OK;
}

}  // namespace

int decode_step(const QkDecodeStep& c) { return c.bf16 ? step<uint16_t>(c) : step<float>(c); }

}  // namespace qk
