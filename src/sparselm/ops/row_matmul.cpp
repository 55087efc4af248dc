// Matrix products of a few rows (decoding: one token per sequence) against weights in bf16 or fp32, for the two
// layouts the model holds: a linear layer's [out, in] weight and the experts' [experts, in, out] weights. With a few
// rows the time is the reading of the weights, so each weight element is read once, widened to fp32 in registers and
// used for every row of a group of up to kRows rows; sums are fp32, the result is narrowed to x's dtype. Work is
// split over torch's intra-op threads by output columns (a linear layer) or by busy expert and slab of weight rows
// (the experts), always in an order independent of the thread count. The Python side is sparselm/ops/row_matmul.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "float_math.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kRows = 4;  // rows sharing one read of the weights
constexpr int64_t kSlab = 128;  // weight rows per task in the experts' layout

using sparselm::dot;
using sparselm::narrow;
using sparselm::widen;

// x widened to fp32 once, before the threads start: every task reads all of it.
template <typename X>
std::vector<float> widened(const at::Tensor& x) {
  const X* xp = x.data_ptr<X>();
  std::vector<float> out(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) out[i] = widen(xp[i]);
  return out;
}

// rows rows of xs [rows, k] dotted with weight row wn [k]. One row reads the weight directly; more rows widen it
// once into ``wide`` (k floats, in L1) and dot every row with that.
template <typename W>
inline void dot_rows(const float* xs, int64_t rows, const W* wn, int64_t k, float* wide, float* out) {
  if (rows == 1) {
    out[0] = dot(xs, wn, k);
    return;
  }
  for (int64_t i = 0; i < k; ++i) wide[i] = widen(wn[i]);
  for (int64_t r = 0; r < rows; ++r) out[r] = dot(xs + r * k, wide, k);
}

template <typename X, typename W>
void linear(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const std::vector<float> xs = widened<X>(x);
  const W* wp = w.data_ptr<W>();
  X* yp = y.data_ptr<X>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    float sums[kRows];
    std::vector<float> wide(k);
    for (int64_t r0 = 0; r0 < m; r0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, m - r0);
      const float* xr = xs.data() + r0 * k;
      for (int64_t col = begin; col < end; ++col) {
        dot_rows(xr, rows, wp + col * k, k, wide.data(), sums);
        for (int64_t r = 0; r < rows; ++r) narrow(sums[r], yp + (r0 + r) * n + col);
      }
    }
  });
}

// rows rows of xs (row stride k) times weight rows [i0, i1) of one expert (each a contiguous run of n values, so the
// whole range is read front to back): out[r, :] = sum_i xs[r, i] * w[i, :], fp32. Several rows widen each weight
// row once into ``wide`` (n floats, in L1).
template <typename W>
inline void axpy_rows(const float* xs, int64_t rows, int64_t k, const W* __restrict__ w, int64_t i0, int64_t i1,
                      int64_t n, float* __restrict__ wide, float* __restrict__ out) {
  std::fill(out, out + rows * n, 0.0f);
  for (int64_t i = i0; i < i1; ++i) {
    const W* __restrict__ wi = w + i * n;
    if (rows == 1) {
      const float a = xs[i];
      for (int64_t j = 0; j < n; ++j) out[j] += a * widen(wi[j]);
      continue;
    }
    for (int64_t j = 0; j < n; ++j) wide[j] = widen(wi[j]);
    for (int64_t r = 0; r < rows; ++r) {
      const float a = xs[r * k + i];
      float* __restrict__ o = out + r * n;
      for (int64_t j = 0; j < n; ++j) o[j] += a * wide[j];
    }
  }
}

// Tasks are (busy expert, range of kSlab weight rows): each reads its slab of the weight front to back and writes
// partial sums for the expert's rows; a second pass adds the slabs' partials up. Reading whole weight rows in order
// keeps the hardware prefetcher streaming, which column blocks strided by n do not (docs/benchmarks.md).
template <typename X, typename W>
void experts(const at::Tensor& x, const std::vector<int64_t>& first, const at::Tensor& w, at::Tensor& y) {
  const int64_t k = w.size(1), n = w.size(2), m = x.size(0);
  const int64_t slabs = (k + kSlab - 1) / kSlab;
  std::vector<int64_t> busy;  // experts with rows: idle experts' weights are not read at all
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(first.size()); ++e)
    if (first[e + 1] > first[e]) busy.push_back(e);
  const std::vector<float> xs = widened<X>(x);
  std::vector<float> partial(slabs * m * n);  // [slab, row, column]
  const W* wp = w.data_ptr<W>();
  at::parallel_for(0, static_cast<int64_t>(busy.size()) * slabs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t e = busy[task / slabs], slab = task % slabs;
      const int64_t i0 = slab * kSlab, i1 = std::min(k, i0 + kSlab);
      for (int64_t r0 = first[e]; r0 < first[e + 1]; r0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, first[e + 1] - r0);
        axpy_rows(xs.data() + r0 * k, rows, k, wp + e * k * n, i0, i1, n, wide.data(),
                  partial.data() + (slab * m + r0) * n);
      }
    }
  });
  X* yp = y.data_ptr<X>();
  at::parallel_for(0, m * n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      float sum = 0;
      for (int64_t slab = 0; slab < slabs; ++slab) sum += partial[slab * m * n + idx];
      narrow(sum, yp + idx);
    }
  });
}

void check_dtypes(const at::Tensor& x, const at::Tensor& w) {
  const auto ok = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  TORCH_CHECK(ok(x) && ok(w), "x and the weight must be fp32 or bf16; got ", x.scalar_type(), " and ",
              w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "x and the weight must be CPU tensors");
}

template <typename F>
void dispatch(const at::Tensor& x, const at::Tensor& w, F&& f) {
  const bool xb = x.scalar_type() == at::kBFloat16, wb = w.scalar_type() == at::kBFloat16;
  if (xb && wb) f(c10::BFloat16{}, c10::BFloat16{});
  else if (xb) f(c10::BFloat16{}, float{});
  else if (wb) f(float{}, c10::BFloat16{});
  else f(float{}, float{});
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w) {
  check_dtypes(x, w);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [rows, in]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "the weight must be contiguous [out, in]");
  TORCH_CHECK(w.size(1) == x.size(1), "x has ", x.size(1), " features, the weight takes ", w.size(1));
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  dispatch(x, w, [&](auto xt, auto wt) { linear<decltype(xt), decltype(wt)>(x, w, y); });
  return y;
}

at::Tensor expert_rows(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& w) {
  check_dtypes(x, w);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [rows, in]");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "the weights must be contiguous [experts, in, out]");
  TORCH_CHECK(w.size(1) == x.size(1), "x has ", x.size(1), " features, the experts take ", w.size(1));
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == w.size(0) && counts.scalar_type() == at::kLong,
              "counts must be int64 [experts] (", w.size(0), " experts)");
  const auto c = counts.contiguous();
  const int64_t* cp = c.data_ptr<int64_t>();
  std::vector<int64_t> first(w.size(0) + 1, 0);
  for (int64_t e = 0; e < w.size(0); ++e) {
    TORCH_CHECK(cp[e] >= 0, "expert ", e, " has a negative row count (", cp[e], ")");
    first[e + 1] = first[e] + cp[e];
  }
  TORCH_CHECK(first.back() == x.size(0), "counts add up to ", first.back(), " rows; x has ", x.size(0));
  auto y = at::empty({x.size(0), w.size(2)}, x.options());
  dispatch(x, w, [&](auto xt, auto wt) { experts<decltype(xt), decltype(wt)>(x, first, w, y); });
  return y;
}

}  // namespace

TORCH_LIBRARY(sparselm_rows, m) {
  m.def("linear_rows(Tensor x, Tensor weight) -> Tensor");
  m.def("expert_rows(Tensor x, Tensor counts, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparselm_rows, CPU, m) {
  m.impl("linear_rows", &linear_rows);
  m.impl("expert_rows", &expert_rows);
}
