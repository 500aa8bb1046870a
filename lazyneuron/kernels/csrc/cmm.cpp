// Conditional matrix multiplication (CMM): the inference walk of a fast feedforward (FFF) layer.
//
// The layer's N = 2^(D+1) - 1 neurons form a balanced binary tree (node n has children 2n+1 and
// 2n+2). For token t the walk visits D+1 nodes, one per level:
//   a_l = Win[n_l] . x[t] + b_in[n_l];   y[t] += act(a_l) * Wout[n_l];   n_{l+1} = 2 n_l + 1 + (a_l > 0)
// so a token reads 2 (D+1) weight rows and nothing else: no weight copies, no masks.
//
// One token's walk is a chain of dependent loads (latency bound). For a single token each thread
// walks a small group of tokens in lock-step (independent chains overlap their memory latency)
// and prefetches the input rows of both children while it accumulates the current node's output
// row. For two or more tokens (on AVX2/FMA CPUs) the walk has two phases per block of tokens: the
// decisions level by level (every token's node at a level is known, so the input row of the token
// a few places later is prefetched while this one's dot runs), then each token's output built in
// registers from its depth+1 output rows, all of whose addresses are known. bf16 rows take the
// same code, widened to fp32 eight at a time as they are read. Without AVX2: level by level in one
// pass for 2..256 tokens, the chains otherwise. Work is split across threads with at::parallel_for
// (torch's own OpenMP runtime).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "ln_check.h"
#include "ln_mem.h"

namespace {

constexpr int64_t kGroup = 4;  // tokens walked in lock-step by one thread

inline float load(const float* p, int64_t j) { return p[j]; }
inline float load(const uint16_t* p, int64_t j) {
  uint32_t u = static_cast<uint32_t>(p[j]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// kLanes independent partial sums: a single vector accumulator would make the dot one chain of
// n / width dependent FMAs (4-cycle latency each), the longest part of a warm walk step.
constexpr int64_t kLanes = 32;

template <typename W>
inline float dot(const float* __restrict__ x, const W* __restrict__ w, int64_t n) {
  float acc[kLanes] = {};
  const int64_t m = n - n % kLanes;
  for (int64_t j = 0; j < m; j += kLanes) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += x[j + k] * load(w, j + k);
  }
  float s = 0.f;
  for (int64_t j = m; j < n; ++j) s += x[j] * load(w, j);
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

template <typename W>
inline void axpy(float* __restrict__ y, const W* __restrict__ w, float v, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += v * load(w, j);
}

#if defined(__AVX2__) && defined(__FMA__)
template <>
inline void axpy<float>(float* __restrict__ y, const float* __restrict__ w, float v, int64_t n) {
  const __m256 vv = _mm256_set1_ps(v);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(vv, _mm256_loadu_ps(w + j), _mm256_loadu_ps(y + j)));
    _mm256_storeu_ps(y + j + 8, _mm256_fmadd_ps(vv, _mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(y + j + 8)));
    _mm256_storeu_ps(y + j + 16, _mm256_fmadd_ps(vv, _mm256_loadu_ps(w + j + 16), _mm256_loadu_ps(y + j + 16)));
    _mm256_storeu_ps(y + j + 24, _mm256_fmadd_ps(vv, _mm256_loadu_ps(w + j + 24), _mm256_loadu_ps(y + j + 24)));
  }
  for (; j < n; ++j) y[j] += v * w[j];
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define LN_AVX2 1
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// eight weights as floats: fp32 as they are, bf16 widened (its bits are the top half of an fp32)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// A dot product that also prefetches (prefetcht2) another row, the lines of it spread over the
// arithmetic (two per 32 fp32 weights, one per 32 bf16): a later token's row is fetched while this
// token computes, instead of in one burst that fills the miss buffers and stalls the loads the
// arithmetic needs. `pfb` bytes of `pf` are prefetched (none when 0).
template <typename W>
inline float dot_pf(const float* __restrict__ x, const W* __restrict__ w, int64_t n, const char* pf, int64_t pfb) {
  constexpr int64_t kStep = 32 * sizeof(W);  // bytes of weights per iteration
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0, o = 0;
  for (; j + 32 <= n; j += 32, o += kStep) {
    if (o < pfb) {
      _mm_prefetch(pf + o, _MM_HINT_T2);
      if (kStep > 64) _mm_prefetch(pf + o + 64, _MM_HINT_T2);
    }
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), load8(w + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), load8(w + j + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 16), load8(w + j + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 24), load8(w + j + 24), a3);
  }
  for (; o < pfb; o += 64) _mm_prefetch(pf + o, _MM_HINT_T2);
  for (; j + 8 <= n; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), load8(w + j), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; j < n; ++j) s += x[j] * load(w, j);
  return s;
}

// the plain dot (the single-token chains) is the same loop with nothing to prefetch
template <>
inline float dot<float>(const float* __restrict__ x, const float* __restrict__ w, int64_t n) {
  return dot_pf<float>(x, w, n, nullptr, 0);
}
template <>
inline float dot<uint16_t>(const float* __restrict__ x, const uint16_t* __restrict__ w, int64_t n) {
  return dot_pf<uint16_t>(x, w, n, nullptr, 0);
}
#endif

template <typename W>
inline void prefetch_row(const W* p, int64_t n, int64_t lines) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(W));
  for (int64_t o = 0; o < bytes && o < lines * 64; o += 64) __builtin_prefetch(c + o, 0, 1);
}

// act: 0 gelu (erf), 1 gelu (tanh), 2 relu, 3 silu, 4 identity
inline float activate(float a, int64_t act) {
  switch (act) {
    case 0: return 0.5f * a * (1.f + std::erf(a * 0.70710678118654752f));
    case 1: return 0.5f * a * (1.f + std::tanh(0.7978845608028654f * (a + 0.044715f * a * a * a)));
    case 2: return a > 0.f ? a : 0.f;
    case 3: return a / (1.f + std::exp(-a));
    default: return a;
  }
}

template <typename W>
void walk(const float* x, const W* win, const float* bin, const W* wout, const float* bout, float* y, int64_t* nodes,
          int64_t T, int64_t d, int64_t o, int64_t li, int64_t lo, int64_t depth, int64_t act) {
  const int64_t groups = (T + kGroup - 1) / kGroup;
  // small batches stay on one thread: a parallel region costs more than a few walks
  const int64_t grain = T <= 16 ? groups : 1;
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t t0 = g * kGroup, nt = std::min(kGroup, T - t0);
      int64_t node[kGroup] = {0, 0, 0, 0};
      for (int64_t k = 0; k < nt; ++k) {
        float* yk = y + (t0 + k) * o;
        if (bout) std::memcpy(yk, bout, o * sizeof(float));
        else std::memset(yk, 0, o * sizeof(float));
      }
      for (int64_t l = 0; l <= depth; ++l) {
        float a[kGroup];
        for (int64_t k = 0; k < nt; ++k) {
          const int64_t n = node[k];
          a[k] = dot(x + (t0 + k) * d, win + n * li, d) + (bin ? bin[n] : 0.f);
          if (nodes) nodes[(t0 + k) * (depth + 1) + l] = n;
          if (l < depth) {  // both children's input rows: one of them is next
            prefetch_row(win + (2 * n + 1) * li, d, 16);
            prefetch_row(win + (2 * n + 2) * li, d, 16);
          }
          prefetch_row(wout + n * lo, o, 16);
        }
        for (int64_t k = 0; k < nt; ++k) {
          const int64_t n = node[k];
          axpy(y + (t0 + k) * o, wout + n * lo, activate(a[k], act), o);
          node[k] = 2 * n + 1 + (a[k] > 0.f ? 1 : 0);
        }
      }
    }
  });
}

template <typename W>
inline void prefetch_full(const W* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(W));
  // locality 1 (prefetcht2): 383 us cold at 128 tokens in one microbenchmark against 467-519 us
  // for hints 3 / 2 / 0; within the host's noise in the full kernel grid
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 1);
}

// Many tokens: level by level over a block of tokens. Within a level every token's node is known,
// so the rows of the token `ahead` places later are prefetched whole while this one is computed:
// the memory system always has several rows in flight instead of one dependent chain per token.
template <typename W>
void walk_levels(const float* x, const W* win, const float* bin, const W* wout, const float* bout, float* y, int64_t* nodes,
                 int64_t T, int64_t d, int64_t o, int64_t li, int64_t lo, int64_t depth, int64_t act, int64_t block, int64_t ahead) {
  const int64_t blocks = (T + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> node(block);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block, nt = std::min(block, T - t0);
      for (int64_t k = 0; k < nt; ++k) {
        float* yk = y + (t0 + k) * o;
        if (bout) std::memcpy(yk, bout, o * sizeof(float));
        else std::memset(yk, 0, o * sizeof(float));
        node[k] = 0;
      }
      for (int64_t l = 0; l <= depth; ++l) {
        for (int64_t k = 0; k < std::min(ahead, nt); ++k) {
          prefetch_full(win + node[k] * li, d);
          prefetch_full(wout + node[k] * lo, o);
        }
        for (int64_t k = 0; k < nt; ++k) {
          if (k + ahead < nt) {
            prefetch_full(win + node[k + ahead] * li, d);
            prefetch_full(wout + node[k + ahead] * lo, o);
          }
          const int64_t n = node[k];
          const float a = dot(x + (t0 + k) * d, win + n * li, d) + (bin ? bin[n] : 0.f);
          if (nodes) nodes[(t0 + k) * (depth + 1) + l] = n;
          axpy(y + (t0 + k) * o, wout + n * lo, activate(a, act), o);
          node[k] = 2 * n + 1 + (a > 0.f ? 1 : 0);
        }
      }
    }
  });
}


#ifdef LN_AVX2
// Two phases per block of tokens. Decisions: level by level, each token's dot with its node's
// input row only (the decision chain needs nothing else), input rows prefetched `ahead` tokens
// later in (level, token) order. Outputs: every token's nodes are then known, so its output is
// built in registers, 64 columns at a time over its depth+1 output rows (y is written once, not
// read and written at every level); unless the tree is packed, a later token's output rows are
// prefetched meanwhile.
template <typename W>
void walk_two_phase(const float* x, const W* win, const float* bin, const W* wout, const float* bout, float* y, int64_t* nodes,
                    int64_t T, int64_t d, int64_t o, int64_t li, int64_t lo, int64_t depth, int64_t act, int64_t block, int64_t ahead) {
  const int64_t blocks = (T + block - 1) / block;
  const int64_t L = depth + 1;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> node(block), path(block * L);
    std::vector<float> coef(block * L);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block, nt = std::min(block, T - t0);
      const int64_t A = std::min(ahead, nt - 1);
      for (int64_t k = 0; k < nt; ++k) node[k] = 0;
      for (int64_t k = 0; k < std::min<int64_t>(A, nt); ++k) prefetch_full(win + node[k] * li, d);
      for (int64_t l = 0; l <= depth; ++l) {
        for (int64_t k = 0; k < nt; ++k) {
          int64_t j = k + A, pn = -1;
          if (A > 0) {
            if (j < nt) pn = node[j];
            else if (l < depth) pn = node[j - nt];
          }
          const char* pi = pn >= 0 ? reinterpret_cast<const char*>(win + pn * li) : nullptr;
          const int64_t n = node[k];
          const float a = dot_pf(x + (t0 + k) * d, win + n * li, d, pi, pi ? d * static_cast<int64_t>(sizeof(W)) : 0) + (bin ? bin[n] : 0.f);
          path[k * L + l] = n;
          coef[k * L + l] = activate(a, act);
          node[k] = 2 * n + 1 + (a > 0.f ? 1 : 0);
        }
      }
      if (nodes)
        for (int64_t k = 0; k < nt; ++k)
          for (int64_t l = 0; l < L; ++l) nodes[(t0 + k) * L + l] = path[k * L + l];
      // outputs. Rows apart from the input rows: those of the token 2 places later are prefetched,
      // a few lines per step. Packed trees (each output row right after its node's input row, as
      // FFFLayer keeps them): none; the hardware brings them in after the input rows, and in one
      // process software prefetch there cost 7-8% at 8 tokens, nothing measurable at 128-1024
      const bool packed = wout == win + d && lo == li;
      if (!packed)
        for (int64_t k = 0; k < std::min<int64_t>(2, nt); ++k)
          for (int64_t l = 0; l < L; ++l) prefetch_full(wout + path[k * L + l] * lo, o);
      for (int64_t k = 0; k < nt; ++k) {
        const int64_t* p = &path[k * L];
        const float* c = &coef[k * L];
        const int64_t* pn = !packed && k + 2 < nt ? &path[(k + 2) * L] : nullptr;
        float* yk = y + (t0 + k) * o;
        int64_t j = 0;
        // prefetch cursor over the later token's output rows: row r, byte offset q
        int64_t r = pn ? 0 : L, q = 0;
        const int64_t rb = o * static_cast<int64_t>(sizeof(W));
        auto pf1 = [&]() {
          if (r < L) {
            _mm_prefetch(reinterpret_cast<const char*>(wout + pn[r] * lo) + q, _MM_HINT_T2);
            q += 64;
            if (q >= rb) { q = 0; ++r; }
          }
        };
        for (; j + 64 <= o; j += 64) {
          __m256 s0, s1, s2, s3, s4, s5, s6, s7;
          if (bout) {
            s0 = _mm256_loadu_ps(bout + j); s1 = _mm256_loadu_ps(bout + j + 8); s2 = _mm256_loadu_ps(bout + j + 16); s3 = _mm256_loadu_ps(bout + j + 24);
            s4 = _mm256_loadu_ps(bout + j + 32); s5 = _mm256_loadu_ps(bout + j + 40); s6 = _mm256_loadu_ps(bout + j + 48); s7 = _mm256_loadu_ps(bout + j + 56);
          } else {
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _mm256_setzero_ps();
          }
          for (int64_t l = 0; l < L; ++l) {
            pf1(); pf1(); pf1(); pf1();
            const W* w = wout + p[l] * lo + j;
            const __m256 cv = _mm256_set1_ps(c[l]);
            s0 = _mm256_fmadd_ps(cv, load8(w), s0); s1 = _mm256_fmadd_ps(cv, load8(w + 8), s1);
            s2 = _mm256_fmadd_ps(cv, load8(w + 16), s2); s3 = _mm256_fmadd_ps(cv, load8(w + 24), s3);
            s4 = _mm256_fmadd_ps(cv, load8(w + 32), s4); s5 = _mm256_fmadd_ps(cv, load8(w + 40), s5);
            s6 = _mm256_fmadd_ps(cv, load8(w + 48), s6); s7 = _mm256_fmadd_ps(cv, load8(w + 56), s7);
          }
          _mm256_storeu_ps(yk + j, s0); _mm256_storeu_ps(yk + j + 8, s1); _mm256_storeu_ps(yk + j + 16, s2); _mm256_storeu_ps(yk + j + 24, s3);
          _mm256_storeu_ps(yk + j + 32, s4); _mm256_storeu_ps(yk + j + 40, s5); _mm256_storeu_ps(yk + j + 48, s6); _mm256_storeu_ps(yk + j + 56, s7);
        }
        while (r < L) pf1();
        for (; j < o; ++j) {
          float s = bout ? bout[j] : 0.f;
          for (int64_t l = 0; l < L; ++l) s += c[l] * load(wout, p[l] * lo + j);
          yk[j] = s;
        }
      }
    }
  });
}
#endif

std::vector<torch::Tensor> cmm(torch::Tensor x, torch::Tensor w_in, torch::Tensor b_in, torch::Tensor w_out, torch::Tensor b_out,
                               int64_t depth, int64_t act, bool return_nodes) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 1);
  LN_CHECK(w_in.dim() == 2 && w_out.dim() == 2 && w_in.stride(1) == 1 && w_out.stride(1) == 1 && w_in.stride(0) >= w_in.size(1) &&
              w_out.stride(0) >= w_out.size(1), 2);
  LN_CHECK(w_in.scalar_type() == w_out.scalar_type(), 3);
  const int64_t T = x.size(0), d = x.size(1), N = w_in.size(0), o = w_out.size(1), li = w_in.stride(0), lo = w_out.stride(0);
  LN_CHECK(w_in.size(1) == d, 4);
  LN_CHECK(w_out.size(0) == N, 5);
  LN_CHECK(depth >= 0 && N == (int64_t(2) << depth) - 1, 6);
  const float* bi = nullptr;
  const float* bo = nullptr;
  if (b_in.numel()) {
    LN_CHECK(b_in.numel() == N && b_in.scalar_type() == torch::kFloat32 && b_in.is_contiguous(), 7);
    bi = b_in.data_ptr<float>();
  }
  if (b_out.numel()) {
    LN_CHECK(b_out.numel() == o && b_out.scalar_type() == torch::kFloat32 && b_out.is_contiguous(), 8);
    bo = b_out.data_ptr<float>();
  }
  auto y = torch::empty({T, o}, x.options());
  torch::Tensor nodes;
  int64_t* np = nullptr;
  if (return_nodes) {
    nodes = torch::empty({T, depth + 1}, x.options().dtype(torch::kInt64));
    np = nodes.data_ptr<int64_t>();
  } else {
    nodes = torch::empty({0}, x.options().dtype(torch::kInt64));
  }
  if (w_in.scalar_type() == torch::kFloat32) {
#ifdef LN_AVX2
    // two or more tokens: decisions level by level, then outputs in registers (two_phase); in one
    // process against the single-pass level walk: ~15-20% less time cold and ~30% less warm at 128
    // tokens, ~20% less cold at 1024 (where it also beats the lock-step chains)
    if (T >= 2)
      walk_two_phase<float>(x.data_ptr<float>(), w_in.data_ptr<float>(), bi, w_out.data_ptr<float>(), bo, y.data_ptr<float>(), np, T, d, o, li, lo, depth, act, 64, 16);
    else
      walk<float>(x.data_ptr<float>(), w_in.data_ptr<float>(), bi, w_out.data_ptr<float>(), bo, y.data_ptr<float>(), np, T, d, o, li, lo, depth, act);
#else
    if (T >= 2 && T <= 256)
      walk_levels<float>(x.data_ptr<float>(), w_in.data_ptr<float>(), bi, w_out.data_ptr<float>(), bo, y.data_ptr<float>(), np, T, d, o, li, lo, depth, act, 64, 2);
    else
      walk<float>(x.data_ptr<float>(), w_in.data_ptr<float>(), bi, w_out.data_ptr<float>(), bo, y.data_ptr<float>(), np, T, d, o, li, lo, depth, act);
#endif
  } else {
    // bf16 weights (half the bytes per row), widened to fp32 as they are read
    LN_CHECK(w_in.scalar_type() == torch::kBFloat16, 9);
    const uint16_t* wi = reinterpret_cast<const uint16_t*>(w_in.data_ptr<at::BFloat16>());
    const uint16_t* wo = reinterpret_cast<const uint16_t*>(w_out.data_ptr<at::BFloat16>());
#ifdef LN_AVX2
    // as fp32; in one process against the one-pass level walk (cold, BERT-base dims): 8 tokens
    // 76 -> 54 us, 128 tokens 356 -> 230 us, 1024 tokens 1538 -> 1158 us
    if (T >= 2)
      walk_two_phase<uint16_t>(x.data_ptr<float>(), wi, bi, wo, bo, y.data_ptr<float>(), np, T, d, o, li, lo, depth, act, 64, 16);
    else
      walk<uint16_t>(x.data_ptr<float>(), wi, bi, wo, bo, y.data_ptr<float>(), np, T, d, o, li, lo, depth, act);
#else
    // 2..256 tokens level by level in blocks of 64 with rows prefetched 2 tokens ahead (1.4-2x
    // faster than the lock-step chains at 8-128 tokens); one token, or many: the chains
    if (T >= 2 && T <= 256)
      walk_levels<uint16_t>(x.data_ptr<float>(), wi, bi, wo, bo, y.data_ptr<float>(), np, T, d, o, li, lo, depth, act, 64, 2);
    else
      walk<uint16_t>(x.data_ptr<float>(), wi, bi, wo, bo, y.data_ptr<float>(), np, T, d, o, li, lo, depth, act);
#endif
  }
  return {y, nodes};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("last_error", &last_error, "the number of the last failed input check");
  m.def("cmm", &cmm, "fast feedforward tree walk (conditional matrix multiplication)");
  m.def("hugepage_copy", &hugepage_copy, "a copy in 2 MiB-aligned memory marked for transparent huge pages");
}
