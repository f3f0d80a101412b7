/* qwenvl native kernels: the C ABI, the only interface between the library and Python.
 *
 * qwenvl/ops/abi.py mirrors every struct here as a ctypes.Structure, field for field and in this
 * order (tests/test_native_driver.py checks the offsets against a compiler). Each call takes one
 * struct by pointer and returns a status (QK_OK, or the reason it did nothing).
 *
 * One library is built per instruction set (scalar, avx2, avx512, amx, ...: see qwenvl/ops/isa.py),
 * from the same sources; every library exports all of these functions.
 *
 * Conventions: matrices are row-major, "ld*" fields are row strides in elements (not bytes), "type"
 * is a GGMLQuantizationType value, "bf16" flags say a buffer holds bf16 (else fp32), and "threads"
 * is the OpenMP thread count for the call (the library shares torch's libgomp pool).
 */
#ifndef QWENVL_QK_ABI_H
#define QWENVL_QK_ABI_H

#include <stdint.h>

#if defined(__GNUC__)
#define QK_API __attribute__((visibility("default")))
#else
#define QK_API
#endif

#define QK_ABI_VERSION 3

enum {
  QK_OK = 0,
  QK_UNSUPPORTED_TYPE = 1, /* the library does not decode this GGML type */
  QK_BAD_SHAPE = 2,        /* e.g. query heads that do not group over the key/value heads */
};

/* y[M, N] = x[M, K] @ dequant(w)[N, K]^T (+ bias), for few rows M (the decode GEMV, <= 16 rows a
 * call is where it pays). A row's result does not depend on the other rows of the call. */
typedef struct QkGemv {
  const void* x;        /* [M, K] rows ldx apart, fp32 or bf16 (x_bf16) */
  const uint8_t* w;     /* [N, row_bytes]: the GGML blocks of each row */
  const float* bias;    /* [N] or NULL */
  void* y;              /* [M, N] rows ldy apart, fp32 or bf16 (y_bf16) */
  int64_t M, K, ldx;
  int64_t N, row_bytes;
  int64_t ldy;
  int32_t type;
  int32_t x_bf16, y_bf16;
  int32_t threads;
  int32_t amx;          /* bf16 x on AMX tiles, where the library has them (qk_amx()) */
} QkGemv;

/* out = dequant(w) as fp32 [N, K] (pieces == 0), or as bf16 [N, pieces * K]: `pieces` (1-3) bf16
 * parts side by side whose fp32 sum is the value. */
typedef struct QkDequant {
  const uint8_t* w;
  void* out;
  int64_t N, K, row_bytes;
  int32_t type;
  int32_t pieces;
  int32_t threads;
} QkDequant;

/* One decode step's attention for `rows` requests, each over its own KV cache (fp32 or bf16
 * throughout): row r's new key and value (kv_heads x D each) are stored at positions[r], then its
 * query heads attend over keys 0 .. positions[r]. Row r's cache for `layer` is kv_heads blocks of
 * capacity x D elements, head_strides[r] apart, at key_ptrs[r] / value_ptrs[r] + layer *
 * layer_strides[r] elements.
 * Block tables (block_size > 0, the engine's paged KV cache): row r's position t lives in block
 * block_tables[r][t / block_size], row t % block_size of it; the block starts block id x
 * block_strides[r] elements past the layer/head offset above, so a (layer, head) holds block_size x D
 * contiguous elements of each block. Keys are read where they lie: no gathering copy. */
typedef struct QkDecodeAttention {
  const void* q;                  /* [rows, heads, D], rows q_row apart */
  const void* k;                  /* [rows, kv_heads, D], rows k_row apart */
  const void* v;                  /* [rows, kv_heads, D], rows v_row apart */
  void* out;                      /* [rows, heads, D] */
  const int64_t* key_ptrs;        /* per row */
  const int64_t* value_ptrs;      /* per row */
  const int64_t* layer_strides;   /* per row, elements */
  const int64_t* head_strides;    /* per row, elements */
  const int64_t* positions;       /* per row */
  int64_t rows, q_row, k_row, v_row;
  int64_t layer;
  int32_t heads, kv_heads, D;
  int32_t bf16;
  float scale;                    /* applied to q (1 / sqrt(D)) */
  int32_t threads;
  const int64_t* block_tables;    /* per row: the address of its int64 block ids (block_size > 0) */
  const int64_t* block_strides;   /* per row, elements between consecutive block ids' storage */
  int64_t block_size;             /* tokens per block; 0: contiguous caches (no tables) */
} QkDecodeAttention;

/* RMSNorm as torch's fused F.rms_norm computes it: y = (h * rsqrt(mean(h^2) + eps)) * w in fp32,
 * rounded once, where h = x, or h = x + delta rounded to the dtype (the residual add, also stored
 * in sum) when delta is not NULL. */
typedef struct QkRmsNorm {
  const void* x;
  const void* delta;  /* or NULL */
  void* sum;          /* written when delta is given */
  const void* w;      /* [dim] */
  void* y;
  int64_t rows, dim;
  int64_t ldx, ldd, lds, ldy;
  float eps;
  int32_t bf16;
} QkRmsNorm;

/* SwiGLU's product: y[r] = silu(gate) * up for gate_up[r] = [gate (inter values) | up (inter)],
 * with torch's roundings for F.silu(gate).mul_(up). */
typedef struct QkSiluMul {
  const void* gate_up;
  void* y;
  int64_t rows, inter, ldg, ldy;
  int32_t bf16;
  int32_t threads;
} QkSiluMul;

/* A block matrix multiplied as qk_gemv does (y = x @ dequant(w)^T (+ bias), N outputs of K inputs). */
typedef struct QkLinearPart {
  const uint8_t* w;     /* [N, row_bytes]: the GGML blocks of each row */
  const float* bias;    /* [N] or NULL */
  int64_t N, K, row_bytes;
  int32_t type;
  int32_t amx_min_rows; /* bf16 steps of at least this many rows put x on AMX tiles (QkGemv.amx) */
  int32_t q8;           /* x quantized to int8 (qk_gemv_q8, --kernel q8) instead of qk_gemv */
} QkLinearPart;

/* One linear layer of a decoder layer for the fused decode step: 1 to 3 parts side by side (a fused
 * q/k/v or gate/up whose parts differ in format), each writing its N columns of the output. */
typedef struct QkLinear {
  QkLinearPart parts[3];
  int32_t count;
} QkLinear;

/* One decoder layer's weights (built once, at the first decode step): RMSNorm -> q/k/v (fused, heads
 * q then k then v) -> rotary embedding -> attention -> o, residual add + RMSNorm -> gate/up (fused)
 * -> SwiGLU -> down, residual add. Norm weights in the step's dtype. */
typedef struct QkDecoderLayer {
  const void* input_norm;  /* [hidden] */
  const void* post_norm;   /* [hidden] */
  QkLinear qkv, o, gate_up, down;
} QkDecoderLayer;

/* One decode step of `rows` requests through decoder layers 0 .. layer_count - 1, each exactly as
 * the library's separate calls compute it (qk_rms_norm, qk_gemv, qk_decode_attention, qk_silu_mul)
 * with the rotation and residual adds in torch's roundings: q and k are rotated as
 * x * cos + roll(x, D / 2) * sin (sin signed: its first half negated) the way torch's
 * addcmul(x * cos, roll(x), sin) rounds it: x * cos rounded to the dtype, then the sum with the second
 * product in one fused multiply-add (rope_fma, what torch's vectorized addcmul does where its build
 * contracts it), or with that product rounded to fp32 first (rope_fma = 0). The hidden states x are updated in place.
 * `attention` gives the step's caches and heads (its q, k, v, out, *_row and layer fields are
 * ignored: the step sets them per layer). */
typedef struct QkDecodeStep {
  void* x;                         /* [rows, hidden], contiguous */
  const void* cos;                 /* [rows, D] */
  const void* sin;                 /* [rows, D], signed */
  const QkDecoderLayer* layers;    /* [layer_count] */
  const QkDecodeAttention* attention;
  int64_t rows, hidden, layer_count;
  float eps;                       /* the RMSNorms' */
  int32_t bf16;
  int32_t threads;
  int32_t rope_fma;
} QkDecodeStep;

#ifdef __cplusplus
extern "C" {
#endif

QK_API int qk_abi_version(void);
/* the instruction set the library was built for ("scalar", "avx2", "avx512", "amx", ...) */
QK_API const char* qk_isa(void);
/* extensions compiled in beyond the base of the ISA, space-separated ("avx512bf16 avx512vbmi2") */
QK_API const char* qk_extensions(void);
/* 1 if qk_gemv can take bf16 x on AMX tiles here (built with AMX and the kernel grants the tiles) */
QK_API int qk_amx(void);
/* 1 if the library decodes GGML type `type` */
QK_API int qk_supports(int32_t type);

QK_API int qk_gemv(const QkGemv* call);
QK_API int qk_dequant(const QkDequant* call);
QK_API int qk_decode_attention(const QkDecodeAttention* call);
QK_API int qk_rms_norm(const QkRmsNorm* call);
QK_API int qk_silu_mul(const QkSiluMul* call);
QK_API int qk_decode_step(const QkDecodeStep* call);

/* The activation-quantizing GEMM (q8.h; not exact: chosen with --kernel q8): y = x @ W^T (+ bias)
 * with x's rows quantized per 32 values to int8 and one fp32 scale, integer dot products against
 * the weight blocks, fp32 accumulation of the block results. Same arguments as qk_gemv (amx is
 * ignored); any number of rows (meant for prefill). Every library gives the same bits. */
QK_API int qk_gemm_q8(const QkGemv* call);
/* The activation-quantizing GEMV, for few rows (decode; <= 16 a call is where it pays): qk_gemm_q8's
 * results bit for bit (q8.h: the same integers, the same fp32 order), read straight from the stored
 * blocks instead of panels split per call. Same arguments and status as qk_gemm_q8. */
QK_API int qk_gemv_q8(const QkGemv* call);
/* 1 if qk_gemm_q8 takes GGML type `type` (the block formats; not F32/F16/BF16) */
QK_API int qk_q8_supports(int32_t type);

#ifdef __cplusplus
}
#endif

#endif /* QWENVL_QK_ABI_H */
