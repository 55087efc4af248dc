// The softmax part of linear_cross_entropy.py: for each row of a chunk of logits (bf16 or fp32), its loss
// (log-sum-exp minus the target's logit, in fp32) and, when asked, its logits overwritten in place by
// d logits = (softmax - onehot) * scale. Three passes over a row that stays in cache (max; sum of exponentials;
// the gradient, recomputing each exponential), rows split over torch's intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "float_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

using namespace sparselm;  // float_math.h: the scalar and AVX2 helpers

template <typename T>
float row_exp_sum(const T* x, int64_t n, float shift) {
  float sum = 0.f;
  int64_t j = 0;
#if SPARSELM_AVX2
  const __m256 vshift = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; j + kVecLanes <= n; j += kVecLanes) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(load8(x + j), vshift)));
  sum = sum8(acc);
#endif
  for (; j < n; ++j) sum += exp_approx(widen(x[j]) - shift);
  return sum;
}

// x[j] = e^(x[j] - shift) * factor: the softmax scaled by the row's share of the mean.
template <typename T>
void row_softmax_scaled(T* x, int64_t n, float shift, float factor) {
  int64_t j = 0;
#if SPARSELM_AVX2
  const __m256 vshift = _mm256_set1_ps(shift), vfactor = _mm256_set1_ps(factor);
  for (; j + kVecLanes <= n; j += kVecLanes)
    store8(_mm256_mul_ps(exp8(_mm256_sub_ps(load8(x + j), vshift)), vfactor), x + j);
#endif
  for (; j < n; ++j) narrow(exp_approx(widen(x[j]) - shift) * factor, x + j);
}

template <typename T>
void rows(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scale, at::Tensor& row_loss, bool grad) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), ld = logits.stride(0);
  T* lp = logits.data_ptr<T>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const float* sp = scale.data_ptr<float>();
  float* out = row_loss.data_ptr<float>();
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* x = lp + r * ld;
      const int64_t target = tp[r];
      const float target_logit = widen(x[target]);
      const float top = row_max(x, vocab);
      const float total = row_exp_sum(x, vocab, top);
      out[r] = std::log(total) + top - target_logit;
      if (grad) {
        // The target's entry is computed in fp32 as softmax * scale - scale, then rounded once.
        const float factor = sp[r] / total;
        const float target_grad = exp_approx(target_logit - top) * factor - sp[r];
        row_softmax_scaled(x, vocab, top, factor);
        narrow(target_grad, x + target);
      }
    }
  });
}

void softmax_rows(at::Tensor logits, const at::Tensor& targets, const at::Tensor& scale, at::Tensor row_loss,
                  bool grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "softmax_rows: logits must be [N, V] with contiguous rows");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == n,
              "softmax_rows: targets must be N contiguous int64");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n,
              "softmax_rows: scale must be N contiguous fp32");
  TORCH_CHECK(row_loss.scalar_type() == at::kFloat && row_loss.is_contiguous() && row_loss.numel() == n,
              "softmax_rows: row_loss must be N contiguous fp32");
  if (n > 0) {
    const auto [lo, hi] = at::aminmax(targets);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < vocab, "softmax_rows: a target is outside [0, ",
                vocab, ")");
  }
  if (logits.scalar_type() == at::kBFloat16)
    rows<c10::BFloat16>(logits, targets, scale, row_loss, grad);
  else if (logits.scalar_type() == at::kFloat)
    rows<float>(logits, targets, scale, row_loss, grad);
  else
    TORCH_CHECK(false, "softmax_rows: logits must be bf16 or fp32, got ", logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY(sparselm_xent, m) {
  m.def("softmax_rows(Tensor(a!) logits, Tensor targets, Tensor scale, Tensor(b!) row_loss, bool grad) -> ()");
}

TORCH_LIBRARY_IMPL(sparselm_xent, CPU, m) { m.impl("softmax_rows", &softmax_rows); }
