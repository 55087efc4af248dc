// The pieces the C++ ops share: bf16 <-> fp32 and a dot product of fp32 values with bf16 or fp32 ones. Header-only;
// ops/extension.py rebuilds every op when this file changes.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace sparselm {

inline float widen(float x) { return x; }

inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, c10::BFloat16* out) { *out = c10::BFloat16(x); }  // round to nearest even

// fp32 -> bf16, rounding to nearest even, without c10's NaN branch so that loops over it vectorise (finite inputs).
inline c10::BFloat16 round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// e^x for x <= 0 (softmax after its maximum is subtracted), within ~2 ulp, branch-free so that loops over it
// vectorise where std::exp would not: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by Cephes' degree-6 polynomial.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return er * two_n;
}

// sum_i x[i] * y[i] over n values, in 16 independent partial sums so that the compiler keeps them in vector registers.
template <typename T>
inline float dot(const float* __restrict__ x, const T* __restrict__ y, int64_t n) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += x[i + j] * widen(y[i + j]);
  float sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += part[j];
  for (; i < n; ++i) sum += x[i] * widen(y[i]);
  return sum;
}

}  // namespace sparselm
