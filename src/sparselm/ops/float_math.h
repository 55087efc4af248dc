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
