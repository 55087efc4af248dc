// One decoding query per sequence attending over that sequence's keys in a paged KV pool, for every sequence and
// head of a batch in one call. Keys and values are read where they lie (block by block, through each sequence's
// block table), converted to fp32 in registers and never copied; scores, softmax and the weighted sum are fp32.
// Memory-bound by design: each key and value is read once. The Python side is sparselm/ops/paged_attention.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "float_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using sparselm::dot;
using sparselm::widen;

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
            const at::Tensor& lengths, double scale, at::Tensor& out) {
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block = k.size(2), head_stride = k.stride(0), width = tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, seqs * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / heads, h = task % heads, length = lp[s];
      const float* qs = qp + task * dim;
      const T* kh = kp + h * head_stride;
      const T* vh = vp + h * head_stride;
      scores.resize(length);
      float top = -INFINITY;
      for (int64_t start = 0; start < length; start += block) {
        const int64_t base = tp[s * width + start / block] * block, count = std::min(block, length - start);
        for (int64_t j = 0; j < count; ++j) {
          const float score = dot(qs, kh + (base + j) * dim, dim) * fscale;
          scores[start + j] = score;
          top = std::max(top, score);
        }
      }
      float total = 0;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t start = 0; start < length; start += block) {
        const int64_t base = tp[s * width + start / block] * block, count = std::min(block, length - start);
        for (int64_t j = 0; j < count; ++j) {
          const float p = std::exp(scores[start + j] - top);
          total += p;
          const T* vj = vh + (base + j) * dim;
          for (int64_t i = 0; i < dim; ++i) acc[i] += p * widen(vj[i]);
        }
      }
      float* os = op + task * dim;
      for (int64_t i = 0; i < dim; ++i) os[i] = acc[i] / total;
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& tables, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous fp32 [S, H, D]");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
              "k and v must be pools of one shape and dtype [H, blocks, block_size, D]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "k and v pools must be contiguous");
  TORCH_CHECK(k.size(0) == q.size(1) && k.size(3) == q.size(2), "pools must have q's heads and head size");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && tables.scalar_type() == at::kLong &&
                  tables.is_contiguous(), "tables must be contiguous int64 [S, blocks per sequence]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0) && lengths.scalar_type() == at::kLong &&
                  lengths.is_contiguous(), "lengths must be contiguous int64 [S]");
  const int64_t block = k.size(2), num_blocks = k.size(1), width = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  for (int64_t s = 0; s < q.size(0); ++s) {  // every block the kernel will read lies in the pool
    TORCH_CHECK(lp[s] >= 1 && lp[s] <= width * block, "sequence ", s, " has length ", lp[s], ": its table holds ",
                width, " blocks of ", block, " keys");
    for (int64_t b = 0; b < (lp[s] + block - 1) / block; ++b)
      TORCH_CHECK(tp[s * width + b] >= 0 && tp[s * width + b] < num_blocks, "sequence ", s, " names block ",
                  tp[s * width + b], " of a pool of ", num_blocks);
  }
  auto out = at::empty_like(q);
  if (k.scalar_type() == at::kBFloat16) {
    attend<c10::BFloat16>(q, k, v, tables, lengths, scale, out);
  } else {
    TORCH_CHECK(k.scalar_type() == at::kFloat, "k and v pools must be bf16 or fp32");
    attend<float>(q, k, v, tables, lengths, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(sparselm_paged, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor tables, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparselm_paged, CPU, m) { m.impl("decode_attention", &paged_decode_attention); }
