// Sparse-input GEMV / small-batch GEMM for activation sparsity (SCAP / TEAL / CATS).
//
// y[b, :] = bias + sum_{i : |x[b,i] - c[i]| > t[i]} (x[b,i] - c[i]) * Wt[i, :]
//
// Wt is the weight stored input-channel-major, (in, out) contiguous, so an inactive input channel
// is one contiguous row that is never read. The mask is computed here, from x, the per-channel
// centre c (SCAP's mode; zeros for TEAL / CATS) and the threshold t (one value or one per channel).
// For batch > 1 a row is read once for the union of the tokens that need it.
// Threads split the output columns (at::parallel_for: torch's own OpenMP runtime, no second one).
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
constexpr int64_t kTile = 2048;  // output columns per task: an 8 KB fp32 accumulator row stays in L1

inline float load(const float* p, int64_t j) { return p[j]; }
inline float load(const uint16_t* p, int64_t j) {
  uint32_t u = static_cast<uint32_t>(p[j]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// acc[0:n] += v0*r0 + v1*r1 + v2*r2 + v3*r3  (vectorised by the compiler)
template <typename W>
inline void axpy4(float* __restrict__ acc, const W* __restrict__ r0, const W* __restrict__ r1, const W* __restrict__ r2,
                  const W* __restrict__ r3, float v0, float v1, float v2, float v3, int64_t n) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) acc[j] += v0 * load(r0, j) + v1 * load(r1, j) + v2 * load(r2, j) + v3 * load(r3, j);
}

template <typename W>
inline void axpy1(float* __restrict__ acc, const W* __restrict__ r0, float v0, int64_t n) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) acc[j] += v0 * load(r0, j);
}

template <typename W>
void run(const float* x, const W* wt, const float* bias, const float* centre, const float* thr, bool thr_per_channel,
         float* y, int64_t B, int64_t in, int64_t out, int64_t* n_active_out) {
  // 1. compact the active rows: idx[k], vals[k * B + b] (zero where token b does not need row k)
  std::vector<int32_t> idx;
  std::vector<float> vals;
  idx.reserve(in);
  vals.reserve(in * B);
  for (int64_t i = 0; i < in; ++i) {
    const float c = centre ? centre[i] : 0.f;
    const float t = thr_per_channel ? thr[i] : thr[0];
    bool any = false;
    float v[kMaxBatch];
    for (int64_t b = 0; b < B; ++b) {
      float d = x[b * in + i] - c;
      bool a = std::fabs(d) > t;
      v[b] = a ? d : 0.f;
      any |= a;
    }
    if (any) {
      idx.push_back(static_cast<int32_t>(i));
      for (int64_t b = 0; b < B; ++b) vals.push_back(v[b]);
    }
  }
  const int64_t n = static_cast<int64_t>(idx.size());
  *n_active_out = n;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t tile = (out + nthreads - 1) / nthreads;
  tile = std::min<int64_t>(kTile, ((tile + 15) / 16) * 16);
  const int64_t ntiles = (out + tile - 1) / tile;

  // 2. each task owns a range of output columns and streams the active rows through it
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> accbuf(static_cast<size_t>(B * tile));
    for (int64_t tt = t0; tt < t1; ++tt) {
      const int64_t j0 = tt * tile, len = std::min(tile, out - j0);
      for (int64_t b = 0; b < B; ++b) {
        float* acc = accbuf.data() + b * tile;
        if (bias) std::memcpy(acc, bias + j0, len * sizeof(float));
        else std::fill(acc, acc + len, 0.f);
      }
      if (B == 1) {
        float* acc = accbuf.data();
        int64_t k = 0;
        for (; k + 4 <= n; k += 4) {
          axpy4(acc, wt + (int64_t)idx[k] * out + j0, wt + (int64_t)idx[k + 1] * out + j0, wt + (int64_t)idx[k + 2] * out + j0,
                wt + (int64_t)idx[k + 3] * out + j0, vals[k], vals[k + 1], vals[k + 2], vals[k + 3], len);
        }
        for (; k < n; ++k) axpy1(acc, wt + (int64_t)idx[k] * out + j0, vals[k], len);
      } else {
        for (int64_t k = 0; k < n; ++k) {
          const W* row = wt + (int64_t)idx[k] * out + j0;
          const float* v = vals.data() + k * B;
          for (int64_t b = 0; b < B; ++b)
            if (v[b] != 0.f) axpy1(accbuf.data() + b * tile, row, v[b], len);
        }
      }
      for (int64_t b = 0; b < B; ++b) std::memcpy(y + b * out + j0, accbuf.data() + b * tile, len * sizeof(float));
    }
  });
}

}  // namespace

// x: (B, in) fp32; wt: (in, out) fp32 or bf16, contiguous; bias: (out) fp32 or empty; centre: (in) fp32 or empty;
// thr: (1) or (in) fp32. Returns (y (B, out) fp32, number of rows read).
std::tuple<torch::Tensor, int64_t> sparse_gemv(torch::Tensor x, torch::Tensor wt, torch::Tensor bias, torch::Tensor centre,
                                               torch::Tensor thr) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 1);
  LN_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxBatch, 2);
  LN_CHECK(wt.dim() == 2 && wt.is_contiguous(), 3);
  LN_CHECK(wt.scalar_type() == torch::kFloat32 || wt.scalar_type() == torch::kBFloat16, 4);
  const int64_t B = x.size(0), in = x.size(1), out = wt.size(1);
  LN_CHECK(wt.size(0) == in, 5);
  LN_CHECK(bias.numel() == 0 || (bias.numel() == out && bias.scalar_type() == torch::kFloat32 && bias.is_contiguous()), 6);
  LN_CHECK(centre.numel() == 0 || (centre.numel() == in && centre.scalar_type() == torch::kFloat32 && centre.is_contiguous()), 7);
  LN_CHECK((thr.numel() == 1 || thr.numel() == in) && thr.scalar_type() == torch::kFloat32 && thr.is_contiguous(), 8);
  auto y = torch::empty({B, out}, x.options());
  int64_t n_active = 0;
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* cp = centre.numel() ? centre.data_ptr<float>() : nullptr;
  if (wt.scalar_type() == torch::kFloat32) {
    run<float>(x.data_ptr<float>(), wt.data_ptr<float>(), bp, cp, thr.data_ptr<float>(), thr.numel() == in && in > 1, y.data_ptr<float>(), B, in, out, &n_active);
  } else {
    run<uint16_t>(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), bp, cp, thr.data_ptr<float>(),
                  thr.numel() == in && in > 1, y.data_ptr<float>(), B, in, out, &n_active);
  }
  return {y, n_active};
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
  auto zero = torch::zeros({1}, x.options());
  int64_t rows = 0;
  run<float>(hp, down_wt.data_ptr<float>(), nullptr, nullptr, zero.data_ptr<float>(), false, y.data_ptr<float>(), B, F, out, &rows);
  return {y, n};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("last_error", &last_error, "the number of the last failed input check");
  m.def("sparse_gemv", &sparse_gemv, "sparse-input GEMV reading only the weight rows of active input channels");
  m.def("cats_mlp", &cats_mlp, "CATS MLP reading only the up / down rows of active neurons");
  m.attr("max_batch") = kMaxBatch;
}
