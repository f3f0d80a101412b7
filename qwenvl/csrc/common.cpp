// The fp16 table and the x conversion every ISA build shares.
#include "common.h"

namespace qk {

namespace {

float half_to_float_slow(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    exp = 113;
    while (!(mant & 0x400)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

HalfTable::HalfTable() {
  for (uint32_t h = 0; h < 65536; ++h) value[h] = half_to_float_slow((uint16_t)h);
}

const HalfTable kHalf;

void load_x(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      out[m * K + k] = x_bf16 ? bf16_to_float(((const uint16_t*)x)[m * ldx + k]) : ((const float*)x)[m * ldx + k];
}

}  // namespace qk
