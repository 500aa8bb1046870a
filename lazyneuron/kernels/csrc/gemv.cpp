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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ln_check.h"

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

// acc[0:n] += v0*r0 + v1*r1 + v2*r2 + v3*r3  (vectorised by the compiler)
template <typename W>
inline void axpy4(float* __restrict__ acc, const W* __restrict__ r0, const W* __restrict__ r1, const W* __restrict__ r2,
                  const W* __restrict__ r3, float v0, float v1, float v2, float v3, int64_t n) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) acc[j] += v0 * ld(r0, j) + v1 * ld(r1, j) + v2 * ld(r2, j) + v3 * ld(r3, j);
}

template <typename W>
inline void axpy1(float* __restrict__ acc, const W* __restrict__ r0, float v0, int64_t n) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) acc[j] += v0 * ld(r0, j);
}

// acc (B rows, stride lda) += sum_{k in [k0, k1)} vals[k*B + b] * Wt[row k, j0 : j0 + len]
template <typename W>
void rows_pass(const W* wt, int64_t out, const int32_t* idx, const float* vals, int64_t B, int64_t k0, int64_t k1, int64_t j0,
               int64_t len, float* acc, int64_t lda) {
  auto row = [&](int64_t k) { return wt + (idx ? static_cast<int64_t>(idx[k]) : k) * out + j0; };
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const W *r0 = row(k), *r1 = row(k + 1), *r2 = row(k + 2), *r3 = row(k + 3);
    const float* v = vals + k * B;
    for (int64_t b = 0; b < B; ++b) {
      const float v0 = v[b], v1 = v[B + b], v2 = v[2 * B + b], v3 = v[3 * B + b];
      if (B > 1 && v0 == 0.f && v1 == 0.f && v2 == 0.f && v3 == 0.f) continue;  // none of the 4 rows is active for token b
      axpy4(acc + b * lda, r0, r1, r2, r3, v0, v1, v2, v3, len);
    }
  }
  for (; k < k1; ++k) {
    const W* r0 = row(k);
    for (int64_t b = 0; b < B; ++b)
      if (B == 1 || vals[k * B + b] != 0.f) axpy1(acc + b * lda, r0, vals[k * B + b], len);
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
    auto bound = [&](int64_t p) { return p == parts ? n : ((n * p / parts) & ~int64_t(3)); };
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
  m.def("read_sum", &read_sum, "sum of a large fp32 buffer (memory-bandwidth probe)");
  m.attr("max_batch") = kMaxBatch;
}
