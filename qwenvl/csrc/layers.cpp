// The decoder's per-row helpers: RMSNorm (with the residual add fused in) and SwiGLU's product.
#include "common.h"

#if QK_BF16
#include "x86/avx512.h"
#endif

namespace qk {

namespace {

#if QK_BF16
using x512::bf16_to_ps;
using x512::ps_to_bf16;
#endif

// ---------------------------------------------------------------------------------------------
// RMSNorm of the decoder's rows, as torch's fused F.rms_norm computes it: in fp32,
// y = (h * rsqrt(mean(h^2) + eps)) * w, rounded once to the dtype, where h = x, or with a residual
// delta h = x + delta rounded to the dtype (the residual add), also stored in `sum`. Squares are
// summed in 16 lanes, then the lanes in a fixed order: a row's result depends on that row only.
template <class T>
void rms_norm_rows(const T* x, const T* delta, T* sum, const T* w, T* y, int64_t rows, int64_t dim, int64_t ldx,
                   int64_t ldd, int64_t lds, int64_t ldy, float eps) {
  std::vector<float> h((size_t)dim), wf((size_t)dim);
  for (int64_t i = 0; i < dim; ++i) wf[i] = to_float(w[i]);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    if (delta != nullptr) {
      const T* dr = delta + r * ldd;
      T* sr = sum + r * lds;
      for (int64_t i = 0; i < dim; ++i) {
        store_as(sr + i, to_float(xr[i]) + to_float(dr[i]));
        h[i] = to_float(sr[i]);
      }
    } else {
      for (int64_t i = 0; i < dim; ++i) h[i] = to_float(xr[i]);
    }
    float lanes[16] = {};
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16)
      for (int l = 0; l < 16; ++l) lanes[l] += h[i + l] * h[i + l];
    for (; i < dim; ++i) lanes[i % 16] += h[i] * h[i];
    float total = 0.0f;
    for (int l = 0; l < 16; ++l) total += lanes[l];
    const float scale = 1.0f / std::sqrt(total / (float)dim + eps);
    T* yr = y + r * ldy;
    for (int64_t j = 0; j < dim; ++j) store_as(yr + j, h[j] * scale * wf[j]);
  }
}

// SwiGLU's product for rows of the fused gate/up output (gate: the first `inter` values of a row,
// up: the next `inter`): y = silu(g) * u with torch's roundings for F.silu(gate).mul_(up) — silu(g) =
// g / (1 + exp(-g)) in fp32 (as g * e / (1 + e), e = exp(g), for g < 0: the same value without
// overflow) rounded to the dtype, then the product rounded again.
inline float silu_of(float x) {
  const float e = exp_nonpositive(x < 0.0f ? x : -x);
  return (x < 0.0f ? x * e : x) / (1.0f + e);
}

#if QK_BF16
inline __m512 exp_nonpositive16(__m512 x) {  // exp_nonpositive, 16 lanes (2^n applied by scalef)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// the first multiple of 16 values of a row; returns how many (silu_mul_row does the rest)
int64_t silu_mul_row_bf16(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t inter) {
  int64_t i = 0;
  for (; i + 16 <= inter; i += 16) {
    const __m512 x = bf16_to_ps(_mm256_loadu_si256((const __m256i*)(g + i)));
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 e = exp_nonpositive16(_mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_setzero_ps(), x), x));
    const __m512 numerator = _mm512_mask_mul_ps(x, negative, x, e);
    const __m512 silu = bf16_to_ps(ps_to_bf16(_mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), e))));
    const __m512 product = _mm512_mul_ps(silu, bf16_to_ps(_mm256_loadu_si256((const __m256i*)(u + i))));
    _mm256_storeu_si256((__m256i*)(y + i), ps_to_bf16(product));
  }
  return i;
}
#endif

template <class T>
void silu_mul_row(const T* g, const T* u, T* y, int64_t inter) {
  int64_t i = 0;
#if QK_BF16
  if constexpr (std::is_same_v<T, uint16_t>) i = silu_mul_row_bf16(g, u, y, inter);
#endif
  for (; i < inter; ++i) {
    const float silu = silu_of(to_float(g[i]));  // NaN in, NaN out
    T rounded;
    store_as(&rounded, silu);
    store_as(y + i, to_float(rounded) * to_float(u[i]));
  }
}

template <class T>
void silu_mul_rows(const T* gate_up, T* y, int64_t rows, int64_t inter, int64_t ldg, int64_t ldy, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1 && rows * inter >= 32768)
  for (int64_t r = 0; r < rows; ++r) silu_mul_row(gate_up + r * ldg, gate_up + r * ldg + inter, y + r * ldy, inter);
}

}  // namespace

int rms_norm(const QkRmsNorm& c) {
  if (c.bf16)
    rms_norm_rows<uint16_t>((const uint16_t*)c.x, (const uint16_t*)c.delta, (uint16_t*)c.sum, (const uint16_t*)c.w,
                            (uint16_t*)c.y, c.rows, c.dim, c.ldx, c.ldd, c.lds, c.ldy, c.eps);
  else
    rms_norm_rows<float>((const float*)c.x, (const float*)c.delta, (float*)c.sum, (const float*)c.w, (float*)c.y,
                         c.rows, c.dim, c.ldx, c.ldd, c.lds, c.ldy, c.eps);
  return QK_OK;
}

int silu_mul(const QkSiluMul& c) {
  if (c.bf16)
    silu_mul_rows<uint16_t>((const uint16_t*)c.gate_up, (uint16_t*)c.y, c.rows, c.inter, c.ldg, c.ldy, c.threads);
  else
    silu_mul_rows<float>((const float*)c.gate_up, (float*)c.y, c.rows, c.inter, c.ldg, c.ldy, c.threads);
  return QK_OK;
}

}  // namespace qk
