// The exported C ABI (qk_abi.h): thin wrappers over the build's ISA file and the layer kernels.
#include "formats.h"

#ifndef QK_ISA_NAME
#error "build with -DQK_ISA_NAME=\"<isa>\" (qwenvl/ops/build.py does)"
#endif

extern "C" {

int qk_abi_version(void) { return QK_ABI_VERSION; }

const char* qk_isa(void) { return QK_ISA_NAME; }

const char* qk_extensions(void) {  // what the flags added beyond the ISA's base, for `qwenvl info`
#if defined(__aarch64__)
#if defined(__ARM_FEATURE_DOTPROD) && defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
  return "dotprod fp16";
#elif defined(__ARM_FEATURE_DOTPROD)
  return "dotprod";
#elif defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
  return "fp16";
#else
  return "";
#endif
#else
  return QK_AMX ? "avx512bf16 avx512vbmi2 amx-tile amx-bf16" : QK_BF16 ? "avx512bf16 avx512vbmi2" : "";
#endif
}

int qk_amx(void) {
#if QK_AMX
  return qk::amx_ready();
#else
  return 0;
#endif
}

int qk_supports(int32_t type) { return qk::supported(type); }

int qk_gemv(const QkGemv* call) { return qk::gemv(*call); }

int qk_dequant(const QkDequant* call) { return qk::dequant(*call); }

int qk_decode_attention(const QkDecodeAttention* call) { return qk::decode_attention(*call); }

int qk_rms_norm(const QkRmsNorm* call) { return qk::rms_norm(*call); }

int qk_silu_mul(const QkSiluMul* call) { return qk::silu_mul(*call); }

int qk_decode_step(const QkDecodeStep* call) { return qk::decode_step(*call); }
}
