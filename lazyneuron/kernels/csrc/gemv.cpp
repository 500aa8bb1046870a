// One GEMV family for batch 1 to 16: dense and sparse-input, weights in fp32, bf16 or int8.
//
// y[b, :] = bias + scale * sum_{i active} v[b, i] * Wt[i, :]
//   dense:        every row active, v = x
//   sparse input: row i of token b is active when |x[b,i] - c[i]| > t[i]; v = x - c
//                 (SCAP / TEAL; CATS' down projection)
//
// Wt is the weight stored input-channel-major, (in, out) contiguous (prepared once at convert
// time), so an inactive input channel is one contiguous row that is never read, and a dense pass
// is one contiguous stream. Rows may be a column block of a wider matrix (row stride ldw >= out):
// the runtime stores sibling projections of one input (q / k / v, gate / up) side by side, so one
// call reads all of them and each projection alone reads its block. int8 weights are weight-only with one fp32 scale per output channel
// (symmetric), accumulated in fp32. For batch > 1 a row is read once for all tokens that need it.
//
// Two schedules, both reading every weight byte once per call:
//   row split:    each thread streams a contiguous range of the active rows into its own (B, out)
//                 accumulator (L1 / L2), then the partial sums are added: the whole weight is
//                 read as long sequential streams (small and medium outputs, and batch 1);
//   column tiles: each thread owns tiles of output columns and streams the active rows' slices
//                 through a (B, tile) accumulator (large out x batch, e.g. the LM head at batch 8).
// Threads come from at::parallel_for (torch's own OpenMP runtime, no second one).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ln_check.h"
#include "ln_mem.h"
#include "ln_math.h"

#ifndef LN_PREFETCH
#define LN_PREFETCH 2048
#endif
#ifndef LN_HINT
#define LN_HINT _MM_HINT_T1  // into L2: its miss buffers, not L1's few, bound how many lines are in flight
#endif

namespace {

constexpr int64_t kMaxBatch = 16;
#ifndef LN_SPLIT_ACC
#define LN_SPLIT_ACC (256 * 1024)
#endif
constexpr int64_t kSplitAccBytes = LN_SPLIT_ACC;  // row split while a thread's (B, out) accumulator fits L2
constexpr int64_t kTileAccBytes = 16 * 1024;    // column tiles: a (B, tile) accumulator in L1
#ifndef LN_L1_ACC
#define LN_L1_ACC (24 * 1024)
#endif
constexpr int64_t kL1AccBytes = LN_L1_ACC;     // batch 1 reads one row at a time while its accumulator fits L1
#ifndef LN_DENSE_BELOW
#define LN_DENSE_BELOW 0.15
#endif
// A sparse-input call at batch 1 that skips fewer than this fraction of its rows reads them all as
// the dense stream (zero coefficients for the skipped ones): scattered rows cost more per byte than
// the dense stream, so below a break-even the sparse pass is the slower one. Measured on the
// SmolLM2 shapes: ~10% skipped for fp32 rows (2.3-12 KB), 15-30% for bf16 (1.1-6 KB); 15% sits
// between them (benchmarks in docs/runtime.md).
std::atomic<double> g_dense_below{LN_DENSE_BELOW};  // set_dense_below() changes it (0: every sparse call skips rows)

inline float ld(const float* p, int64_t j) { return p[j]; }
inline float ld(const uint16_t* p, int64_t j) {
  uint32_t u = static_cast<uint32_t>(p[j]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float ld(const int8_t* p, int64_t j) { return static_cast<float>(p[j]); }

// One SIMD vector of fp32 lanes, widened from the weight format as it is loaded.
#if defined(__AVX512F__)
constexpr int64_t kV = 16;
using vec = __m512;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline vec vload(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
inline vec vfma(float a, vec b, vec c) { return _mm512_fmadd_ps(_mm512_set1_ps(a), b, c); }
inline vec vfmav(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vbroadcast(float a) { return _mm512_set1_ps(a); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
// 2 * kV bf16 weights: the even ones (low halves, shifted up) and the odd ones (high halves, masked)
inline void vload_pairs(const uint16_t* p, vec& even, vec& odd) {
  const __m512i raw = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// columns back in order: (even, odd) of a block -> its first and second halves
inline void vinterleave(vec even, vec odd, vec& lo, vec& hi) {
  const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  lo = _mm512_permutex2var_ps(even, il, odd);
  hi = _mm512_permutex2var_ps(even, ih, odd);
}
constexpr int64_t kBB = 8;  // tokens whose accumulators are held in registers at once
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kV = 8;
using vec = __m256;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline vec vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec vfma(float a, vec b, vec c) { return _mm256_fmadd_ps(_mm256_set1_ps(a), b, c); }
inline vec vfmav(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vbroadcast(float a) { return _mm256_set1_ps(a); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline void vload_pairs(const uint16_t* p, vec& even, vec& odd) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void vinterleave(vec even, vec odd, vec& lo, vec& hi) {
  const __m256 a = _mm256_unpacklo_ps(even, odd), b = _mm256_unpackhi_ps(even, odd);  // e0 o0 e1 o1 | e4 o4 e5 o5 ; e2 o2 e3 o3 | e6 o6 e7 o7
  lo = _mm256_permute2f128_ps(a, b, 0x20);
  hi = _mm256_permute2f128_ps(a, b, 0x31);
}
constexpr int64_t kBB = 4;
#else
#define LN_SCALAR 1
constexpr int64_t kV = 1;
constexpr int64_t kBB = 4;
#endif
#ifndef LN_ROWS
#define LN_ROWS 8
#endif
constexpr int64_t kR = LN_ROWS;
constexpr int64_t kPrefetchBytes = LN_PREFETCH;  // how far ahead along each row stream the software prefetch runs
// Elements ahead for groups of R rows: R streams of kPrefetchBytes each, and a single fp32 / bf16
// stream (one row per pass) 4x as far, so that about as many bytes are in flight (8 KB measured
// at least as fast as 2 KB on the layer shapes; int8, bound by its widening, keeps 2 KB).
template <typename W, int64_t R>
constexpr int64_t prefetch_elems() { return (R == 1 && sizeof(W) >= 2 ? 4 : 1) * kPrefetchBytes / static_cast<int64_t>(sizeof(W)); }

// A buffer whose data starts on a 64-byte line, so that no SIMD access to accumulators or panels
// straddles two lines (std::vector's 16-byte alignment let them straddle: passes up to 2.5x
// slower, varying with where each allocation happened to land).
template <typename T>
struct Aligned {
  std::vector<T> buf;
  T* p = nullptr;
  explicit Aligned(int64_t n = 0, T v = T()) { assign(n, v); }
  T* assign(int64_t n, T v = T()) {
    buf.assign(static_cast<size_t>(n) + 64 / sizeof(T), v);
    p = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    return p;
  }
  T* data() { return p; }
};

// acc[b] (stride lda) += sum_{r < R} v[r * B + b] * rows[r][0 : n] for NB tokens b: each weight vector
// is widened once and applied to the NB accumulators, held in registers.
// Software prefetch: `ahead(r, pj)` gives the address pj elements further along row r's stream,
// a stream being row r of this group, then row r of the next group, and so on (nullptr past the
// end), so that short rows (sparse rows, small outputs) are fetched groups ahead.
// bf16 weights: each block of 2 * kV columns is read as one full vector of bf16 pairs and widened
// with a shift (the even columns) and a mask (the odd ones), no shuffles, so the accumulators hold
// the block's even columns, then its odd ones; unshuffle<W> restores column order at the end.
template <typename W, int64_t R, int64_t NB, typename Ahead>
inline void group_pass_nb(const W* const* rows, const Ahead& ahead, const float* v, int64_t B, float* acc, int64_t lda, int64_t n) {
  int64_t j = 0;
#ifndef LN_SCALAR
  constexpr int64_t pd = prefetch_elems<W, R>();  // elements ahead
  if constexpr (std::is_same_v<W, uint16_t>) {
    constexpr int64_t every2 = std::max<int64_t>(1, 64 / (4 * kV));  // blocks per cache line
    vec xb[R][NB];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t t = 0; t < NB; ++t) xb[r][t] = vbroadcast(v[r * B + t]);
    int64_t step = 0;
    for (; j + 2 * kV <= n; j += 2 * kV, ++step) {
      if (step % every2 == 0) {
        for (int64_t r = 0; r < R; ++r) {
          const W* p = ahead(r, j + pd);
          if (p) _mm_prefetch(reinterpret_cast<const char*>(p), LN_HINT);
        }
      }
      vec ae[NB], ao[NB];
      for (int64_t t = 0; t < NB; ++t) {
        ae[t] = vload(acc + t * lda + j);
        ao[t] = vload(acc + t * lda + j + kV);
      }
      for (int64_t r = 0; r < R; ++r) {
        vec we, wo;
        vload_pairs(rows[r] + j, we, wo);
        for (int64_t t = 0; t < NB; ++t) {
          ae[t] = vfmav(xb[r][t], we, ae[t]);
          ao[t] = vfmav(xb[r][t], wo, ao[t]);
        }
      }
      for (int64_t t = 0; t < NB; ++t) {
        vstore(acc + t * lda + j, ae[t]);
        vstore(acc + t * lda + j + kV, ao[t]);
      }
    }
  }
  constexpr int64_t every = std::max<int64_t>(1, 64 / (kV * static_cast<int64_t>(sizeof(W))));  // vectors per cache line
  int64_t step = 0;
  for (; j + kV <= n; j += kV, ++step) {
    if (step % every == 0) {
      for (int64_t r = 0; r < R; ++r) {
        const W* p = ahead(r, j + pd);
        if (p) _mm_prefetch(reinterpret_cast<const char*>(p), LN_HINT);
      }
    }
    vec a[NB];
    for (int64_t t = 0; t < NB; ++t) a[t] = vload(acc + t * lda + j);
    for (int64_t r = 0; r < R; ++r) {
      const vec w = vload(rows[r] + j);
      for (int64_t t = 0; t < NB; ++t) a[t] = vfma(v[r * B + t], w, a[t]);
    }
    for (int64_t t = 0; t < NB; ++t) vstore(acc + t * lda + j, a[t]);
  }
#endif
  for (; j < n; ++j)
    for (int64_t t = 0; t < NB; ++t) {
      float s = acc[t * lda + j];
      for (int64_t r = 0; r < R; ++r) s += v[r * B + t] * ld(rows[r], j);
      acc[t * lda + j] = s;
    }
}

template <typename W, int64_t R, typename Ahead>
inline void group_pass(const W* const* rows, const Ahead& ahead, const float* v, int64_t B, float* acc, int64_t lda, int64_t n) {
  auto none = [](int64_t, int64_t) -> const W* { return nullptr; };
  for (int64_t b0 = 0; b0 < B; b0 += kBB) {
    const float* vb = v + b0;
    float* ab = acc + b0 * lda;
    const int64_t nb = std::min<int64_t>(kBB, B - b0);
#define LN_NB(N)                                                           \
  case N:                                                                  \
    if (b0 == 0) group_pass_nb<W, R, N>(rows, ahead, vb, B, ab, lda, n);   \
    else group_pass_nb<W, R, N>(rows, none, vb, B, ab, lda, n);            \
    break;
    switch (nb) {
      LN_NB(1)
      LN_NB(2)
      LN_NB(3)
      LN_NB(4)
#if defined(__AVX512F__)
      LN_NB(5)
      LN_NB(6)
      LN_NB(7)
      LN_NB(8)
#endif
    }
#undef LN_NB
  }
}

// rows x len accumulators (stride lda) filled by group_pass over bf16 weights: each full block of
// 2 * kV columns back from (even columns, odd columns) to column order. Other formats: nothing to do.
template <typename W>
inline void unshuffle(float* acc, int64_t rows, int64_t lda, int64_t len) {
#ifndef LN_SCALAR
  if constexpr (std::is_same_v<W, uint16_t>) {
    for (int64_t b = 0; b < rows; ++b) {
      float* a = acc + b * lda;
      for (int64_t j = 0; j + 2 * kV <= len; j += 2 * kV) {
        vec lo, hi;
        vinterleave(vload(a + j), vload(a + j + kV), lo, hi);
        vstore(a + j, lo);
        vstore(a + j + kV, hi);
      }
    }
  }
#endif
}

// One token (batch 1), a group of R rows: acc[0 : n] += sum_r v[r] * rows[r][0 : n], the
// accumulators loaded and stored once per group. Each row slot's stream is prefetched without a
// branch per vector: the line pd elements ahead lies in the group G ahead for j < jsw (at
// near[r] + j) and in the group G + 1 ahead from jsw on (at far[r] + j); a slot with nothing
// ahead points at its own row (a line being read).
template <typename W, int64_t R>
inline void group_pass_b1(const W* const* rows, const W* const* near, const W* const* far, int64_t jsw, const float* v, float* acc, int64_t n) {
  int64_t j = 0;
#ifndef LN_SCALAR
  vec xb[R];
  for (int64_t r = 0; r < R; ++r) xb[r] = vbroadcast(v[r]);
  constexpr int64_t step = std::is_same_v<W, uint16_t> ? 2 * kV : kV;  // elements per vector of weights
  constexpr int64_t every = std::max<int64_t>(1, 64 / (step * static_cast<int64_t>(sizeof(W))));  // vectors per line
  auto body = [&](int64_t c, const W* const* pf, int64_t s) {
    if (s % every == 0)
      for (int64_t r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + c), LN_HINT);
    if constexpr (std::is_same_v<W, uint16_t>) {
      vec ae = vload(acc + c), ao = vload(acc + c + kV);
      for (int64_t r = 0; r < R; ++r) {
        vec we, wo;
        vload_pairs(rows[r] + c, we, wo);
        ae = vfmav(xb[r], we, ae);
        ao = vfmav(xb[r], wo, ao);
      }
      vstore(acc + c, ae);
      vstore(acc + c + kV, ao);
    } else {
      vec a = vload(acc + c);
      for (int64_t r = 0; r < R; ++r) a = vfmav(xb[r], vload(rows[r] + c), a);
      vstore(acc + c, a);
    }
  };
  const int64_t full = n / step * step, mid = std::min(full, (jsw + step - 1) / step * step);
  int64_t s = 0;
  for (; j < mid; j += step, ++s) body(j, near, s);
  for (; j < full; j += step, ++s) body(j, far, s);
  if constexpr (std::is_same_v<W, uint16_t>) {  // a last block of kV columns: as group_pass, in column order
    for (; j + kV <= n; j += kV) {
      vec a = vload(acc + j);
      for (int64_t r = 0; r < R; ++r) a = vfmav(xb[r], vload(rows[r] + j), a);
      vstore(acc + j, a);
    }
  }
#endif
  for (; j < n; ++j) {
    float t = acc[j];
    for (int64_t r = 0; r < R; ++r) t += v[r] * ld(rows[r], j);
    acc[j] = t;
  }
}

// acc (B rows, stride lda) += sum_{k in [k0, k1)} vals[k*B + b] * Wt[row k, j0 : j0 + len]
// in groups of R rows: the accumulators are loaded and stored once per group
template <typename W, int64_t R>
void rows_pass_r(const W* wt, int64_t out, const int32_t* idx, const float* vals, int64_t B, int64_t k0, int64_t k1, int64_t j0,
               int64_t len, float* acc, int64_t lda) {
  auto row = [&](int64_t k) { return wt + (idx ? static_cast<int64_t>(idx[k]) : k) * out + j0; };
  const W* rows[R];
  const W* far0[R];  // row r, G groups ahead, and G + 1 groups ahead, where G = prefetch distance / row length
  const W* far1[R];
  constexpr int64_t pd = prefetch_elems<W, R>();
  const int64_t G = len > 0 ? pd / len : 0, base = G * len;
  int64_t k = k0;
  for (; k + R <= k1; k += R) {
    for (int64_t r = 0; r < R; ++r) {
      rows[r] = row(k + r);
      const int64_t a = k + G * R + r, b = a + R;
      far0[r] = a < k1 ? row(a) : nullptr;
      far1[r] = b < k1 ? row(b) : nullptr;
    }
    if (B == 1) {  // one token: the same pass without a branch per vector for its prefetches (1.1-1.25x on fp32 sparse rows)
      const W* near[R];
      const W* far[R];
      for (int64_t r = 0; r < R; ++r) {
        near[r] = far0[r] ? far0[r] + (pd - base) : rows[r];
        far[r] = far1[r] ? far1[r] + (pd - base - len) : rows[r];
      }
      group_pass_b1<W, R>(rows, near, far, base + len - pd, vals + k, acc, len);
      continue;
    }
    auto ahead = [&](int64_t r, int64_t pj) -> const W* {  // pj = j + pd with 0 <= j < len: G or G + 1 groups ahead
      const int64_t off = pj - base;
      if (off < len) return far0[r] ? far0[r] + off : nullptr;
      return far1[r] ? far1[r] + (off - len) : nullptr;
    };
    group_pass<W, R>(rows, ahead, vals + k * B, B, acc, lda, len);
  }
  auto none = [](int64_t, int64_t) -> const W* { return nullptr; };
  for (; k < k1; ++k) {
    rows[0] = row(k);
    group_pass<W, 1>(rows, none, vals + k * B, B, acc, lda, len);
  }
}

// Dense batch 1 over whole contiguous rows (row stride = len): the rows [k0, k1) are one buffer,
// read as a single stream with the prefetch running linearly ahead across row ends, one prefetch
// per line and no per-row set-up beyond the input value's broadcast (no per-row pointers or
// prefetch bookkeeping as in the grouped path). Same column order in the accumulators as
// group_pass (bf16: blocks of 2 * kV as even, then odd columns).
// fp32 rows take kUnroll lines per iteration: with one line (one vector) per iteration the loop
// was a handful of instructions whose speed depended on where the build happened to place them
// (identical code 0.73-1.24x from one build to the next, measured); four lines per iteration ran
// 1.06-1.4x faster than those builds on every fp32 layer shape, whatever the loop's alignment.
// bf16 (two vectors a line) and int8 (four) measured no faster unrolled.
#ifndef LN_UNROLL
#define LN_UNROLL 4
#endif
template <typename W>
void dense_stream(const W* wt, const float* vals, int64_t k0, int64_t k1, int64_t len, float* acc) {
#ifndef LN_SCALAR
  constexpr int64_t pd = prefetch_elems<W, 1>();
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(W));  // elements per 64-byte line: one prefetch each
  constexpr int64_t kUnroll = std::is_same_v<W, float> ? LN_UNROLL : 1;
#endif
  for (int64_t k = k0; k < k1; ++k) {
    const W* row = wt + k * len;
    int64_t j = 0;
#ifndef LN_SCALAR
    const vec xv = vbroadcast(vals[k]);
    auto pairs = [&](int64_t c) {
      vec we, wo;
      vload_pairs(reinterpret_cast<const uint16_t*>(row) + c, we, wo);
      vstore(acc + c, vfmav(xv, we, vload(acc + c)));
      vstore(acc + c + kV, vfmav(xv, wo, vload(acc + c + kV)));
    };
    auto single = [&](int64_t c) { vstore(acc + c, vfmav(xv, vload(row + c), vload(acc + c))); };
    if constexpr (std::is_same_v<W, uint16_t>) {
      for (; j + line <= len; j += line) {
        _mm_prefetch(reinterpret_cast<const char*>(row + j + pd), LN_HINT);
        for (int64_t u = 0; u < line; u += 2 * kV) pairs(j + u);
      }
      for (; j + 2 * kV <= len; j += 2 * kV) pairs(j);
    } else {
      for (; kUnroll > 1 && j + kUnroll * line <= len; j += kUnroll * line) {
        for (int64_t q = 0; q < kUnroll; ++q) _mm_prefetch(reinterpret_cast<const char*>(row + j + q * line + pd), LN_HINT);
        for (int64_t u = 0; u < kUnroll * line; u += kV) single(j + u);
      }
      for (; j + line <= len; j += line) {
        _mm_prefetch(reinterpret_cast<const char*>(row + j + pd), LN_HINT);
        for (int64_t u = 0; u < line; u += kV) single(j + u);
      }
    }
    for (; j + kV <= len; j += kV) single(j);
#endif
    for (; j < len; ++j) acc[j] += vals[k] * ld(row, j);
  }
}

// Dense at batch 1: with the accumulators in L1, one row at a time, so that each thread reads its
// rows as one sequential stream; larger accumulators, 4 rows per pass. Sparse rows (scattered) and
// more tokens: kR rows per pass, several streams in flight, the accumulators loaded and stored
// once per kR rows (all measured: benchmarks in docs/runtime.md).
template <typename W>
void rows_pass(const W* wt, int64_t out, const int32_t* idx, const float* vals, int64_t B, int64_t k0, int64_t k1, int64_t j0,
               int64_t len, float* acc, int64_t lda) {
  if (B == 1 && !idx && len * static_cast<int64_t>(sizeof(float)) <= kL1AccBytes && out == len && lda == len)
    dense_stream<W>(wt, vals, k0, k1, len, acc);
  else if (B == 1 && !idx && len * static_cast<int64_t>(sizeof(float)) <= kL1AccBytes)
    rows_pass_r<W, 1>(wt, out, idx, vals, B, k0, k1, j0, len, acc, lda);
  else if (B == 1 && !idx)
    rows_pass_r<W, 4>(wt, out, idx, vals, B, k0, k1, j0, len, acc, lda);
  else
    rows_pass_r<W, kR>(wt, out, idx, vals, B, k0, k1, j0, len, acc, lda);
}

inline void finish(float* y, const float* acc, const float* bias, const float* scale, int64_t len) {
  if (scale && bias) {
    for (int64_t j = 0; j < len; ++j) y[j] = bias[j] + scale[j] * acc[j];
  } else if (scale) {
    for (int64_t j = 0; j < len; ++j) y[j] = scale[j] * acc[j];
  } else if (bias) {
    for (int64_t j = 0; j < len; ++j) y[j] = bias[j] + acc[j];
  } else {
    std::memcpy(y, acc, len * sizeof(float));
  }
}

// y (B, out) = finish(sum_{k < n} vals[k * B + b] * Wt[idx ? idx[k] : k, :]): the weight rows in
// idx (all rows when idx is null) read once for all B tokens. Returns n.
template <typename W>
int64_t apply_rows(const W* wt, const float* scale, const float* bias, const int32_t* idx, int64_t n, const float* vp, float* y, int64_t B,
                   int64_t out, int64_t ldw) {
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());

  if (B * out * static_cast<int64_t>(sizeof(float)) <= kSplitAccBytes) {
    // 2a. row split: contiguous row ranges (multiples of 4) per part, partial sums added at the end
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 32));
    // each token's accumulator row starts on a 64-byte line: its stride is out rounded up to 16 floats
    const int64_t ld = (out + 15) & ~int64_t(15);
    thread_local Aligned<float> partial;
    float* pp = partial.assign(parts * B * ld, 0.f);
    const int64_t lda = B == 1 ? out : ld;  // one token: a single row, stride out (the linear loop's condition)
    auto bound = [&](int64_t p) { return p == parts ? n : (n * p / parts) / kR * kR; };
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) rows_pass(wt, ldw, idx, vp, B, bound(p), bound(p + 1), 0, out, pp + p * B * ld, lda);
    });
    for (int64_t p = 1; p < parts; ++p) {
      const float* src = pp + p * B * ld;
#pragma GCC ivdep
      for (int64_t j = 0; j < B * ld; ++j) pp[j] += src[j];
    }
    unshuffle<W>(pp, B, lda, out);
    for (int64_t b = 0; b < B; ++b) finish(y + b * out, pp + b * lda, bias, scale, out);
    return n;
  }
  // 2b. column tiles
  int64_t tile = std::max<int64_t>(64, (kTileAccBytes / static_cast<int64_t>(sizeof(float)) / B) & ~int64_t(15));
  tile = std::min<int64_t>(tile, (((out + nthreads - 1) / nthreads) + 15) & ~int64_t(15));
  const int64_t ntiles = (out + tile - 1) / tile;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    Aligned<float> acc(B * tile);
    for (int64_t tt = t0; tt < t1; ++tt) {
      const int64_t j0 = tt * tile, len = std::min(tile, out - j0);
      std::fill(acc.data(), acc.data() + B * tile, 0.f);
      rows_pass(wt, ldw, idx, vp, B, 0, n, j0, len, acc.data(), tile);
      unshuffle<W>(acc.data(), B, tile, len);
      for (int64_t b = 0; b < B; ++b)
        finish(y + b * out + j0, acc.data() + b * tile, bias ? bias + j0 : nullptr, scale ? scale + j0 : nullptr, len);
    }
  });
  return n;
}

// Returns the number of weight rows read. thr == nullptr: dense.
template <typename W>
int64_t run(const float* x, const W* wt, const float* scale, const float* bias, const float* centre, const float* thr, bool thr_per_channel,
            float* y, int64_t B, int64_t in, int64_t out, int64_t ldw) {
  // 1. the rows to read and each token's coefficient: vals[k * B + b] (zero where token b skips row k)
  thread_local std::vector<int32_t> idx_buf;
  thread_local std::vector<float> vals;
  vals.resize(static_cast<size_t>(in * B));
  const int32_t* idx = nullptr;
  int64_t n = in;
  if (!thr) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < in; ++i) vals[i * B + b] = x[b * in + i];
  } else {
    idx_buf.resize(static_cast<size_t>(in));
    n = 0;
    for (int64_t i = 0; i < in; ++i) {
      const float c = centre ? centre[i] : 0.f;
      const float t = thr_per_channel ? thr[i] : thr[0];
      bool any = false;
      for (int64_t b = 0; b < B; ++b) {
        const float d = x[b * in + i] - c;
        const bool a = std::fabs(d) > t;
        vals[n * B + b] = a ? d : 0.f;
        any |= a;
      }
      if (any) idx_buf[n++] = static_cast<int32_t>(i);
    }
    idx = idx_buf.data();
    if (B == 1 && static_cast<double>(in - n) < g_dense_below.load(std::memory_order_relaxed) * static_cast<double>(in)) {
      // too few rows skipped to pay for reading the rest as scattered rows: every row in one
      // stream, the skipped ones with coefficient 0 (same sum; all rows are reported read)
      for (int64_t i = 0; i < in; ++i) {
        const float d = x[i] - (centre ? centre[i] : 0.f);
        vals[i] = std::fabs(d) > (thr_per_channel ? thr[i] : thr[0]) ? d : 0.f;
      }
      idx = nullptr;
      n = in;
    }
  }
  return apply_rows<W>(wt, scale, bias, idx, n, vals.data(), y, B, out, ldw);
}


// y (N, out) = finish(x (N, in) @ Wt) for a long input (prefill, encoder forwards) over fp32, bf16
// or int8 weights, without widening the weight into a full fp32 copy. Blocked like a BLAS GEMM:
// tokens in blocks of kGemmTokens; for each block, output columns in tiles of kNR and the input
// dimension in slices of kKC; each (kKC, kNR) weight slice is widened once into a packed fp32 panel
// (L1 / L2) that every micro-tile of kMR tokens of the block then multiplies with its kMR x kNR
// accumulators held in registers (each x value broadcast once per panel row).
#if defined(__AVX512F__)
constexpr int64_t kMR = 6, kNRV = 4;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kMR = 6, kNRV = 2;
#else
constexpr int64_t kMR = 4, kNRV = 4;
#endif
constexpr int64_t kNR = kNRV * kV;  // output columns per tile
constexpr int64_t kKC = 256;        // input channels per packed panel
constexpr int64_t kGemmTokens = 96; // at most this many tokens per block (a multiple of kMR on every path)

// c (MR, kNR, stride kNR) += x (MR rows, stride ldx, kc columns) @ panel (kc, kNR), over the first
// NV vectors of columns (a tile's tail narrower than kNR computes only the vectors it needs)
template <int64_t MR, int64_t NV = kNRV>
inline void gemm_micro(const float* x, int64_t ldx, const float* panel, int64_t kc, float* c) {
#ifndef LN_SCALAR
  vec acc[MR][NV];
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t n = 0; n < NV; ++n) acc[m][n] = vload(c + m * kNR + n * kV);
  for (int64_t k = 0; k < kc; ++k) {
    vec w[NV];
    for (int64_t n = 0; n < NV; ++n) w[n] = vload(panel + k * kNR + n * kV);
    for (int64_t m = 0; m < MR; ++m) {
      const float a = x[m * ldx + k];
      for (int64_t n = 0; n < NV; ++n) acc[m][n] = vfma(a, w[n], acc[m][n]);
    }
  }
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t n = 0; n < NV; ++n) vstore(c + m * kNR + n * kV, acc[m][n]);
#else
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t m = 0; m < MR; ++m)
      for (int64_t j = 0; j < NV * kV; ++j) c[m * kNR + j] += x[m * ldx + k] * panel[k * kNR + j];
#endif
}

// f(std::integral_constant<int64_t, NV>) with NV = the vectors that len columns need (at most kNRV)
template <typename F>
inline void with_vectors(int64_t len, const F& f) {
  const int64_t nv = (len + kV - 1) / kV;
  if (nv <= 1) f(std::integral_constant<int64_t, 1>{});
  else if (nv == 2) f(std::integral_constant<int64_t, std::min<int64_t>(2, kNRV)>{});
  else if (nv == 3) f(std::integral_constant<int64_t, std::min<int64_t>(3, kNRV)>{});
  else f(std::integral_constant<int64_t, kNRV>{});
}

// The GEMM's work items: token blocks of equal size (multiples of kMR, at most kGemmTokens) times
// output tiles of kNR, enough items to keep the threads even. item(it) gives (first token, tokens,
// first column, columns) of item it.
struct GemmGrid {
  int64_t N, out, ntiles, bs, items;
  // serial: one thread runs every item, so tokens are not split into more blocks than kGemmTokens
  // needs (each block packs its own weight panels)
  GemmGrid(int64_t n, int64_t o, bool serial = false) : N(n), out(o), ntiles((o + kNR - 1) / kNR) {
    const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
    int64_t nblk = (N + kGemmTokens - 1) / kGemmTokens;
    if (!serial) nblk = std::max<int64_t>(nblk, (8 * nthreads + ntiles - 1) / ntiles);
    bs = std::min(kGemmTokens, ((N + nblk - 1) / nblk + kMR - 1) / kMR * kMR);
    items = (N + bs - 1) / bs * ntiles;
  }
  void item(int64_t it, int64_t& b0, int64_t& nb, int64_t& j0, int64_t& len) const {
    b0 = it / ntiles * bs;
    nb = std::min(bs, N - b0);
    j0 = it % ntiles * kNR;
    len = std::min(kNR, out - j0);
  }
};

// f(std::integral_constant<int64_t, R>, m) for each micro-tile of R tokens starting at m of a block
// of nb tokens: full tiles of kMR, then the tail
template <typename F>
inline void for_micro_tiles(int64_t nb, const F& f) {
  int64_t m = 0;
  for (; m + kMR <= nb; m += kMR) f(std::integral_constant<int64_t, kMR>{}, m);
  switch (nb - m) {
    case 1: f(std::integral_constant<int64_t, 1>{}, m); break;
    case 2: f(std::integral_constant<int64_t, 2>{}, m); break;
    case 3: f(std::integral_constant<int64_t, 3>{}, m); break;
    case 4: f(std::integral_constant<int64_t, 4>{}, m); break;
    case 5: f(std::integral_constant<int64_t, 5>{}, m); break;
    default: break;
  }
}

// y rows [b0, b0 + nb), columns [j0, j0 + len) from the (nb, kNR) accumulators
inline void gemm_finish(float* y, const float* acc, const float* bias, const float* scale, int64_t b0, int64_t nb, int64_t j0, int64_t len,
                        int64_t out) {
  for (int64_t b = 0; b < nb; ++b)
    finish(y + (b0 + b) * out + j0, acc + b * kNR, bias ? bias + j0 : nullptr, scale ? scale + j0 : nullptr, len);
}

template <typename W>
void gemm_run(const float* x, const W* wt, const float* scale, const float* bias, float* y, int64_t N, int64_t in, int64_t out, int64_t ldw,
              bool serial = false) {
  const GemmGrid grid(N, out, serial);
  auto body = [&](int64_t i0, int64_t i1) {
    Aligned<float> panel(kKC * kNR), acc(kGemmTokens * kNR);
    for (int64_t it = i0; it < i1; ++it) {
      int64_t b0, nb, j0, len;
      grid.item(it, b0, nb, j0, len);
      std::fill(acc.data(), acc.data() + nb * kNR, 0.f);
      for (int64_t k0 = 0; k0 < in; k0 += kKC) {
        const int64_t kc = std::min(kKC, in - k0);
        for (int64_t k = 0; k < kc; ++k) {  // widen the (kc, len) weight slice into the panel, zero past len
          const W* src = wt + (k0 + k) * ldw + j0;
          float* dst = panel.data() + k * kNR;
          int64_t j = 0;
#ifndef LN_SCALAR
          if (len == kNR)
            for (; j < kNR; j += kV) vstore(dst + j, vload(src + j));
#endif
          for (; j < len; ++j) dst[j] = ld(src, j);
          for (; j < kNR; ++j) dst[j] = 0.f;
        }
        const float* xb = x + b0 * in + k0;
        with_vectors(len, [&](auto nv) {
          for_micro_tiles(nb, [&](auto mr, int64_t m) {
            gemm_micro<decltype(mr)::value, decltype(nv)::value>(xb + m * in, in, panel.data(), kc, acc.data() + m * kNR);
          });
        });
      }
      gemm_finish(y, acc.data(), bias, scale, b0, nb, j0, len, out);
    }
  };
  if (serial) body(0, grid.items);
  else at::parallel_for(0, grid.items, 1, body);
}

// bf16 and int8 weights on CPUs with AVX512_BF16: the input is rounded to bf16 (nearest even) and
// each instruction multiplies pairs of input channels (vdpbf16ps: 32 products per 512 bits,
// accumulated in fp32), twice the fp32 FMA rate; int8 values are exact in bf16. Panels hold (input-channel pair, column) as one 32-bit lane:
// the low half the even channel, the high half the odd one; an odd input dimension pads with zero.
// Toggled by set_bf16_dot (on by default) so that callers can check the fp32-compute result too.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LN_BF16_DOT 1
#endif
bool g_bf16_dot = true;

#ifdef LN_BF16_DOT
// c (MR, kNR, stride kNR) += x (MR rows of bf16 pairs, stride ldx) . panel (kp pairs, kNR columns)
template <int64_t MR, int64_t NV = kNRV>
inline void gemm_micro_bf16(const uint32_t* x, int64_t ldx, const uint32_t* panel, int64_t kp, float* c) {
  __m512 acc[MR][NV];
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t n = 0; n < NV; ++n) acc[m][n] = _mm512_loadu_ps(c + m * kNR + n * kV);
  for (int64_t p = 0; p < kp; ++p) {
    __m512bh w[NV];
    for (int64_t n = 0; n < NV; ++n) w[n] = (__m512bh)_mm512_loadu_si512(panel + p * kNR + n * kV);
    for (int64_t m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * ldx + p]));
      for (int64_t n = 0; n < NV; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], a, w[n]);
    }
  }
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t n = 0; n < NV; ++n) _mm512_storeu_ps(c + m * kNR + n * kV, acc[m][n]);
}

// bf16 bits of 16 weights of row `lo` (the even channel, low halves) and `hi` (the odd one, high
// halves): bf16 as stored; int8 exactly (a small integer's fp32 bits end in 16 zero bits), its
// per-output scale applied at the end as in every other path.
inline __m512i bf16_bits(const uint16_t* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512i bf16_bits(const int8_t* p) {
  return _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))), 16);
}
inline uint32_t bf16_bits1(uint16_t v) { return v; }
inline uint32_t bf16_bits1(int8_t v) {
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u >> 16;
}

template <typename W>
void gemm_run_bf16(const float* x, const W* wt, const float* scale, const float* bias, float* y, int64_t N, int64_t in, int64_t out,
                   int64_t ldw, bool serial = false) {
  const int64_t inp = (in + 1) / 2;  // input-channel pairs per token
  std::vector<uint32_t> xb(static_cast<size_t>(N * inp));
  auto pairs = [&](int64_t r0, int64_t r1) {  // the input in bf16 pairs, zero-padded
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = x + r * in;
      uint16_t* dst = reinterpret_cast<uint16_t*>(xb.data() + r * inp);
      int64_t k = 0;
      for (; k + 32 <= in; k += 32)
        _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k)));
      for (; k < in; ++k) dst[k] = c10::BFloat16(src[k]).x;
      if (in & 1) dst[in] = 0;
    }
  };
  if (serial) pairs(0, N);
  else at::parallel_for(0, N, 8, pairs);
  const GemmGrid grid(N, out, serial);
  auto body = [&](int64_t i0, int64_t i1) {
    Aligned<uint32_t> panel(kKC / 2 * kNR);
    Aligned<float> acc(kGemmTokens * kNR);
    for (int64_t it = i0; it < i1; ++it) {
      int64_t b0, nb, j0, len;
      grid.item(it, b0, nb, j0, len);
      std::fill(acc.data(), acc.data() + nb * kNR, 0.f);
      for (int64_t k0 = 0; k0 < in; k0 += kKC) {
        const int64_t kc = std::min(kKC, in - k0), kp = (kc + 1) / 2;
        for (int64_t pp = 0; pp < kp; ++pp) {  // pair rows k0 + 2 pp and k0 + 2 pp + 1 of the (kc, len) slice, zero past len
          const W* lo = wt + (k0 + 2 * pp) * ldw + j0;
          const W* hi = k0 + 2 * pp + 1 < in ? lo + ldw : nullptr;
          uint32_t* dst = panel.data() + pp * kNR;
          int64_t j = 0;
          if (len == kNR && hi)
            for (; j < kNR; j += kV) _mm512_storeu_si512(dst + j, _mm512_or_si512(bf16_bits(lo + j), _mm512_slli_epi32(bf16_bits(hi + j), 16)));
          for (; j < len; ++j) dst[j] = bf16_bits1(lo[j]) | (hi ? bf16_bits1(hi[j]) << 16 : 0u);
          for (; j < kNR; ++j) dst[j] = 0u;
        }
        const uint32_t* xp = xb.data() + b0 * inp + k0 / 2;
        with_vectors(len, [&](auto nv) {
          for_micro_tiles(nb, [&](auto mr, int64_t m) {
            gemm_micro_bf16<decltype(mr)::value, decltype(nv)::value>(xp + m * inp, inp, panel.data(), kp, acc.data() + m * kNR);
          });
        });
      }
      gemm_finish(y, acc.data(), bias, scale, b0, nb, j0, len, out);
    }
  };
  if (serial) body(0, grid.items);
  else at::parallel_for(0, grid.items, 1, body);
}

// Non-causal attention without a mask for long inputs (encoder self-attention), bf16 dot products:
// q, k, v (B, T, H, D) fp32 contiguous (the projections' own layout), D even and <= kNR; out (B, T,
// H, D) = softmax(scale * q k^T) v per (batch, head). Flash-style: keys in blocks of kNR, each
// query block of kMR rows keeps a running max, sum and output; q * scale, k, the probabilities and
// v are rounded to bf16, every product accumulated in fp32, the softmax in fp32.
// exp of 16 lanes (exp_fast's polynomial; 2^n applied with scalef)
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 32 floats -> 16 bf16 pairs (element 2i in the low half of lane i), rounded to nearest even
inline __m512i bf16_pairs32(const float* p) { return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p)); }

template <int64_t MR>
void attn_block(const uint32_t* qp, int64_t kp, const uint32_t* kpan, const uint32_t* vpan, int64_t nkb, int64_t T, float* o, float* m, float* l) {
  static_assert(kNR == 64, "one key block is four vectors");
  alignas(64) float sc[MR * kNR];
  alignas(64) uint32_t pp[MR * kNR / 2];
  for (int64_t kb = 0; kb < nkb; ++kb) {
    std::fill(sc, sc + MR * kNR, 0.f);
    gemm_micro_bf16<MR>(qp, kp, kpan + kb * kp * kNR, kp, sc);
    const int64_t valid = std::min<int64_t>(kNR, T - kb * kNR);
    __mmask16 keep[4];
    for (int64_t n = 0; n < 4; ++n) {
      const int64_t c = std::max<int64_t>(0, std::min<int64_t>(16, valid - 16 * n));
      keep[n] = static_cast<__mmask16>(c >= 16 ? 0xFFFF : (1u << c) - 1u);
    }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t r = 0; r < MR; ++r) {
      float* srow = sc + r * kNR;
      __m512 sv[4];
      for (int64_t n = 0; n < 4; ++n) sv[n] = _mm512_mask_mov_ps(ninf, keep[n], _mm512_load_ps(srow + 16 * n));
      const float mx = std::max(m[r], _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(sv[0], sv[1]), _mm512_max_ps(sv[2], sv[3]))));
      const float corr = exp_fast(m[r] - mx);
      const __m512 mxv = _mm512_set1_ps(mx);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t n = 0; n < 4; ++n) {
        const __m512 e = _mm512_maskz_mov_ps(keep[n], exp512(_mm512_sub_ps(sv[n], mxv)));
        _mm512_store_ps(srow + 16 * n, e);
        sum = _mm512_add_ps(sum, e);
      }
      l[r] = l[r] * corr + _mm512_reduce_add_ps(sum);
      m[r] = mx;
      float* orow = o + r * kNR;
      const __m512 cv = _mm512_set1_ps(corr);
      for (int64_t n = 0; n < 4; ++n) _mm512_storeu_ps(orow + 16 * n, _mm512_mul_ps(cv, _mm512_loadu_ps(orow + 16 * n)));
      _mm512_store_si512(pp + r * (kNR / 2), bf16_pairs32(srow));
      _mm512_store_si512(pp + r * (kNR / 2) + 16, bf16_pairs32(srow + 32));
    }
    gemm_micro_bf16<MR>(pp, kNR / 2, vpan + kb * (kNR / 2) * kNR, kNR / 2, o);
  }
}

torch::Tensor attn_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  LN_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat32 && q.is_contiguous() && k.sizes() == q.sizes() && v.sizes() == q.sizes() &&
               k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 && k.is_contiguous() && v.is_contiguous(), 22);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  LN_CHECK(D % 2 == 0 && D <= kNR && T >= 1, 22);
  const int64_t kp = D / 2, nkb = (T + kNR - 1) / kNR, ld = H * D;
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  // per (batch, head): keys as (channel pair, key) panels of kNR keys, values as (key pair, channel)
  std::vector<uint32_t> kpan(static_cast<size_t>(B * H * nkb * kp * kNR)), vpan(static_cast<size_t>(B * H * nkb * (kNR / 2) * kNR));
  at::parallel_for(0, B * H * nkb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / nkb, kb = i % nkb, b = bh / H, h = bh % H;
      uint32_t* kq = kpan.data() + i * kp * kNR;
      uint32_t* vq = vpan.data() + i * (kNR / 2) * kNR;
      alignas(64) float row[kNR];
      alignas(64) uint32_t pairs[kNR / 2];
      for (int64_t j = 0; j < kNR; ++j) {  // key j's channels in pairs, down column j of the panel
        const int64_t t = kb * kNR + j;
        if (t >= T) {
          for (int64_t p = 0; p < kp; ++p) kq[p * kNR + j] = 0u;
          continue;
        }
        std::memcpy(row, kd + (b * T + t) * ld + h * D, D * sizeof(float));
        std::fill(row + D, row + kNR, 0.f);
        _mm512_store_si512(pairs, bf16_pairs32(row));
        _mm512_store_si512(pairs + 16, bf16_pairs32(row + 32));
        for (int64_t p = 0; p < kp; ++p) kq[p * kNR + j] = pairs[p];
      }
      alignas(64) float r0[kNR], r1[kNR];
      for (int64_t p = 0; p < kNR / 2; ++p) {  // keys 2p and 2p + 1 of the block, channel by channel
        const int64_t t0 = kb * kNR + 2 * p, t1 = t0 + 1;
        if (t0 < T) std::memcpy(r0, vd + (b * T + t0) * ld + h * D, D * sizeof(float)); else std::fill(r0, r0 + D, 0.f);
        if (t1 < T) std::memcpy(r1, vd + (b * T + t1) * ld + h * D, D * sizeof(float)); else std::fill(r1, r1 + D, 0.f);
        std::fill(r0 + D, r0 + kNR, 0.f);
        std::fill(r1 + D, r1 + kNR, 0.f);
        for (int64_t c = 0; c < kNR; c += 16) {
          const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(r0 + c)));
          const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(r1 + c)));
          _mm512_storeu_si512(vq + p * kNR + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
    }
  });
  auto out = torch::empty_like(q);
  float* od = out.data_ptr<float>();
  const int64_t nqb = (T + kMR - 1) / kMR;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float o[kMR * kNR];
    alignas(64) float qrow[kNR];
    alignas(64) uint32_t qpairs[kNR / 2];
    std::vector<uint32_t> qp(static_cast<size_t>(kMR * kp));
    float m[kMR], l[kMR];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / nqb, qb = i % nqb, b = bh / H, h = bh % H;
      const int64_t t0 = qb * kMR, rows = std::min<int64_t>(kMR, T - t0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* qr = qd + (b * T + t0 + r) * ld + h * D;
        for (int64_t c = 0; c < D; ++c) qrow[c] = sc * qr[c];
        std::fill(qrow + D, qrow + kNR, 0.f);
        _mm512_store_si512(qpairs, bf16_pairs32(qrow));
        _mm512_store_si512(qpairs + 16, bf16_pairs32(qrow + 32));
        std::memcpy(qp.data() + r * kp, qpairs, kp * sizeof(uint32_t));
      }
      std::fill(o, o + kMR * kNR, 0.f);
      std::fill(m, m + kMR, -INFINITY);
      std::fill(l, l + kMR, 0.f);
      const uint32_t* kq = kpan.data() + bh * nkb * kp * kNR;
      const uint32_t* vq = vpan.data() + bh * nkb * (kNR / 2) * kNR;
      switch (rows) {
#define LN_AB(R) case R: attn_block<R>(qp.data(), kp, kq, vq, nkb, T, o, m, l); break;
        LN_AB(1) LN_AB(2) LN_AB(3) LN_AB(4) LN_AB(5) LN_AB(6)
#undef LN_AB
        default: break;
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = od + (b * T + t0 + r) * ld + h * D;
        const float inv = 1.f / l[r];
        for (int64_t c = 0; c < D; ++c) dst[c] = o[r * kNR + c] * inv;
      }
    }
  });
  return out;
}
#endif

inline float act_fn(float v, int64_t act) {
  switch (act) {
    case 0:  // silu
      return v / (1.f + std::exp(-v));
    case 1:  // gelu (erf)
      return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case 2:  // gelu (tanh approximation)
      return 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    default:  // relu
      return v > 0.f ? v : 0.f;
  }
}

// v[j] = act(v[j]) for j < n; silu and gelu_tanh vectorised through exp_fast.
inline void act_vec(float* v, int64_t n, int64_t act) {
  if (act == 0) {
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) v[j] = v[j] / (1.f + exp_fast(-v[j]));
  } else if (act == 2) {
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      const float y = 0.7978845608028654f * (v[j] + 0.044715f * v[j] * v[j] * v[j]);
      v[j] = v[j] * (1.f - 1.f / (exp_fast(2.f * y) + 1.f));  // 0.5 x (1 + tanh y) = x (1 - 1 / (e^2y + 1))
    }
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = act_fn(v[j], act);
  }
}

// Feed-forward experts (MoEfication, native MoE). gu: (E, d, C) input-major per expert, C = 2 * Fe
// (the expert's gate columns, then its up columns) when gated, else Fe; down: (E * Fe, out)
// input-major, expert e's rows contiguous. coef (B, E): token b runs expert e when coef != 0 and
// scales its output by coef. Tokens are grouped by expert: each hit expert's blocks are read once
// for all its tokens; experts no token chose are never read. Returns the number of hit experts.
template <typename W>
int64_t expert_run(const float* x, const W* gu, const float* gu_scale, const float* gu_bias, const W* down, const float* down_scale,
                   const float* down_bias, const float* coef, int64_t act, bool gated, float* y, int64_t B, int64_t d, int64_t E, int64_t Fe,
                   int64_t out) {
  const int64_t C = gated ? 2 * Fe : Fe;
  // 1. hit experts and, per hit expert, its tokens
  std::vector<int32_t> hit, tok, off(1, 0);
  for (int64_t e = 0; e < E; ++e) {
    const size_t before = tok.size();
    for (int64_t b = 0; b < B; ++b)
      if (coef[b * E + e] != 0.f) tok.push_back(static_cast<int32_t>(b));
    if (tok.size() > before) {
      hit.push_back(static_cast<int32_t>(e));
      off.push_back(static_cast<int32_t>(tok.size()));
    }
  }
  const int64_t nh = static_cast<int64_t>(hit.size());
  std::vector<int32_t> rows(static_cast<size_t>(nh * Fe));
  for (int64_t k = 0; k < nh; ++k)
    for (int64_t j = 0; j < Fe; ++j) rows[k * Fe + j] = static_cast<int32_t>(hit[k] * Fe + j);
  // 2. gate / up of each hit expert for its tokens. A work item streams a contiguous range of the
  // expert's block rows (whole rows: gate and up columns together) into its own (tokens, C)
  // partial sums; ranges are split only as far as every thread needs work.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nsplit = 1;
  // every thread gets work; with few hit experts (under 4 per thread) the threads also get equal
  // shares where doubling can make them so (3 hit experts on two threads: each in two halves)
  while ((nh * nsplit < nthreads || ((nh * nsplit) % nthreads && nh * nsplit < 4 * nthreads)) && d / (nsplit * 2) >= 64) nsplit *= 2;
  std::vector<int64_t> acc_off(static_cast<size_t>(nh + 1), 0);  // offset of hit expert k's partial sums
  for (int64_t k = 0; k < nh; ++k) acc_off[k + 1] = acc_off[k] + nsplit * (off[k + 1] - off[k]) * C;
  Aligned<float> part(acc_off[nh], 0.f);
  const int32_t* hp = hit.data();
  const int32_t* tp = tok.data();
  const int32_t* op = off.data();
  const int64_t* ao = acc_off.data();
  float* pp = part.data();
  // the partial sums of an expert added, then activation (x up) times the token's coefficient
  // into the down pass's coefficients hv ((nh * Fe rows) x B), the activation in a loop the
  // compiler vectorises (act_vec)
  std::vector<float> hv(static_cast<size_t>(nh * Fe * B), 0.f);
  float* hvp = hv.data();
  auto activate = [&](int64_t k, float* g, float* u) {
    const int64_t e = hp[k], nt = op[k + 1] - op[k];
    float* a0 = pp + ao[k];
    for (int64_t r = 1; r < nsplit; ++r) {
      const float* src = a0 + r * nt * C;
#pragma GCC ivdep
      for (int64_t j = 0; j < nt * C; ++j) a0[j] += src[j];
    }
    unshuffle<W>(a0, nt, C, C);
    const float* sc = gu_scale ? gu_scale + e * C : nullptr;
    const float* bs = gu_bias ? gu_bias + e * C : nullptr;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t b = tp[op[k] + t];
      const float cf = coef[b * E + e];
      const float* at = a0 + t * C;
      for (int64_t j = 0; j < Fe; ++j) g[j] = (sc ? at[j] * sc[j] : at[j]) + (bs ? bs[j] : 0.f);
      act_vec(g, Fe, act);
      if (gated) {
        for (int64_t j = 0; j < Fe; ++j) u[j] = (sc ? at[Fe + j] * sc[Fe + j] : at[Fe + j]) + (bs ? bs[Fe + j] : 0.f);
        for (int64_t j = 0; j < Fe; ++j) g[j] *= u[j];
      }
      float* hk = hvp + k * Fe * B + b;
      for (int64_t j = 0; j < Fe; ++j) hk[j * B] = g[j] * cf;
    }
  };
  at::parallel_for(0, nh * nsplit, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> xv, g(static_cast<size_t>(Fe)), u(static_cast<size_t>(Fe));
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t k = it / nsplit, r = it % nsplit;
      const int64_t e = hp[k], nt = op[k + 1] - op[k];
      const int64_t r0 = d * r / nsplit / kR * kR, r1 = r + 1 == nsplit ? d : d * (r + 1) / nsplit / kR * kR;
      const int32_t* tb = tp + op[k];
      xv.resize(static_cast<size_t>((r1 - r0) * nt));
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t t = 0; t < nt; ++t) xv[(i - r0) * nt + t] = x[tb[t] * d + i];
      rows_pass(gu + e * d * C + r0 * C, C, nullptr, xv.data(), nt, 0, r1 - r0, 0, C, pp + ao[k] + r * nt * C, C);
      if (nsplit == 1) activate(k, g.data(), u.data());  // a whole expert in this item: no second pass
    }
  });
  if (nsplit > 1) {  // experts split across items: their parts added once every item is done
    at::parallel_for(0, nh, 1, [&](int64_t k0, int64_t k1) {
      std::vector<float> g(static_cast<size_t>(Fe)), u(static_cast<size_t>(Fe));
      for (int64_t k = k0; k < k1; ++k) activate(k, g.data(), u.data());
    });
  }
  // 3. down: the rows of the hit experts, each read once for all tokens
  apply_rows<W>(down, down_scale, down_bias, rows.data(), nh * Fe, hvp, y, B, out, out);
  return nh;
}

// Router of expert_route: coef (B, E) for x (B, d), and the number of (token, expert) pairs run.
//   kind 0 (learned): logits = relu(x @ w1 + b1) @ w2 + b2, w1 (d, H), w2 (H, K); probs = softmax
//   kind 1 (analytic): a = x @ w1 + b1, w1 (d, P) (P = K * probes, times 2 gated: gate then up
//          columns); score_k = sum over its probes of |act(a_g) (* a_u)| * norm; probs = score / sum
//   kind 2 (native): logits = x @ w1, w1 (d, K); probs = softmax over all K experts
// The top_k experts by score run; with share < 1 only the fewest of them whose probs reach share of
// the total (kinds 0, 1) or of the top-k mass (kind 2). Experts [0, shared) always run with coef 1.
// Coefficient of a routed expert: 1 (kinds 0, 1), its prob (kind 2; renormalised over those run
// when renorm).
// first: (B, cols) = x @ w1 + b1, the first layer, computed by the caller on the dense GEMV in
// w1's format.
int64_t route(const float* first, const float* w2, const float* b2, const float* norm, int64_t kind, int64_t H,
              int64_t probes, int64_t act, bool gated, int64_t top_k, double share, int64_t shared, bool renorm, float* coef, int64_t B,
              int64_t E) {
  const int64_t K = E - shared;
  const int64_t cols = kind == 0 ? H : kind == 1 ? K * probes * (gated ? 2 : 1) : K;
  std::vector<float> sc(static_cast<size_t>(K)), pr(static_cast<size_t>(K));
  std::vector<int32_t> ord(static_cast<size_t>(K));
  int64_t used = 0;
  for (int64_t b = 0; b < B; ++b) {
    const float* a = first + b * cols;
    if (kind == 0) {
      for (int64_t k = 0; k < K; ++k) sc[k] = b2 ? b2[k] : 0.f;
      for (int64_t j = 0; j < H; ++j) {
        const float hj = a[j] > 0.f ? a[j] : 0.f;
        if (hj == 0.f) continue;
        const float* wr = w2 + j * K;
        for (int64_t k = 0; k < K; ++k) sc[k] += hj * wr[k];
      }
    } else if (kind == 1) {
      const int64_t P = K * probes;
      for (int64_t k = 0; k < K; ++k) {
        float t = 0.f;
        for (int64_t q = k * probes; q < (k + 1) * probes; ++q) {
          float h = act_fn(a[q], act);
          if (gated) h *= a[P + q];
          t += std::fabs(h) * norm[q];
        }
        sc[k] = t;
      }
    } else {
      for (int64_t k = 0; k < K; ++k) sc[k] = a[k];
    }
    if (kind == 1) {
      double tot = 0;
      for (int64_t k = 0; k < K; ++k) tot += sc[k];
      for (int64_t k = 0; k < K; ++k) pr[k] = tot > 0 ? static_cast<float>(sc[k] / tot) : 0.f;  // as route_reference: no mass, every top_k expert kept
    } else {
      float mx = sc[0];
      for (int64_t k = 1; k < K; ++k) mx = std::max(mx, sc[k]);
      double tot = 0;
      for (int64_t k = 0; k < K; ++k) tot += (pr[k] = std::exp(sc[k] - mx));
      for (int64_t k = 0; k < K; ++k) pr[k] = static_cast<float>(pr[k] / tot);
    }
    for (int64_t k = 0; k < K; ++k) ord[k] = static_cast<int32_t>(k);
    const int64_t n = std::min(top_k, K);
    std::partial_sort(ord.begin(), ord.begin() + n, ord.end(), [&](int32_t i, int32_t j) { return sc[i] > sc[j] || (sc[i] == sc[j] && i < j); });
    double ref = 1.0;
    if (kind == 2) {
      ref = 0;
      for (int64_t q = 0; q < n; ++q) ref += pr[ord[q]];
    }
    int64_t keep = n;
    if (share < 1.0) {
      double cum = 0;
      keep = 0;
      while (keep < n && cum < share * ref) cum += pr[ord[keep++]];
    }
    float* cb = coef + b * E;
    for (int64_t e = 0; e < E; ++e) cb[e] = e < shared ? 1.f : 0.f;
    double kept = 0;
    for (int64_t q = 0; q < keep; ++q) kept += pr[ord[q]];
    for (int64_t q = 0; q < keep; ++q) {
      const int64_t k = ord[q];
      cb[shared + k] = kind == 2 ? static_cast<float>(renorm ? pr[k] / kept : pr[k]) : 1.f;
    }
    used += shared + keep;
  }
  return used;
}

}  // namespace

// x: (B, in) fp32; wt: (in, out) fp32, bf16 or int8, contiguous; scale: (out) fp32 for int8, else
// empty; bias: (out) fp32 or empty; centre: (in) fp32 or empty; thr: empty (dense), (1) or (in)
// fp32. Returns (y (B, out) fp32, number of weight rows read).
std::tuple<torch::Tensor, int64_t> gemv(torch::Tensor x, torch::Tensor wt, torch::Tensor scale, torch::Tensor bias, torch::Tensor centre,
                                        torch::Tensor thr) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 1);
  LN_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxBatch, 2);
  LN_CHECK(wt.dim() == 2 && (wt.size(1) <= 1 || wt.stride(1) == 1) && (wt.size(0) <= 1 || wt.stride(0) >= wt.size(1)), 3);
  const auto wd = wt.scalar_type();
  LN_CHECK(wd == torch::kFloat32 || wd == torch::kBFloat16 || wd == torch::kChar, 4);
  const int64_t B = x.size(0), in = x.size(1), out = wt.size(1);
  LN_CHECK(wt.size(0) == in, 5);
  LN_CHECK(bias.numel() == 0 || (bias.numel() == out && bias.scalar_type() == torch::kFloat32 && bias.is_contiguous()), 6);
  LN_CHECK(centre.numel() == 0 || (centre.numel() == in && centre.scalar_type() == torch::kFloat32 && centre.is_contiguous()), 7);
  LN_CHECK(thr.numel() == 0 || ((thr.numel() == 1 || thr.numel() == in) && thr.scalar_type() == torch::kFloat32 && thr.is_contiguous()), 8);
  LN_CHECK((wd == torch::kChar) == (scale.numel() > 0), 14);
  LN_CHECK(scale.numel() == 0 || (scale.numel() == out && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous()), 15);
  auto y = torch::empty({B, out}, x.options());
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* cp = centre.numel() ? centre.data_ptr<float>() : nullptr;
  const float* tp = thr.numel() ? thr.data_ptr<float>() : nullptr;
  const bool pc = thr.numel() == in && in > 1;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  int64_t rows = 0;
  if (wd == torch::kFloat32) {
    rows = run<float>(xp, wt.data_ptr<float>(), sp, bp, cp, tp, pc, yp, B, in, out, std::max<int64_t>(wt.stride(0), out));
  } else if (wd == torch::kBFloat16) {
    rows = run<uint16_t>(xp, reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), sp, bp, cp, tp, pc, yp, B, in, out, std::max<int64_t>(wt.stride(0), out));
  } else {
    rows = run<int8_t>(xp, wt.data_ptr<int8_t>(), sp, bp, cp, tp, pc, yp, B, in, out, std::max<int64_t>(wt.stride(0), out));
  }
  return {y, rows};
}

// Dense x (N, in) @ Wt for any N >= 1 (see gemm_run); same weights, scale and bias as gemv.
// dot: bf16 / int8 weights may take the bf16 dot products (where built and switched on).
torch::Tensor gemm(torch::Tensor x, torch::Tensor wt, torch::Tensor scale, torch::Tensor bias, bool dot) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(0) >= 1, 1);
  LN_CHECK(wt.dim() == 2 && (wt.size(1) <= 1 || wt.stride(1) == 1) && (wt.size(0) <= 1 || wt.stride(0) >= wt.size(1)), 3);
  const auto wd = wt.scalar_type();
  LN_CHECK(wd == torch::kFloat32 || wd == torch::kBFloat16 || wd == torch::kChar, 4);
  const int64_t N = x.size(0), in = x.size(1), out = wt.size(1);
  LN_CHECK(wt.size(0) == in && out > 0, 5);
  LN_CHECK(bias.numel() == 0 || (bias.numel() == out && bias.scalar_type() == torch::kFloat32 && bias.is_contiguous()), 6);
  LN_CHECK((wd == torch::kChar) == (scale.numel() > 0), 14);
  LN_CHECK(scale.numel() == 0 || (scale.numel() == out && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous()), 15);
  auto y = torch::empty({N, out}, x.options());
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  if (wd == torch::kFloat32) {
    gemm_run<float>(x.data_ptr<float>(), wt.data_ptr<float>(), sp, bp, y.data_ptr<float>(), N, in, out, std::max<int64_t>(wt.stride(0), out));
  } else if (wd == torch::kBFloat16) {
#ifdef LN_BF16_DOT
    if (g_bf16_dot && dot) {
      gemm_run_bf16(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), sp, bp, y.data_ptr<float>(), N, in, out,
                    std::max<int64_t>(wt.stride(0), out));
      return y;
    }
#endif
    gemm_run<uint16_t>(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), sp, bp, y.data_ptr<float>(), N, in, out, std::max<int64_t>(wt.stride(0), out));
  } else {
#ifdef LN_BF16_DOT
    if (g_bf16_dot && dot) {
      gemm_run_bf16(x.data_ptr<float>(), wt.data_ptr<int8_t>(), sp, bp, y.data_ptr<float>(), N, in, out, std::max<int64_t>(wt.stride(0), out));
      return y;
    }
#endif
    gemm_run<int8_t>(x.data_ptr<float>(), wt.data_ptr<int8_t>(), sp, bp, y.data_ptr<float>(), N, in, out, std::max<int64_t>(wt.stride(0), out));
  }
  return y;
}

// CATS MLP: y = down(h), h_j = act(gate)_j * (up_j . x) where |act(gate)_j| > t, else 0.
// g: (B, F) the activated gate (computed densely by the caller); up_w: (F, d) rows contiguous;
// down_wt: (F, d_out) input-channel-major. Reads the up and down rows of active neurons only.
std::tuple<torch::Tensor, int64_t> cats_mlp(torch::Tensor x, torch::Tensor g, torch::Tensor up_w, torch::Tensor down_wt, double thr) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 9);
  LN_CHECK(g.dim() == 2 && g.scalar_type() == torch::kFloat32 && g.is_contiguous() && g.size(0) == x.size(0), 10);
  LN_CHECK(x.size(0) <= kMaxBatch, 11);
  LN_CHECK(up_w.scalar_type() == torch::kFloat32 && up_w.is_contiguous() && up_w.size(0) == g.size(1) && up_w.size(1) == x.size(1), 12);
  LN_CHECK(down_wt.scalar_type() == torch::kFloat32 && down_wt.is_contiguous() && down_wt.size(0) == g.size(1), 13);
  const int64_t B = x.size(0), d = x.size(1), F = g.size(1), out = down_wt.size(1);
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* up = up_w.data_ptr<float>();
  std::vector<int32_t> idx;
  for (int64_t j = 0; j < F; ++j) {
    bool any = false;
    for (int64_t b = 0; b < B; ++b) any |= std::fabs(gp[b * F + j]) > thr;
    if (any) idx.push_back(static_cast<int32_t>(j));
  }
  const int64_t n = static_cast<int64_t>(idx.size());
  auto h = torch::zeros({B, F}, x.options());
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j = idx[k];
      const float* row = up + j * d;
      for (int64_t b = 0; b < B; ++b) {
        const float gv = gp[b * F + j];
        if (!(std::fabs(gv) > thr)) continue;
        const float* xb = xp + b * d;
        float acc = 0.f;
#pragma GCC ivdep
        for (int64_t i = 0; i < d; ++i) acc += row[i] * xb[i];
        hp[b * F + j] = gv * acc;
      }
    }
  });
  auto y = torch::empty({B, out}, x.options());
  const float zero = 0.f;
  run<float>(hp, down_wt.data_ptr<float>(), nullptr, nullptr, nullptr, &zero, false, y.data_ptr<float>(), B, F, out, out);
  return {y, n};
}

// d = (x - c) where |x - c| > t, else 0: the sparsified input of a long sequence (prefill, encoder
// forwards), one pass, for a dense GEMM to multiply. x: (N, in) fp32 contiguous.
torch::Tensor sparsify(torch::Tensor x, torch::Tensor centre, torch::Tensor thr) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 1);
  const int64_t N = x.size(0), in = x.size(1);
  LN_CHECK(centre.numel() == 0 || (centre.numel() == in && centre.scalar_type() == torch::kFloat32 && centre.is_contiguous()), 7);
  LN_CHECK((thr.numel() == 1 || thr.numel() == in) && thr.scalar_type() == torch::kFloat32 && thr.is_contiguous(), 8);
  auto d = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* cp = centre.numel() ? centre.data_ptr<float>() : nullptr;
  const float* tp = thr.data_ptr<float>();
  const bool pc = thr.numel() == in && in > 1;
  float* dp = d.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* xr = xp + n * in;
      float* dr = dp + n * in;
#pragma GCC ivdep
      for (int64_t i = 0; i < in; ++i) {
        const float v = xr[i] - (cp ? cp[i] : 0.f);
        dr[i] = std::fabs(v) > (pc ? tp[i] : tp[0]) ? v : 0.f;
      }
    }
  });
  return d;
}

// x (N, in) @ Wt on the GEMM: bf16 / int8 weights on the bf16 dot products where built and `dot`
template <typename W>
void gemm_any(const float* x, const W* wt, const float* scale, const float* bias, float* y, int64_t N, int64_t in, int64_t out, int64_t ldw,
              bool dot, bool serial = false) {
#ifdef LN_BF16_DOT
  if constexpr (!std::is_same_v<W, float>) {
    if (g_bf16_dot && dot) {
      gemm_run_bf16(x, wt, scale, bias, y, N, in, out, ldw, serial);
      return;
    }
  }
#endif
  gemm_run<W>(x, wt, scale, bias, y, N, in, out, ldw, serial);
}

// Feed-forward experts for long inputs (prefill, encoder batches), one call per FFN: for each hit
// expert, its tokens are gathered, its gate / up block multiplies them on the GEMM, act(gate) * up
// (or act(up)) times the token's coefficient is formed, the expert's down rows multiply that, and
// the result is added into its tokens' rows of y. Blocks as in expert_mlp. With at least two hit
// experts per thread, the experts are shared out among the threads (the largest first, each to
// the least loaded thread), each thread running its experts' products alone into its own output
// rows, added at the end: no token block split off only for parallelism (each block packs its own
// weight panels) and no synchronisation per expert. With fewer, each product is split across the
// threads. Returns the hit experts.
template <typename W>
int64_t expert_gemm_run(const float* x, const W* gu, const float* gu_scale, const float* gu_bias, const W* down, const float* down_scale,
                        const float* down_bias, const float* coef, int64_t act, bool gated, bool dot, float* y, int64_t N, int64_t d, int64_t E,
                        int64_t Fe, int64_t out) {
  const int64_t C = gated ? 2 * Fe : Fe;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<int32_t>> tok(static_cast<size_t>(E));
  std::vector<std::vector<float>> cf(static_cast<size_t>(E));
  for (int64_t b = 0; b < N; ++b)
    for (int64_t e = 0; e < E; ++e) {
      const float c = coef[b * E + e];
      if (c != 0.f) {
        tok[e].push_back(static_cast<int32_t>(b));
        cf[e].push_back(c);
      }
    }
  std::vector<int64_t> hit;
  for (int64_t e = 0; e < E; ++e)
    if (!tok[e].empty()) hit.push_back(e);
  const int64_t nh = static_cast<int64_t>(hit.size());

  // expert e's output added into the rows of yacc (N, out); serial: this thread alone
  auto one = [&](int64_t e, bool serial, float* yacc) {
    auto par = [&](int64_t n, int64_t grain, const auto& f) {
      if (serial) f(int64_t(0), n);
      else at::parallel_for(0, n, grain, f);
    };
    const std::vector<int32_t>& t = tok[e];
    const std::vector<float>& c = cf[e];
    const int64_t ne = static_cast<int64_t>(t.size());
    bool unit = true;
    for (float v : c) unit &= v == 1.f;
    Aligned<float> xe, a, h, ye;
    const float* xin = x;
    if (ne < N) {  // gather the expert's tokens
      float* xp = xe.assign(ne * d);
      par(ne, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) std::memcpy(xp + r * d, x + static_cast<int64_t>(t[r]) * d, d * sizeof(float));
      });
      xin = xp;
    }
    float* ap = a.assign(ne * C);
    gemm_any<W>(xin, gu + e * d * C, gu_scale ? gu_scale + e * C : nullptr, gu_bias ? gu_bias + e * C : nullptr, ap, ne, d, C, C, dot, serial);
    float* hp = h.assign(ne * Fe);
    par(ne, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* hr = hp + r * Fe;
        const float* ar = ap + r * C;
        std::memcpy(hr, ar, Fe * sizeof(float));
        act_vec(hr, Fe, act);
        const float cv = c[r];
        if (gated) {
#pragma GCC ivdep
          for (int64_t j = 0; j < Fe; ++j) hr[j] *= ar[Fe + j] * cv;
        } else if (!unit) {
          for (int64_t j = 0; j < Fe; ++j) hr[j] *= cv;
        }
      }
    });
    float* yp = ye.assign(ne * out);
    gemm_any<W>(hp, down + e * Fe * out, down_scale, nullptr, yp, ne, Fe, out, out, dot, serial);
    par(ne, 8, [&](int64_t r0, int64_t r1) {  // distinct tokens: no two rows write the same output row
      for (int64_t r = r0; r < r1; ++r) {
        float* dst = yacc + static_cast<int64_t>(t[r]) * out;
        const float* src = yp + r * out;
#pragma GCC ivdep
        for (int64_t j = 0; j < out; ++j) dst[j] += src[j];
      }
    });
  };

  std::fill(y, y + N * out, 0.f);
  // each thread beyond the first adds an (N, out) buffer: split while those stay under 256 MB
  if (nthreads > 1 && nh >= 2 * nthreads && (nthreads - 1) * N * out * static_cast<int64_t>(sizeof(float)) <= (int64_t(256) << 20)) {
    std::vector<int64_t> order(hit);
    std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return tok[p].size() > tok[q].size(); });
    std::vector<std::vector<int64_t>> part(static_cast<size_t>(nthreads));
    std::vector<int64_t> load(static_cast<size_t>(nthreads), 0);
    for (int64_t e : order) {
      const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
      part[t].push_back(e);
      load[t] += static_cast<int64_t>(tok[e].size());
    }
    std::vector<Aligned<float>> ys(static_cast<size_t>(nthreads));
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* yt = t == 0 ? y : ys[t].assign(N * out, 0.f);
        for (int64_t e : part[t]) one(e, true, yt);
      }
    });
    at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t t = 1; t < nthreads; ++t) {
        const float* src = ys[t].data();
#pragma GCC ivdep
        for (int64_t j = r0 * out; j < r1 * out; ++j) y[j] += src[j];
      }
    });
  } else {
    for (int64_t e : hit) one(e, false, y);
  }
  if (down_bias)
    at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < out; ++j) y[r * out + j] += down_bias[j];
    });
  return nh;
}

// The experts' input checks and dtype dispatch, shared by expert_mlp and expert_gemm.
// x: (N, d) fp32; gu: (E, d, C) and down: (E * Fe, out), both fp32, bf16 or int8 (the same dtype),
// contiguous; gu_scale (E, C) / down_scale (out) fp32 for int8, else empty; gu_bias (E, C) and
// down_bias (out) fp32 or empty; coef (N, E) fp32; act: 0 silu, 1 gelu, 2 gelu_tanh, 3 relu.
// grouped: expert_gemm_run (long inputs, on the GEMM), else expert_run (the decode kernel).
// Returns (y (N, out) fp32, number of experts read).
std::tuple<torch::Tensor, int64_t> expert_call(const torch::Tensor& x, const torch::Tensor& gu, const torch::Tensor& gu_scale,
                                               const torch::Tensor& gu_bias, const torch::Tensor& down, const torch::Tensor& down_scale,
                                               const torch::Tensor& down_bias, const torch::Tensor& coef, int64_t act, bool gated, bool grouped,
                                               bool dot) {
  LN_CHECK(gu.dim() == 3 && gu.is_contiguous() && gu.size(1) == x.size(1), 17);
  const auto wd = gu.scalar_type();
  LN_CHECK(wd == torch::kFloat32 || wd == torch::kBFloat16 || wd == torch::kChar, 4);
  const int64_t N = x.size(0), d = x.size(1), E = gu.size(0), C = gu.size(2);
  LN_CHECK(C > 0 && (!gated || C % 2 == 0), 17);
  const int64_t Fe = gated ? C / 2 : C;
  LN_CHECK(down.dim() == 2 && down.is_contiguous() && down.scalar_type() == wd && down.size(0) == E * Fe && down.size(1) > 0, 18);
  const int64_t out = down.size(1);
  LN_CHECK(coef.dim() == 2 && coef.scalar_type() == torch::kFloat32 && coef.is_contiguous() && coef.size(0) == N && coef.size(1) == E, 19);
  LN_CHECK((wd == torch::kChar) == (gu_scale.numel() > 0) && (wd == torch::kChar) == (down_scale.numel() > 0), 14);
  LN_CHECK(gu_scale.numel() == 0 || (gu_scale.numel() == E * C && gu_scale.scalar_type() == torch::kFloat32 && gu_scale.is_contiguous()), 15);
  LN_CHECK(down_scale.numel() == 0 || (down_scale.numel() == out && down_scale.scalar_type() == torch::kFloat32 && down_scale.is_contiguous()), 15);
  LN_CHECK(gu_bias.numel() == 0 || (gu_bias.numel() == E * C && gu_bias.scalar_type() == torch::kFloat32 && gu_bias.is_contiguous()), 6);
  LN_CHECK(down_bias.numel() == 0 || (down_bias.numel() == out && down_bias.scalar_type() == torch::kFloat32 && down_bias.is_contiguous()), 6);
  LN_CHECK(act >= 0 && act <= 3, 20);
  auto y = torch::empty({N, out}, x.options());
  const float* gs = gu_scale.numel() ? gu_scale.data_ptr<float>() : nullptr;
  const float* ds = down_scale.numel() ? down_scale.data_ptr<float>() : nullptr;
  const float* gb = gu_bias.numel() ? gu_bias.data_ptr<float>() : nullptr;
  const float* db = down_bias.numel() ? down_bias.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const float* cp = coef.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto go = [&](const auto* g, const auto* dn) -> int64_t {
    using W = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return grouped ? expert_gemm_run<W>(xp, g, gs, gb, dn, ds, db, cp, act, gated, dot, yp, N, d, E, Fe, out)
                   : expert_run<W>(xp, g, gs, gb, dn, ds, db, cp, act, gated, yp, N, d, E, Fe, out);
  };
  int64_t nh = 0;
  if (wd == torch::kFloat32)
    nh = go(gu.data_ptr<float>(), down.data_ptr<float>());
  else if (wd == torch::kBFloat16)
    nh = go(reinterpret_cast<const uint16_t*>(gu.data_ptr<at::BFloat16>()), reinterpret_cast<const uint16_t*>(down.data_ptr<at::BFloat16>()));
  else
    nh = go(gu.data_ptr<int8_t>(), down.data_ptr<int8_t>());
  return {y, nh};
}

// The decode kernel's entry: up to kMaxBatch tokens (see expert_call).
std::tuple<torch::Tensor, int64_t> expert_mlp(torch::Tensor x, torch::Tensor gu, torch::Tensor gu_scale, torch::Tensor gu_bias, torch::Tensor down,
                                              torch::Tensor down_scale, torch::Tensor down_bias, torch::Tensor coef, int64_t act, bool gated) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 9);
  LN_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxBatch, 2);
  return expert_call(x, gu, gu_scale, gu_bias, down, down_scale, down_bias, coef, act, gated, false, false);
}

// Long inputs, any number of tokens (see expert_call, expert_gemm_run).
std::tuple<torch::Tensor, int64_t> expert_gemm(torch::Tensor x, torch::Tensor gu, torch::Tensor gu_scale, torch::Tensor gu_bias, torch::Tensor down,
                                               torch::Tensor down_scale, torch::Tensor down_bias, torch::Tensor coef, int64_t act, bool gated,
                                               bool dot) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(0) >= 1, 9);
  return expert_call(x, gu, gu_scale, gu_bias, down, down_scale, down_bias, coef, act, gated, true, dot);
}

// The router's input checks and first layer for x (B, d): `first` (B, cols) = x @ r_w1 + r_b1 in
// r_w1's stored format (the dense GEMV up to kMaxBatch tokens, all rows split across threads; the
// GEMM in fp32 compute beyond), and H (the learned router's hidden width). Returns cols, or 0 after
// a failed check. r_w1 (d, cols) fp32 / bf16 / int8 (r_w1_scale (cols) for int8); r_b1 (cols) or
// empty; r_w2 (H, K) and r_b2 (K) for kind 0, else empty; r_norm (P) for kind 1, else empty.
int64_t router_first(const torch::Tensor& x, int64_t E, const torch::Tensor& r_w1, const torch::Tensor& r_b1, const torch::Tensor& r_w2,
                     const torch::Tensor& r_b2, const torch::Tensor& r_norm, int64_t kind, int64_t probes, int64_t top_k, int64_t shared, bool gated,
                     const torch::Tensor& r_w1_scale, std::vector<float>& first, int64_t& H) {
  const int64_t B = x.size(0), d = x.size(1), K = E - shared;
  LN_CHECK(kind >= 0 && kind <= 2 && shared >= 0 && K >= 1 && top_k >= 0, 21);
  H = kind == 0 ? r_w2.size(0) : 0;
  const int64_t cols = kind == 0 ? H : kind == 1 ? K * probes * (gated ? 2 : 1) : K;
  const auto rd = r_w1.scalar_type();
  LN_CHECK(cols >= 1 && r_w1.dim() == 2 && (rd == torch::kFloat32 || rd == torch::kBFloat16 || rd == torch::kChar) && r_w1.is_contiguous() &&
           r_w1.size(0) == d && r_w1.size(1) == cols, 21);
  LN_CHECK((rd == torch::kChar) == (r_w1_scale.numel() > 0) &&
           (r_w1_scale.numel() == 0 || (r_w1_scale.numel() == cols && r_w1_scale.scalar_type() == torch::kFloat32 && r_w1_scale.is_contiguous())), 21);
  LN_CHECK(r_b1.numel() == 0 || (r_b1.numel() == cols && r_b1.scalar_type() == torch::kFloat32 && r_b1.is_contiguous()), 21);
  LN_CHECK(kind != 0 || (r_w2.dim() == 2 && r_w2.size(1) == K && r_w2.scalar_type() == torch::kFloat32 && r_w2.is_contiguous() &&
                         r_b2.numel() == K && r_b2.scalar_type() == torch::kFloat32 && r_b2.is_contiguous()), 21);
  LN_CHECK(kind != 1 || (probes >= 1 && r_norm.numel() == K * probes && r_norm.scalar_type() == torch::kFloat32 && r_norm.is_contiguous()), 21);
  first.resize(static_cast<size_t>(B * cols));
  const float* xp = x.data_ptr<float>();
  const float* rb = r_b1.numel() ? r_b1.data_ptr<float>() : nullptr;
  const float* rs = r_w1_scale.numel() ? r_w1_scale.data_ptr<float>() : nullptr;
  const bool small = B <= kMaxBatch;
  if (rd == torch::kFloat32) {
    if (small) run<float>(xp, r_w1.data_ptr<float>(), nullptr, rb, nullptr, nullptr, false, first.data(), B, d, cols, cols);
    else gemm_run<float>(xp, r_w1.data_ptr<float>(), nullptr, rb, first.data(), B, d, cols, cols);
  } else if (rd == torch::kBFloat16) {
    const auto* w = reinterpret_cast<const uint16_t*>(r_w1.data_ptr<at::BFloat16>());
    if (small) run<uint16_t>(xp, w, nullptr, rb, nullptr, nullptr, false, first.data(), B, d, cols, cols);
    else gemm_run<uint16_t>(xp, w, nullptr, rb, first.data(), B, d, cols, cols);
  } else {
    if (small) run<int8_t>(xp, r_w1.data_ptr<int8_t>(), rs, rb, nullptr, nullptr, false, first.data(), B, d, cols, cols);
    else gemm_run<int8_t>(xp, r_w1.data_ptr<int8_t>(), rs, rb, first.data(), B, d, cols, cols);
  }
  return cols;
}

// The router alone for any number of tokens (prefill, encoder batches): coef (N, E) as
// expert_route computes it, the tokens split across threads.
torch::Tensor route_tokens(torch::Tensor x, torch::Tensor r_w1, torch::Tensor r_b1, torch::Tensor r_w2, torch::Tensor r_b2, torch::Tensor r_norm,
                           int64_t kind, int64_t probes, int64_t top_k, double share, int64_t shared, bool renorm, int64_t E, int64_t act, bool gated,
                           torch::Tensor r_w1_scale) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(0) >= 1, 9);
  LN_CHECK(act >= 0 && act <= 3, 20);
  const int64_t N = x.size(0);
  std::vector<float> first;
  int64_t H = 0;
  const int64_t cols = router_first(x, E, r_w1, r_b1, r_w2, r_b2, r_norm, kind, probes, top_k, shared, gated, r_w1_scale, first, H);
  if (!cols) return {};
  auto coef = torch::empty({N, E}, x.options());
  float* cp = coef.data_ptr<float>();
  const float* w2 = kind == 0 ? r_w2.data_ptr<float>() : nullptr;
  const float* b2 = kind == 0 ? r_b2.data_ptr<float>() : nullptr;
  const float* nm = kind == 1 ? r_norm.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t b0, int64_t b1) {
    route(first.data() + b0 * cols, w2, b2, nm, kind, H, probes, act, gated, top_k, share, shared, renorm, cp + b0 * E, b1 - b0, E);
  });
  return coef;
}

// expert_mlp with the router run here too (see route): one call per FFN and token batch.
// r_w1 (d, cols) fp32; r_b1 (cols) or empty; r_w2 (H, K) and r_b2 (K) for kind 0, else empty;
// r_norm (P) for kind 1, else empty. Returns (y, experts read, coef (B, E), (token, expert) pairs run).
std::tuple<torch::Tensor, int64_t, torch::Tensor, int64_t> expert_route(
    torch::Tensor x, torch::Tensor r_w1, torch::Tensor r_b1, torch::Tensor r_w2, torch::Tensor r_b2, torch::Tensor r_norm, int64_t kind,
    int64_t probes, int64_t top_k, double share, int64_t shared, bool renorm, torch::Tensor gu, torch::Tensor gu_scale, torch::Tensor gu_bias,
    torch::Tensor down, torch::Tensor down_scale, torch::Tensor down_bias, int64_t act, bool gated, torch::Tensor r_w1_scale) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 9);
  LN_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxBatch, 2);
  LN_CHECK(gu.dim() == 3 && gu.size(1) == x.size(1), 17);
  const int64_t B = x.size(0), E = gu.size(0);
  thread_local std::vector<float> first;
  int64_t H = 0;
  if (!router_first(x, E, r_w1, r_b1, r_w2, r_b2, r_norm, kind, probes, top_k, shared, gated, r_w1_scale, first, H)) return {};
  auto coef = torch::empty({B, E}, x.options());
  const int64_t used = route(first.data(), kind == 0 ? r_w2.data_ptr<float>() : nullptr, kind == 0 ? r_b2.data_ptr<float>() : nullptr,
                             kind == 1 ? r_norm.data_ptr<float>() : nullptr, kind, H, probes, act, gated, top_k, share, shared, renorm,
                             coef.data_ptr<float>(), B, E);
  auto [y, nh] = expert_mlp(x, gu, gu_scale, gu_bias, down, down_scale, down_bias, coef, act, gated);
  return {y, nh, coef, used};
}

// Sum of a large fp32 buffer read by all threads: the in-run memory-bandwidth probe.
double read_sum(torch::Tensor buf) {
  LN_CHECK(buf.scalar_type() == torch::kFloat32 && buf.is_contiguous(), 16);
  const float* p = buf.data_ptr<float>();
  const int64_t n = buf.numel();
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> part(static_cast<size_t>(nthreads), 0.0);
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t a = n * t / nthreads, b = n * (t + 1) / nthreads;
      float s[16] = {0};
      int64_t i = a;
      for (; i + 16 <= b; i += 16) {
#pragma GCC ivdep
        for (int j = 0; j < 16; ++j) s[j] += p[i + j];
      }
      double tot = 0;
      for (; i < b; ++i) tot += p[i];
      for (int j = 0; j < 16; ++j) tot += s[j];
      part[t] = tot;
    }
  });
  double tot = 0;
  for (double v : part) tot += v;
  return tot;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("last_error", &last_error, "the number of the last failed input check");
  m.def("gemv", &gemv, "dense or sparse-input GEMV over input-major fp32 / bf16 / int8 weights");
  m.def("hugepage_copy", &hugepage_copy, "a copy in 2 MiB-aligned memory marked for transparent huge pages");
  m.def("hugepage_empty", &hugepage_empty, "uninitialised bytes in 2 MiB-aligned memory marked for transparent huge pages");
  m.def("set_dense_below", [](double f) { return g_dense_below.exchange(std::min(1.0, std::max(0.0, f))); },
        "a batch-1 sparse-input call skipping fewer than this fraction of rows reads them all; returns the previous value");
  m.def("gemm", &gemm, "dense GEMM of a long input over input-major fp32 / bf16 / int8 weights (L2-resident panels)");
  m.def("cats_mlp", &cats_mlp, "CATS MLP reading only the up / down rows of active neurons");
  m.def("expert_mlp", &expert_mlp, "feed-forward experts: tokens grouped by expert, only chosen experts' blocks read");
  m.def("expert_gemm", &expert_gemm, "feed-forward experts of a long input: each hit expert's tokens gathered and run on the GEMM");
  m.def("route_tokens", &route_tokens, "the experts' router alone for any number of tokens");
  m.def("expert_route", &expert_route, "router (learned, analytic or native) and feed-forward experts in one call");
  m.def("sparsify", &sparsify, "(x - c) where |x - c| > t, else 0");
  m.def("read_sum", &read_sum, "sum of a large fp32 buffer (memory-bandwidth probe)");
  m.def("bf16_dot_on", []() { return g_bf16_dot; }, "whether set_bf16_dot left the bf16 dot products on");
  m.def("set_bf16_dot", [](bool on) { const bool was = g_bf16_dot; g_bf16_dot = on; return was; },
        "bf16 / int8 weights' GEMM: round the input to bf16 and use the CPU's bf16 dot products (where built); returns the previous setting");
#ifdef LN_BF16_DOT
  m.def("attn_bf16", &attn_bf16, "non-causal attention of long inputs with bf16 dot products (B, T, H, D), flash-style");
  m.attr("bf16_dot") = true;
#else
  m.attr("bf16_dot") = false;
#endif
  m.attr("max_batch") = kMaxBatch;
}
