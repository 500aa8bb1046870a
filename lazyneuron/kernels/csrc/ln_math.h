// Small math shared by the compiled kernels.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {
// exp without a library call (Cephes' expf: range reduction by ln 2, degree-6 polynomial,
// relative error ~1e-7), branch-free so that a loop over it vectorises (std::exp is a scalar call
// per element). Inputs are clamped to [-87, 88].
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // n = x / ln 2 rounded to the nearest integer by the 1.5 * 2^23 trick: its low bits then hold n,
  // with no float-to-int conversion (which, as it may trap, keeps the loop from vectorising)
  constexpr float kMagic = 12582912.0f;
  const float t = x * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const uint32_t bits = (bits_of(t) - 0x4B400000u + 127u) << 23;  // 2^n (unsigned: a NaN input shifts no negative value)
  return p * float_of(bits);
}
}  // namespace
