// The AMX path (bf16 x on tiles, small-code formats and Q8_0), built into the "amx" library beside the
// AVX-512 one: avx512.cpp hands it bf16 calls that ask for tiles (amx_gemv).
#include "amx.h"

#include <sys/syscall.h>
#include <unistd.h>

#include "avx512.h"

#if !QK_AMX
#error "x86/amx.cpp needs AMX-TILE, AMX-BF16, AVX512-BF16 and AVX512-VBMI2"
#endif

namespace qk {

namespace x512 {

// Q8_0 on tiles too (not on the dot path: there two fp32 FMAs beat one vdpbf16ps): its int8 codes
// are exact bf16 numbers
template <>
struct DotWeights<Q8_0> {
  inline __m512i operator()(const uint8_t* b, int) const {
    const __m512 lo = i8_to_ps(_mm_loadu_si128((const __m128i*)(b + 2)));
    const __m512 hi = i8_to_ps(_mm_loadu_si128((const __m128i*)(b + 18)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
};

}  // namespace x512

namespace {

using namespace x512;

// ---------------------------------------------------------------------------------------------
// AMX path (bf16 x, small codes, when the kernel grants the tile state): per group of 32, one
// tdpbf16ps multiplies 16 weight rows (tile A: the group's exact bf16 code values, as in the dot
// path) by up to 16 x rows (tile B: x in VNNI order, made once per call) into a 16 x 16 fp32 tile
// of raw dot products, which the groups' scales multiply into one accumulator per weight row
// (lanes = x rows). Each output's sums depend only on its own weight row and x row.

bool amx_permitted() {  // the kernel must grant the tile state (torch/oneDNN may have asked already)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// the formats the tiles take: small codes times a scale per 32 (or 16) weights
template <class F>
constexpr bool kAmx = kDot<F> || std::is_same_v<F, Q8_0>;

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void amx_configure() {  // tiles 0, 3, 5: C; 1, 4, 6: A; 2, 7: B — all 16 rows of 64 bytes
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// Transposes 16 rows of 16 32-bit words in place: r[p] becomes word p of every row.
inline void transpose_words(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: words 0-1 / 2-3 of rows i, i + 1 interleaved
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + k], lane L: word 4L + k of rows i .. i + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // the 4 x 4 lanes of r[k], r[4 + k], r[8 + k], r[12 + k]
    const __m512i v0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88), v1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[8 + k] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[4 + k] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// x [M, K] bf16 → [K/32][16 pairs][16 rows][2]: group g's B tile at xv + g * 512 (uint16_t), rows
// of x beyond M zero. A pair of bf16 values is one 32-bit word: per group, a 16 x 16 word transpose.
void vnni_x(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, uint16_t* xv) {
  for (int64_t g = 0; g < K / 32; ++g) {
    __m512i r[16];
    for (int m = 0; m < 16; ++m)
      r[m] = m < M ? _mm512_loadu_si512((const void*)(x + m * ldx + g * 32)) : _mm512_setzero_si512();
    transpose_words(r);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512((void*)(xv + (g * 16 + p) * 32), r[p]);
  }
}

// x_run_sums' sums (runs of `width` 16 or 32) from the VNNI x, all 16 rows at once: [K / width][16]
// (lanes = rows). Each lane adds its row's values in x_run_sums' order, so the sums are the same.
void vnni_run_sums(const uint16_t* xv, int64_t K, int width, float* out) {
  const int pairs = width / 2;
  for (int64_t j = 0; j < K / width; ++j) {
    __m512 sum = _mm512_setzero_ps();
    for (int p = 0; p < pairs; ++p) {  // one word per row: x[2p] in the low half, x[2p + 1] high
      const __m512i words = _mm512_loadu_si512((const void*)(xv + (j * pairs + p) * 32));
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(words, 16)));
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32((int)0xFFFF0000))));
    }
    _mm512_storeu_ps(out + j * 16, sum);
  }
}

struct AmxArgs {
  const uint16_t* xv;  // VNNI x, see vnni_x
  const float* xsum;   // [K/32][16] (formats with a minimum) or [K/16][16] (Q6_K), lanes = x rows
};

// Decodes group gi (of the whole row) of `rows` weight rows into an A buffer (Q6_K: two, one per 16).
template <class F, bool kFull>
inline void amx_decode(const Gemv& a, const DotWeights<F>& weights, int64_t n, int rows, int64_t gi,
                       uint16_t* abuf) {
  constexpr int G = F::kValues / 32;
  const uint8_t* row = a.w + n * a.row_bytes + (gi / G) * F::kBytes;
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    if (!kFull && r >= rows) break;
    const __m512i w = weights(row + r * a.row_bytes, (int)(gi % G));
    if constexpr (F::kBits == 6) {  // a scale per 16 weights: the halves in two A tiles
      _mm512_store_si512((void*)(abuf + r * 32), _mm512_maskz_mov_epi16(0x0000FFFF, w));
      _mm512_store_si512((void*)(abuf + 512 + r * 32), _mm512_maskz_mov_epi16(0xFFFF0000, w));
    } else {
      _mm512_store_si512((void*)(abuf + r * 32), w);
    }
  }
}

// The tile products of one group: A buffer(s) x B → C buffer(s), on tiles chosen by the parity
// (GCC's tile intrinsics take literal tile numbers). Q6_K's second halves share C tile 3.
template <bool kHalves>
inline void amx_multiply(int parity, const uint16_t* abuf, const uint16_t* bx, float* cbuf) {
  if (parity == 0) {  // C 0, A 1, B 2
    _tile_zero(0);
    _tile_loadd(1, abuf, 64);
    _tile_loadd(2, bx, 64);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, cbuf, 64);
  } else {  // C 5, A 6, B 7
    _tile_zero(5);
    _tile_loadd(6, abuf, 64);
    _tile_loadd(7, bx, 64);
    _tile_dpbf16ps(5, 6, 7);
    _tile_stored(5, cbuf, 64);
  }
  if constexpr (kHalves) {  // C 3, A 4, the same B
    _tile_zero(3);
    _tile_loadd(4, abuf + 512, 64);
    if (parity == 0)
      _tile_dpbf16ps(3, 4, 2);
    else
      _tile_dpbf16ps(3, 4, 7);
    _tile_stored(3, cbuf + 256, 64);
  }
}

// rows (<= 16) weight rows from n against the 16 (zero-padded) x rows. Two-stage pipeline over the
// groups gi of a row: the tiles multiply group gi while the next group is decoded into the other
// buffer (tiles are not renamed: alternate ones let consecutive groups overlap).
template <class F, bool kFull>
void amx_tile(const Gemv& a, const AmxArgs& b, int64_t n, int rows, uint16_t* abuf, float* cbuf) {
  constexpr bool kMin = F::kOffset < 0, kSixBits = F::kBits == 6;
  constexpr int G = F::kValues / 32;
  const int64_t groups = a.K / 32;
  __m512 acc[16];
  Scales s[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  const DotWeights<F> weights;
  amx_decode<F, kFull>(a, weights, n, rows, 0, abuf);
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t blk = gi / G;
    const int g = (int)(gi % G);
    const int parity = (int)(gi & 1);
    uint16_t* current = abuf + parity * 1024;
    float* result = cbuf + parity * 512;
    amx_multiply<kSixBits>(parity, current, b.xv + gi * 512, result);
    if (g == 0) {  // a new block: its scales (and Q6_K's 64 + 32 correction)
      const uint8_t* row = a.w + n * a.row_bytes + blk * F::kBytes;
      prefetch_next_tile<F, 16>(row, a.row_bytes);
      for (int r = 0; r < 16; ++r) {
        if (!kFull && r >= rows) break;
        prepare<F>(row + r * a.row_bytes, &s[r]);
        if constexpr (kSixBits) {  // -96 * scale times x's sums over each run of 16
          alignas(64) float minus[16];
          _mm512_store_ps(minus, q6k_minus(row + r * a.row_bytes));
#pragma GCC unroll 16
          for (int j = 0; j < 16; ++j)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(minus[j]), _mm512_loadu_ps(b.xsum + (blk * 16 + j) * 16), acc[r]);
        }
      }
    }
    if (gi + 1 < groups) amx_decode<F, kFull>(a, weights, n, rows, gi + 1, abuf + (parity ^ 1) * 1024);
    const __m512 xsum = kMin ? _mm512_loadu_ps(b.xsum + gi * 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      if (!kFull && r >= rows) break;
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r].s0[g]), _mm512_load_ps(result + r * 16), acc[r]);
      if constexpr (kSixBits)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r].s1[g]), _mm512_load_ps(result + 256 + r * 16), acc[r]);
      if constexpr (kMin) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r].off[g]), xsum, acc[r]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    alignas(64) float out[16];
    _mm512_store_ps(out, acc[r]);
    for (int64_t m = 0; m < a.M; ++m) store(a, m, n + r, out[m]);
  }
}

template <class F>
void gemv_amx(const Gemv& a, const AmxArgs& b, int threads) {  // a.M <= 16
  const int64_t tiles = (a.N + 15) / 16, chunk = min_chunk(tiles, threads);
  // a few tiles (v of q/k/v: 8) are quicker on one thread than the fork and join
#pragma omp parallel num_threads(tiles > 16 ? threads : 1)
  {
    alignas(64) uint16_t abuf[2048] = {};
    alignas(64) float cbuf[1024];
    amx_configure();
#pragma omp for schedule(guided, chunk)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n = t * 16;
      if (n + 16 <= a.N)
        amx_tile<F, true>(a, b, n, 16, abuf, cbuf);
      else
        amx_tile<F, false>(a, b, n, (int)(a.N - n), abuf, cbuf);
    }
  }  // tiles stay configured: releasing them cost ~7 µs a call here, and each user loads its own configuration
}

// the AMX path for x [M <= 16, K] bf16; the VNNI x and its sums in buffers kept by the thread
template <class F>
void run_amx(const uint16_t* x, int64_t ldx, Gemv a, int threads) {
  const int64_t M = a.M, K = a.K;
  thread_local std::vector<uint16_t> xv;
  thread_local std::vector<float> xsum;  // only formats with a minimum (sums over 32) and Q6_K (over 16) read it
  xv.resize((size_t)(K * 16));
  vnni_x(x, M, K, ldx, xv.data());
  if (F::kOffset < 0 || F::kBits == 6) {
    const int width = F::kBits == 6 ? 16 : 32;
    xsum.resize((size_t)(K / width * 16));
    vnni_run_sums(xv.data(), K, width, xsum.data());
  }
  gemv_amx<F>(a, AmxArgs{xv.data(), xsum.data()}, threads);
}
}  // namespace

bool amx_ready() { return amx_permitted(); }

bool amx_gemv(const QkGemv& c) {
  bool done = false;
  dispatch(c.type, [&](auto format) {
    using F = typename decltype(format)::type;
    if constexpr (kAmx<F>) {
      if (!amx_permitted()) return;
      const Gemv a = gemv_args(c);
      for (int64_t m0 = 0; m0 < c.M; m0 += 16) {
        Gemv rows = a;
        rows.M = c.M - m0 < 16 ? c.M - m0 : 16;
        rows.y = (uint8_t*)a.y + m0 * a.ldy * (a.y_bf16 ? 2 : 4);
        run_amx<F>((const uint16_t*)c.x + m0 * c.ldx, c.ldx, rows, c.threads);
      }
      done = true;
    }
  });
  return done;
}

}  // namespace qk
