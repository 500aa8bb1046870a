// One GEMV family for batch 1 to 16: dense and sparse-input, weights in fp32, bf16 or int8.
//
// y[b, :] = bias + scale * sum_{i active} v[b, i] * Wt[i, :]
//   dense:        every row active, v = x
//   sparse input: row i of token b is active when |x[b,i] - c[i]| > t[i]; v = x - c
//                 (SCAP / TEAL; CATS' down projection)
//
// Wt is the weight stored input-channel-major, (in, out) contiguous (prepared once at convert
// time), so an inactive input channel is one contiguous row that is never read, and a dense pass
// is one contiguous stream. int8 weights are weight-only with one fp32 scale per output channel
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ln_check.h"

#ifndef LN_PREFETCH
#define LN_PREFETCH 2048
#endif
#ifndef LN_HINT
#define LN_HINT _MM_HINT_T1  // into L2: its miss buffers, not L1's few, bound how many lines are in flight
#endif

namespace {

constexpr int64_t kMaxBatch = 16;
constexpr int64_t kSplitAccBytes = 256 * 1024;  // row split while a thread's (B, out) accumulator fits L2
constexpr int64_t kTileAccBytes = 16 * 1024;    // column tiles: a (B, tile) accumulator in L1

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
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
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
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
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
constexpr int64_t kPrefetchBytes = LN_PREFETCH;  // how far ahead in a row the software prefetch runs  // weight rows streamed together: the accumulators are loaded and stored once per kR rows

// acc[b] (stride lda) += sum_{r < R} v[r * B + b] * rows[r][0 : n] for NB tokens b: each weight vector
// is widened once and applied to the NB accumulators, held in registers.
// Software prefetch: `ahead(r, pj)` gives the address pj elements further along row r's stream,
// a stream being row r of this group, then row r of the next group, and so on (nullptr past the
// end), so that short rows (sparse rows, small outputs) are fetched groups ahead.
template <typename W, int64_t R, int64_t NB, typename Ahead>
inline void group_pass_nb(const W* const* rows, const Ahead& ahead, const float* v, int64_t B, float* acc, int64_t lda, int64_t n) {
  int64_t j = 0;
#ifndef LN_SCALAR
  constexpr int64_t pd = kPrefetchBytes / static_cast<int64_t>(sizeof(W));  // elements ahead
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

// acc (B rows, stride lda) += sum_{k in [k0, k1)} vals[k*B + b] * Wt[row k, j0 : j0 + len]
template <typename W>
void rows_pass(const W* wt, int64_t out, const int32_t* idx, const float* vals, int64_t B, int64_t k0, int64_t k1, int64_t j0,
               int64_t len, float* acc, int64_t lda) {
  auto row = [&](int64_t k) { return wt + (idx ? static_cast<int64_t>(idx[k]) : k) * out + j0; };
  const W* rows[kR];
  const W* far0[kR];  // row r, G groups ahead, and G + 1 groups ahead, where G = prefetch distance / row length
  const W* far1[kR];
  constexpr int64_t pd = kPrefetchBytes / static_cast<int64_t>(sizeof(W));
  const int64_t G = len > 0 ? pd / len : 0, base = G * len;
  int64_t k = k0;
  for (; k + kR <= k1; k += kR) {
    for (int64_t r = 0; r < kR; ++r) {
      rows[r] = row(k + r);
      const int64_t a = k + G * kR + r, b = a + kR;
      far0[r] = a < k1 ? row(a) : nullptr;
      far1[r] = b < k1 ? row(b) : nullptr;
    }
    auto ahead = [&](int64_t r, int64_t pj) -> const W* {  // pj = j + pd with 0 <= j < len: G or G + 1 groups ahead
      const int64_t off = pj - base;
      if (off < len) return far0[r] ? far0[r] + off : nullptr;
      return far1[r] ? far1[r] + (off - len) : nullptr;
    };
    group_pass<W, kR>(rows, ahead, vals + k * B, B, acc, lda, len);
  }
  auto none = [](int64_t, int64_t) -> const W* { return nullptr; };
  for (; k < k1; ++k) {
    rows[0] = row(k);
    group_pass<W, 1>(rows, none, vals + k * B, B, acc, lda, len);
  }
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

// Returns the number of weight rows read. thr == nullptr: dense.
template <typename W>
int64_t run(const float* x, const W* wt, const float* scale, const float* bias, const float* centre, const float* thr, bool thr_per_channel,
            float* y, int64_t B, int64_t in, int64_t out) {
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
  }
  const float* vp = vals.data();
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());

  if (B * out * static_cast<int64_t>(sizeof(float)) <= kSplitAccBytes) {
    // 2a. row split: contiguous row ranges (multiples of 4) per part, partial sums added at the end
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 32));
    thread_local std::vector<float> partial;
    partial.assign(static_cast<size_t>(parts * B * out), 0.f);
    float* pp = partial.data();
    auto bound = [&](int64_t p) { return p == parts ? n : (n * p / parts) / kR * kR; };
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) rows_pass(wt, out, idx, vp, B, bound(p), bound(p + 1), 0, out, pp + p * B * out, out);
    });
    for (int64_t p = 1; p < parts; ++p) {
      const float* src = pp + p * B * out;
#pragma GCC ivdep
      for (int64_t j = 0; j < B * out; ++j) pp[j] += src[j];
    }
    for (int64_t b = 0; b < B; ++b) finish(y + b * out, pp + b * out, bias, scale, out);
    return n;
  }
  // 2b. column tiles
  int64_t tile = std::max<int64_t>(64, (kTileAccBytes / static_cast<int64_t>(sizeof(float)) / B) & ~int64_t(15));
  tile = std::min<int64_t>(tile, (((out + nthreads - 1) / nthreads) + 15) & ~int64_t(15));
  const int64_t ntiles = (out + tile - 1) / tile;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>(B * tile));
    for (int64_t tt = t0; tt < t1; ++tt) {
      const int64_t j0 = tt * tile, len = std::min(tile, out - j0);
      std::fill(acc.begin(), acc.end(), 0.f);
      rows_pass(wt, out, idx, vp, B, 0, n, j0, len, acc.data(), tile);
      for (int64_t b = 0; b < B; ++b)
        finish(y + b * out + j0, acc.data() + b * tile, bias ? bias + j0 : nullptr, scale ? scale + j0 : nullptr, len);
    }
  });
  return n;
}

}  // namespace

// x: (B, in) fp32; wt: (in, out) fp32, bf16 or int8, contiguous; scale: (out) fp32 for int8, else
// empty; bias: (out) fp32 or empty; centre: (in) fp32 or empty; thr: empty (dense), (1) or (in)
// fp32. Returns (y (B, out) fp32, number of weight rows read).
std::tuple<torch::Tensor, int64_t> gemv(torch::Tensor x, torch::Tensor wt, torch::Tensor scale, torch::Tensor bias, torch::Tensor centre,
                                        torch::Tensor thr) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 1);
  LN_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxBatch, 2);
  LN_CHECK(wt.dim() == 2 && wt.is_contiguous(), 3);
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
    rows = run<float>(xp, wt.data_ptr<float>(), sp, bp, cp, tp, pc, yp, B, in, out);
  } else if (wd == torch::kBFloat16) {
    rows = run<uint16_t>(xp, reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), sp, bp, cp, tp, pc, yp, B, in, out);
  } else {
    rows = run<int8_t>(xp, wt.data_ptr<int8_t>(), sp, bp, cp, tp, pc, yp, B, in, out);
  }
  return {y, rows};
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
  run<float>(hp, down_wt.data_ptr<float>(), nullptr, nullptr, nullptr, &zero, false, y.data_ptr<float>(), B, F, out);
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
  m.def("cats_mlp", &cats_mlp, "CATS MLP reading only the up / down rows of active neurons");
  m.def("sparsify", &sparsify, "(x - c) where |x - c| > t, else 0");
  m.def("read_sum", &read_sum, "sum of a large fp32 buffer (memory-bandwidth probe)");
  m.attr("max_batch") = kMaxBatch;
}
