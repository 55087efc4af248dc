// The pieces the C++ ops share: bf16 <-> fp32, a dot product of fp32 values with bf16 or fp32 ones, exp for softmax,
// a row's maximum, and AVX2 forms over 8 lanes. Header-only; ops/extension.py rebuilds every op when it changes.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#define SPARSELM_AVX2 1
#include <immintrin.h>
#else
#define SPARSELM_AVX2 0
#endif

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

// Eight fp32 lanes at a time with AVX2, for the loops GCC does not vectorise itself (reductions, bit casts); the
// scalar functions above compute the same values one at a time where a loop has a tail or AVX2 is missing.
#if SPARSELM_AVX2
constexpr int64_t kVecLanes = 8;

inline __m256 exp8(__m256 x) {  // exp_approx, 8 lanes
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 er = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(er, _mm256_castsi256_ps(bits));
}

inline __m256 round8(__m256 x, c10::BFloat16* out) {  // stores round_bf16 of 8 lanes, returns them widened back
  __m256i b = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
  return _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
}

inline __m256 widen8(const c10::BFloat16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float sum8(__m256 x) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

inline float max8(__m256 x) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const c10::BFloat16* x) { return widen8(x); }
inline void store8(__m256 v, float* out) { _mm256_storeu_ps(out, v); }
inline void store8(__m256 v, c10::BFloat16* out) { round8(v, out); }
#else
constexpr int64_t kVecLanes = 0;  // no vector part: the scalar loops do it all
#endif

// The largest of n values (bf16 or fp32) as fp32.
template <typename T>
inline float row_max(const T* x, int64_t n) {
  float top = -INFINITY;
  int64_t j = 0;
#if SPARSELM_AVX2
  __m256 m = _mm256_set1_ps(-INFINITY);
  for (; j + kVecLanes <= n; j += kVecLanes) m = _mm256_max_ps(m, load8(x + j));
  top = max8(m);
#endif
  for (; j < n; ++j) top = std::max(top, widen(x[j]));
  return top;
}

}  // namespace sparselm
