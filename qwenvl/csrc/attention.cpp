// Decode attention: one query token per row, each row with its own KV cache (contiguous, or blocks
// through a block table) and position.
// First every row's new key/value is stored at its position; then a task, one (row, kv head), runs
// the kv head's G query heads over keys 0 .. position. The operations of a task do not depend on the
// other rows, so a row gets the same result alone or in a batch. Rows may share a cache at
// consecutive positions (speculative verification: the drafted tokens of one sequence): the store
// comes first, so row i + 1 sees row i's key/value.
#include "common.h"

namespace qk {

namespace {

constexpr int kLanes = 16;

inline float sum_lanes(float* lanes) {  // a fixed pairwise order
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// sum of a[d] * b[d] in kLanes partial sums, then a fixed pairwise order
inline float dot_lanes(const float* a, const float* b, int D) {
  float lanes[kLanes] = {};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  for (int l = 0; d + l < D; ++l) lanes[l] += a[d + l] * b[d + l];
  return sum_lanes(lanes);
}

// keys (or values) t .. t + n as fp32 rows of D
template <class T>
inline void load_rows(const T* src, int64_t n, int D, float* dst) {
  for (int64_t i = 0; i < n * D; ++i) dst[i] = to_float(src[i]);
}

// scores[j * len + t] = q_j . key_t for the G query heads (q pre-scaled), keys as fp32 rows
inline void score_rows(const float* qf, int G, int D, const float* keys, int64_t t0, int64_t n, int64_t len,
                       float* scores) {
#if QK_AVX512
  if (D % 16 == 0) {
    for (int64_t t = 0; t < n; ++t) {
      const float* key = keys + t * D;
      for (int j = 0; j < G; ++j) {
        __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(qf + j * D), _mm512_loadu_ps(key));
        for (int d = 16; d < D; d += 16)
          sum = _mm512_fmadd_ps(_mm512_loadu_ps(qf + j * D + d), _mm512_loadu_ps(key + d), sum);
        scores[j * len + t0 + t] = _mm512_reduce_add_ps(sum);
      }
    }
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t)
    for (int j = 0; j < G; ++j) scores[j * len + t0 + t] = dot_lanes(qf + j * D, keys + t * D, D);
}

// out[d] += sum over t of p[t] * rows[t][d], t in order (one accumulator per d)
template <int C>
inline void weigh_rows_avx512(const float* p, const float* rows, int64_t n, float* out) {
#if QK_AVX512
  __m512 acc[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = _mm512_loadu_ps(out + 16 * c);
  for (int64_t t = 0; t < n; ++t) {
    const __m512 weight = _mm512_set1_ps(p[t]);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(rows + t * 16 * C + 16 * c), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
#endif
}

inline void weigh_rows(const float* p, const float* rows, int64_t n, int D, float* out) {
#if QK_AVX512
  switch (D) {
    case 64: weigh_rows_avx512<4>(p, rows, n, out); return;
    case 128: weigh_rows_avx512<8>(p, rows, n, out); return;
    default: break;
  }
#endif
  for (int64_t t = 0; t < n; ++t)
    for (int d = 0; d < D; ++d) out[d] += p[t] * rows[t * D + d];
}

constexpr int64_t kAttnBlock = 32;  // keys (values) converted to fp32 at a time

// Where one (row, kv head)'s key (or value) rows lie: contiguous from `base`, or, with a block
// table, block_size rows per block at base + id * block_stride.
template <class T>
struct RowSource {
  T* base;
  const int64_t* table;  // NULL: contiguous
  int64_t block_size, block_stride;
  int D;

  T* at(int64_t t) const {
    return table ? base + table[t / block_size] * block_stride + (t % block_size) * D : base + t * D;
  }
  // how many of the rows t .. t + n lie contiguously from at(t)
  int64_t run(int64_t t, int64_t n) const {
    if (!table) return n;
    const int64_t left = block_size - t % block_size;
    return n < left ? n : left;
  }
};

// the key (or value) rows of `row`'s kv head g, from the row's cache base pointer
template <class T>
RowSource<T> row_source(const QkDecodeAttention& a, int64_t base, int64_t row, int g) {
  const bool paged = a.block_size > 0;
  const int64_t offset = a.layer * a.layer_strides[row] + g * a.head_strides[row];
  return RowSource<T>{(T*)base + offset, paged ? (const int64_t*)a.block_tables[row] : nullptr, a.block_size,
                      paged ? a.block_strides[row] : 0, a.D};
}

// The row's new key and value of kv head g, stored at the row's position (through its block table)
template <class T>
void store_task(const QkDecodeAttention& a, int64_t row, int g) {
  const RowSource<T> keys = row_source<T>(a, a.key_ptrs[row], row, g);
  const RowSource<T> values = row_source<T>(a, a.value_ptrs[row], row, g);
  const int64_t pos = a.positions[row];
  memcpy(keys.at(pos), (const T*)a.k + row * a.k_row + g * a.D, a.D * sizeof(T));
  memcpy(values.at(pos), (const T*)a.v + row * a.v_row + g * a.D, a.D * sizeof(T));
}

template <class T>
void attention_task(const QkDecodeAttention& a, int64_t row, int g) {
  const int G = a.heads / a.kv_heads, D = a.D;
  const int64_t pos = a.positions[row], len = pos + 1;
  const RowSource<T> keys = row_source<T>(a, a.key_ptrs[row], row, g);
  const RowSource<T> values = row_source<T>(a, a.value_ptrs[row], row, g);

  thread_local std::vector<float> scratch;
  scratch.resize((size_t)G * D * 2 + kAttnBlock * D + (size_t)G * len);
  float *qf = scratch.data(), *acc = qf + G * D, *block = acc + G * D, *scores = block + kAttnBlock * D;
  const T* q = (const T*)a.q + row * a.q_row + (int64_t)g * G * D;
  for (int i = 0; i < G * D; ++i) qf[i] = to_float(q[i]) * a.scale;
  for (int64_t t = 0; t < len;) {
    const int64_t n = keys.run(t, len - t < kAttnBlock ? len - t : kAttnBlock);
    load_rows(keys.at(t), n, D, block);
    score_rows(qf, G, D, block, t, n, len, scores);
    t += n;
  }
  for (int j = 0; j < G; ++j) {  // softmax
    float* s = scores + j * len;
    float top = s[0];
#pragma omp simd reduction(max : top)
    for (int64_t t = 1; t < len; ++t) top = s[t] > top ? s[t] : top;  // order-free
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] = exp_nonpositive(s[t] - top);
    float lanes[kLanes] = {};
    int64_t t = 0;
    for (; t + kLanes <= len; t += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += s[t + l];
    for (int l = 0; t + l < len; ++l) lanes[l] += s[t + l];
    const float inv = 1.0f / sum_lanes(lanes);
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  for (int i = 0; i < G * D; ++i) acc[i] = 0.0f;
  for (int64_t t0 = 0; t0 < len;) {
    const int64_t n = values.run(t0, len - t0 < kAttnBlock ? len - t0 : kAttnBlock);
    load_rows(values.at(t0), n, D, block);
    for (int j = 0; j < G; ++j) weigh_rows(scores + j * len + t0, block, n, D, acc + j * D);
    t0 += n;
  }
  T* out = (T*)a.out + (row * a.heads + (int64_t)g * G) * D;
  for (int i = 0; i < G * D; ++i) store_as(out + i, acc[i]);
}

template <class T>
void run_attention(const QkDecodeAttention& a, int64_t rows, int threads) {
  const int64_t tasks = rows * a.kv_heads;
  for (int64_t i = 0; i < tasks; ++i) store_task<T>(a, i / a.kv_heads, (int)(i % a.kv_heads));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (tasks > 1)
  for (int64_t i = 0; i < tasks; ++i) attention_task<T>(a, i / a.kv_heads, (int)(i % a.kv_heads));
}

}  // namespace

int decode_attention(const QkDecodeAttention& a) {
  if (a.kv_heads <= 0 || a.heads % a.kv_heads) return QK_BAD_SHAPE;
  if (a.block_size < 0 || (a.block_size > 0 && !a.block_tables)) return QK_BAD_SHAPE;
  if (a.bf16)
    run_attention<uint16_t>(a, a.rows, a.threads);
  else
    run_attention<float>(a, a.rows, a.threads);
  return QK_OK;
}

}  // namespace qk
