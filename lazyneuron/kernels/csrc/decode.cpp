// Fused small ops of one decode step (batch 1 to 16, fp32 activations), so that a layer costs a
// handful of calls besides its GEMVs:
//   rmsnorm       y = x / sqrt(mean(x^2) + eps) * w            (Llama's RMSNorm, in fp32)
//   add_rmsnorm   h += d (in place), then y = rmsnorm(h)       (the residual add fused in)
//   attn_decode   rotary embedding of q and k (rotate-half form, cos / sin given), the new k / v
//                 written at position `pos` of a static cache, then softmax(q k^T * scale) v over
//                 positions 0..pos, grouped-query heads sharing their key / value head.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ln_check.h"
#include "ln_math.h"

#ifndef LN_ATT_AHEAD
#define LN_ATT_AHEAD 16
#endif

namespace {

// dot product with 16 independent partial sums, so that the compiler vectorises it
inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma GCC ivdep
    for (int j = 0; j < 16; ++j) s[j] += a[i + j] * b[i + j];
  }
  float tot = 0.f;
  for (; i < n; ++i) tot += a[i] * b[i];
  for (int j = 0; j < 16; ++j) tot += s[j];
  return tot;
}

// q . k over one head of D values: whole vectors accumulated in registers and reduced once (the
// generic dot's 16 partial sums cost a scalar reduction per call, most of a score's time at D = 64)
inline float head_dot(const float* __restrict__ q, const float* __restrict__ k, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= D; j += 32) {
      a = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), _mm512_loadu_ps(k + j), a);
      b = _mm512_fmadd_ps(_mm512_loadu_ps(q + j + 16), _mm512_loadu_ps(k + j + 16), b);
    }
    if (j < D) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), _mm512_loadu_ps(k + j), a);
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t j = 0; j < D; j += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(k + j), a);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 s2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
  }
#endif
  return dot(q, k, D);
}

#if defined(__AVX512F__)
// 16 values of a cache row as fp32: fp32 as stored, bf16 widened exactly
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// q . k over a head of 64 (the same sums, in the same order, as head_dot)
template <typename CT>
inline float dot64(const float* __restrict__ q, const CT* __restrict__ k) {
  __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), ld16(k));
  __m512 b = _mm512_mul_ps(_mm512_loadu_ps(q + 16), ld16(k + 16));
  a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 32), ld16(k + 32), a);
  b = _mm512_fmadd_ps(_mm512_loadu_ps(q + 48), ld16(k + 48), b);
  return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}
// acc (G, 64) = sum_t s[h * n + t] * V[t] for t < n: the G query heads' accumulators (4 vectors
// each) held in registers over the whole chunk, each value row loaded once for all G heads
template <int G, typename CT>
inline void pv64(const CT* __restrict__ V, const float* __restrict__ s, int64_t n, float* __restrict__ acc) {
  __m512 a[G][4];
  for (int h = 0; h < G; ++h)
    for (int j = 0; j < 4; ++j) a[h][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const CT* vr = V + t * 64;
    const __m512 v0 = ld16(vr), v1 = ld16(vr + 16), v2 = ld16(vr + 32), v3 = ld16(vr + 48);
    for (int h = 0; h < G; ++h) {
      const __m512 p = _mm512_set1_ps(s[h * n + t]);
      a[h][0] = _mm512_fmadd_ps(p, v0, a[h][0]);
      a[h][1] = _mm512_fmadd_ps(p, v1, a[h][1]);
      a[h][2] = _mm512_fmadd_ps(p, v2, a[h][2]);
      a[h][3] = _mm512_fmadd_ps(p, v3, a[h][3]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + h * 64 + j * 16, a[h][j]);
}
#endif

inline void rms_row(const float* x, const float* w, float* y, int64_t d, float eps) {
  const float ss = dot(x, x, d);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma GCC ivdep
  for (int64_t i = 0; i < d; ++i) y[i] = w[i] * (x[i] * r);
}

// bf16 <-> fp32 bits: round to nearest even (as torch converts), and widen exactly
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void rope(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * cos[i] - x[i + h] * sin[i];
  for (int64_t i = h; i < D; ++i) out[i] = x[i] * cos[i] + x[i - h] * sin[i];
}

}  // namespace

torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps) {
  LN_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), 21);
  LN_CHECK(w.dim() == 1 && w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.size(0) == x.size(1), 22);
  auto y = torch::empty_like(x);
  const int64_t B = x.size(0), d = x.size(1);
  for (int64_t b = 0; b < B; ++b) rms_row(x.data_ptr<float>() + b * d, w.data_ptr<float>(), y.data_ptr<float>() + b * d, d, static_cast<float>(eps));
  return y;
}

torch::Tensor add_rmsnorm(torch::Tensor h, torch::Tensor delta, torch::Tensor w, double eps) {
  LN_CHECK(h.dim() == 2 && h.scalar_type() == torch::kFloat32 && h.is_contiguous(), 21);
  LN_CHECK(delta.scalar_type() == torch::kFloat32 && delta.is_contiguous() && delta.numel() == h.numel(), 23);
  LN_CHECK(w.dim() == 1 && w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.size(0) == h.size(1), 22);
  float* hp = h.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
#pragma GCC ivdep
  for (int64_t i = 0; i < h.numel(); ++i) hp[i] += dp[i];
  auto y = torch::empty_like(h);
  const int64_t B = h.size(0), d = h.size(1);
  for (int64_t b = 0; b < B; ++b) rms_row(hp + b * d, w.data_ptr<float>(), y.data_ptr<float>() + b * d, d, static_cast<float>(eps));
  return y;
}

// q: (B, H*D); k, v: (B, KV*D); cos, sin: (D); kc, vc: (B, KV, L, D), fp32 or bf16; 0 <= pos < L.
// Returns (B, H*D). Writes the rotated k and v into kc / vc at pos.
torch::Tensor attn_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc,
                          torch::Tensor vc, int64_t pos, double scale) {
  const bool half = kc.scalar_type() == torch::kBFloat16;  // a bf16 cache: rows rounded as written, widened as read
  LN_CHECK(kc.dim() == 4 && (kc.scalar_type() == torch::kFloat32 || half) && kc.is_contiguous() && vc.sizes() == kc.sizes() &&
               vc.is_contiguous() && vc.scalar_type() == kc.scalar_type(), 31);
  const int64_t B = kc.size(0), KV = kc.size(1), L = kc.size(2), D = kc.size(3);
  LN_CHECK(pos >= 0 && pos < L, 32);
  // fused: k and v empty, q holds each row's q, k and v side by side (one projection call's output)
  const bool fused = k.numel() == 0 && v.numel() == 0;
  const int64_t qw = fused ? q.size(1) - 2 * KV * D : q.size(1);
  LN_CHECK(q.dim() == 2 && q.size(0) == B && qw > 0 && qw % (KV * D) == 0 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(), 33);
  LN_CHECK(fused || (k.dim() == 2 && k.size(0) == B && k.size(1) == KV * D && k.scalar_type() == torch::kFloat32 && k.is_contiguous()), 34);
  LN_CHECK(fused || (v.dim() == 2 && v.size(0) == B && v.size(1) == KV * D && v.scalar_type() == torch::kFloat32 && v.is_contiguous()), 34);
  LN_CHECK(cos.numel() == D && sin.numel() == D && cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
               cos.is_contiguous() && sin.is_contiguous(), 35);
  LN_CHECK(D % 2 == 0, 36);
  const int64_t H = qw / D, G = H / KV;
  auto out = torch::empty({B, qw}, q.options());
  const int64_t ldq = q.size(1), ldk = fused ? ldq : KV * D;  // row strides of q and of k / v
  const float* qp = q.data_ptr<float>();
  const float* kp = fused ? qp + qw : k.data_ptr<float>();
  const float* vp = fused ? qp + qw + KV * D : v.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* kcp = half ? nullptr : kc.data_ptr<float>();
  float* vcp = half ? nullptr : vc.data_ptr<float>();
  uint16_t* kch = half ? reinterpret_cast<uint16_t*>(kc.data_ptr()) : nullptr;
  uint16_t* vch = half ? reinterpret_cast<uint16_t*>(vc.data_ptr()) : nullptr;
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < KV; ++g) {
      const int64_t off = ((b * KV + g) * L + pos) * D;
      if (half) {
        thread_local std::vector<float> kr;
        kr.resize(D);
        rope(kp + b * ldk + g * D, cp, sp, kr.data(), D);
        for (int64_t j = 0; j < D; ++j) {
          kch[off + j] = to_bf16(kr[j]);
          vch[off + j] = to_bf16(vp[b * ldk + g * D + j]);
        }
      } else {
        rope(kp + b * ldk + g * D, cp, sp, kcp + off, D);
        std::copy(vp + b * ldk + g * D, vp + b * ldk + (g + 1) * D, vcp + off);
      }
    }
  const int64_t T = pos + 1;
  // Work items: (sequence, key / value head, chunk of positions). Each item reads its keys and
  // values once for the G query heads that share them (one key row, G dot products), and leaves
  // per query head a partial softmax (max, sum, sum of p * v); the chunks are merged after. Long
  // caches are thus read once, split across the threads, and streamed with a prefetch ahead
  // (the previous kernel read them per query head: ~20 GB/s at 1,000 positions).
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(64, (B * KV * T + 4 * nthreads - 1) / (4 * nthreads));
  const int64_t C = (T + chunk - 1) / chunk;
  thread_local std::vector<float> qrot, part;  // rotated queries (B, H, D); partials (B, H, C, D + 2)
  qrot.resize(static_cast<size_t>(B * H * D));
  part.resize(static_cast<size_t>(B * H * C * (D + 2)));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hh = 0; hh < H; ++hh) rope(qp + b * ldq + hh * D, cp, sp, qrot.data() + (b * H + hh) * D, D);
  const float sc = static_cast<float>(scale);
  float* qr = qrot.data();
  float* pt = part.data();
  constexpr int64_t kAhead = LN_ATT_AHEAD;  // rows of keys / values prefetched ahead
  auto item = [&](int64_t it) {
    const int64_t c = it % C, bg = it / C, b = bg / KV, g = bg % KV;
    const int64_t t0 = c * chunk, t1 = std::min(T, t0 + chunk), n = t1 - t0;
    const int64_t base = (b * KV + g) * L * D;
    thread_local std::vector<float> s, acc;
    s.resize(static_cast<size_t>(G * n));
    acc.resize(static_cast<size_t>(G * D));
    // keys and values of positions t0 .. t1 - 1 (row t - t0), in the cache's format
    auto prefetch = [&](const auto* K, const auto* V, int64_t t) {
#if defined(__x86_64__) || defined(__i386__)
      if (t + kAhead < n) {  // the key and value rows kAhead positions on, every line of them
        const int64_t bytes = D * static_cast<int64_t>(sizeof(*K));
        for (int64_t off = 0; off < bytes; off += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(K + (t + kAhead) * D) + off, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(V + (t + kAhead) * D) + off, _MM_HINT_T0);
        }
      }
#endif
    };
    auto softmax = [&]() {  // scores -> e^(s - max) per query head; max and sum into the partials
      for (int64_t h = 0; h < G; ++h) {
        float* sh = s.data() + h * n;
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sh[t]);
        float den = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          sh[t] = exp_fast(sh[t] - mx);
          den += sh[t];
        }
        float* o = pt + ((b * H + g * G + h) * C + c) * (D + 2);
        o[D] = mx;
        o[D + 1] = den;
      }
    };
    bool done = false;
#if defined(__AVX512F__)
    if (D == 64 && G <= 4) {  // Llama-family heads of 64: the cache read as stored, the accumulators in registers
      auto fast = [&](const auto* K, const auto* V) {
        using CT = std::remove_const_t<std::remove_pointer_t<decltype(K)>>;
        for (int64_t t = 0; t < n; ++t) {
          prefetch(K, V, t);
          for (int64_t h = 0; h < G; ++h) s[h * n + t] = dot64<CT>(qr + (b * H + g * G + h) * D, K + t * D) * sc;
        }
        softmax();
        switch (G) {
          case 1: pv64<1, CT>(V, s.data(), n, acc.data()); break;
          case 2: pv64<2, CT>(V, s.data(), n, acc.data()); break;
          case 3: pv64<3, CT>(V, s.data(), n, acc.data()); break;
          default: pv64<4, CT>(V, s.data(), n, acc.data()); break;
        }
      };
      if (half) fast(kch + base + t0 * D, vch + base + t0 * D);
      else fast(kcp + base + t0 * D, vcp + base + t0 * D);
      done = true;
    }
#endif
    if (!done) {
      thread_local std::vector<float> kw, vw;  // a bf16 cache's chunk, widened
      if (half) {
        kw.resize(static_cast<size_t>(n * D));
        vw.resize(static_cast<size_t>(n * D));
        for (int64_t i = 0; i < n * D; ++i) {
          kw[i] = from_bf16(kch[base + t0 * D + i]);
          vw[i] = from_bf16(vch[base + t0 * D + i]);
        }
      }
      const float* K = half ? kw.data() : kcp + base + t0 * D;
      const float* V = half ? vw.data() : vcp + base + t0 * D;
      for (int64_t t = 0; t < n; ++t) {
        prefetch(K, V, t);
        for (int64_t h = 0; h < G; ++h) s[h * n + t] = head_dot(qr + (b * H + g * G + h) * D, K + t * D, D) * sc;
      }
      softmax();
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const float* vr = V + t * D;
        for (int64_t h = 0; h < G; ++h) {
          const float p = s[h * n + t];
          float* a = acc.data() + h * D;
#pragma GCC ivdep
          for (int64_t j = 0; j < D; ++j) a[j] += p * vr[j];
        }
      }
    }
    for (int64_t h = 0; h < G; ++h) std::copy(acc.data() + h * D, acc.data() + (h + 1) * D, pt + ((b * H + g * G + h) * C + c) * (D + 2));
  };
  const int64_t items = B * KV * C;
  if (items == 1 || T * B * H < 512) {
    for (int64_t it = 0; it < items; ++it) item(it);
  } else {
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; ++it) item(it);
    });
  }
  // merge each query head's chunks: out = sum_c e^(m_c - m) acc_c / sum_c e^(m_c - m) den_c
  for (int64_t i = 0; i < B * H; ++i) {
    const float* pi = pt + i * C * (D + 2);
    float m = -INFINITY;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, pi[c * (D + 2) + D]);
    float den = 0.f;
    float* o = op + i * D;
    std::fill(o, o + D, 0.f);
    for (int64_t c = 0; c < C; ++c) {
      const float* pc = pi + c * (D + 2);
      const float w = exp_fast(pc[D] - m);
      den += w * pc[D + 1];
#pragma GCC ivdep
      for (int64_t j = 0; j < D; ++j) o[j] += w * pc[j];
    }
    const float inv = 1.f / den;
    for (int64_t j = 0; j < D; ++j) o[j] *= inv;
  }
  return out;
}

namespace {
// out = silu(gate) * up over n values (separate restrict pointers, so that the loop vectorises)
void silu_mul_row(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = gate[j] / (1.f + exp_fast(-gate[j])) * up[j];
}
}  // namespace

// h (B, F) = silu(gate) * up from one call's output gu (B, 2F): gate columns, then up columns.
torch::Tensor silu_mul(torch::Tensor gu) {
  LN_CHECK(gu.dim() == 2 && gu.scalar_type() == torch::kFloat32 && gu.is_contiguous() && gu.size(1) % 2 == 0, 37);
  const int64_t B = gu.size(0), F = gu.size(1) / 2;
  auto h = torch::empty({B, F}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = h.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) silu_mul_row(g + b * 2 * F, g + b * 2 * F + F, o + b * F, F);
  return h;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("last_error", &last_error, "the number of the last failed input check");
  m.def("rmsnorm", &rmsnorm, "RMSNorm of (B, d) rows");
  m.def("add_rmsnorm", &add_rmsnorm, "h += delta in place, then RMSNorm of h");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a (B, 2F) gate|up row");
  m.def("attn_decode", &attn_decode, "rotary embedding, static-cache write and attention for one new position");
}
