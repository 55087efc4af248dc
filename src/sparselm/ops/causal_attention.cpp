// Causal self-attention for training in bf16, forward and backward: the products through oneDNN's bf16 batch-reduce
// GEMM (bf16 inputs, fp32 results), softmax and its gradient in fp32 between them. See causal_attention.py.
//
// One task per (batch, head). A task walks its queries in blocks of kBlock rows; a block's queries see keys
// 0 .. its last row (the causal triangle, nothing above it computed; in the forward the queries may be the last
// positions of more keys, as a prompt chunk after cached keys). Softmax is taken over a block's whole key
// range at once (no running rescale): the scores of a block fit in the L2 cache for contexts of a few thousand.
// The forward returns the log-sum-exp of every query's scores; the backward recomputes the probabilities from it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "float_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using namespace sparselm;  // float_math.h: the scalar and AVX2 helpers
using bf16 = c10::BFloat16;
constexpr int64_t kBlock = 64;  // query rows per block

constexpr int64_t round_even(int64_t n) { return (n + 1) / 2 * 2; }
constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The forward's key buffers hold a power of two of keys (at least kBlock): oneDNN compiles and keeps a kernel per
// product shape and leading dimension, so a server seeing every prompt length would otherwise grow its memory by
// one kernel per length (measured: +850 MB over 1,000 lengths).
int64_t key_bucket(int64_t keys) {
  int64_t n = kBlock;
  while (n < keys) n *= 2;
  return n;
}

// C[m, n] (fp32, row stride ldc) = (add ? C : 0) + A[m, k] (bf16, row stride lda) @ B, with B in the pair-interleaved
// layout oneDNN's bf16 kernels take: element (r, c) of the k x n matrix at B[(r / 2) * 2 * ldb + 2 * c + r % 2].
void gemm(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c,
          int64_t ldc, bool add) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/true);
}

// Two bf16 values as the 32-bit word the pair-interleaved layout stores: lo at the lower address.
inline uint32_t pair(bf16 lo, bf16 hi) { return static_cast<uint32_t>(lo.x) | static_cast<uint32_t>(hi.x) << 16; }

inline uint32_t load_pair(const bf16* x) {
  uint32_t w;
  std::memcpy(&w, x, sizeof w);
  return w;
}

inline void store_pair(bf16* out, int64_t word, uint32_t w) { std::memcpy(out + 2 * word, &w, sizeof w); }

// Rows [0, rows) of a matrix (row stride ld) as the pair-interleaved right operand of a product with it as written:
// out[(r / 2), c, r % 2] = x[r, c], cols columns, a zero row added when rows is odd.
void pack_rows(const bf16* x, int64_t ld, int64_t rows, int64_t cols, bf16* out) {
  for (int64_t r = 0; r < rows; r += 2) {
    const bf16* lo = x + r * ld;
    if (r + 1 < rows) {
      const bf16* hi = x + (r + 1) * ld;
      for (int64_t c = 0; c < cols; ++c) store_pair(out, (r / 2) * cols + c, pair(lo[c], hi[c]));
    } else {
      for (int64_t c = 0; c < cols; ++c) store_pair(out, (r / 2) * cols + c, pair(lo[c], bf16(0.f)));
    }
  }
}

// The same for the matrix's transpose: out[(c / 2), r, c % 2] = x[r, c], for products with x^T (cols even), with a
// row length of ldo (>= rows). Each pair of a row moves as one 32-bit word, in tiles of rows that stay in L1.
void pack_transposed(const bf16* x, int64_t ld, int64_t rows, int64_t cols, int64_t ldo, bf16* out) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c = 0; c < cols; c += 2)
      for (int64_t r = r0; r < std::min(r0 + kTile, rows); ++r)
        store_pair(out, (c / 2) * ldo + r, load_pair(x + r * ld + c));
}

// out[c, r] = x[r, c] for rows x cols of x (row stride ld, rows even), out's row stride rows: two rows at a time, so
// that each store is one 32-bit word, in column tiles that stay in L1.
void transpose(const bf16* x, int64_t ld, int64_t rows, int64_t cols, bf16* out) {
  constexpr int64_t kTile = 64;
  for (int64_t c0 = 0; c0 < cols; c0 += kTile)
    for (int64_t r = 0; r < rows; r += 2)
      for (int64_t c = c0; c < std::min(c0 + kTile, cols); ++c)
        store_pair(out, (c * rows + r) / 2, pair(x[r * ld + c], x[(r + 1) * ld + c]));
}

// The per-row passes between the products (and the backward's row term), over the n scores of one query: 8 lanes at a
// time with AVX2 (float_math.h), the same arithmetic one value at a time for the tail and elsewhere.
float dot_bf16(const bf16* x, const bf16* y, int64_t n) {
  float sum = 0.f;
  int64_t j = 0;
#if SPARSELM_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; j + kVecLanes <= n; j += kVecLanes) acc = _mm256_fmadd_ps(widen8(x + j), widen8(y + j), acc);
  sum = sum8(acc);
#endif
  for (; j < n; ++j) sum += widen(x[j]) * widen(y[j]);
  return sum;
}

// p[j] = bf16(e^(s[j] * scale - shift)); returns the sum of the rounded values (what the product with V sums).
float exp_row(const float* s, int64_t n, float scale, float shift, bf16* p) {
  float sum = 0.f;
  int64_t j = 0;
#if SPARSELM_AVX2
  const __m256 vscale = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; j + kVecLanes <= n; j += kVecLanes)
    acc = _mm256_add_ps(acc, round8(exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vscale, vshift)), p + j));
  sum = sum8(acc);
#endif
  for (; j < n; ++j) {
    p[j] = round_bf16(exp_approx(s[j] * scale - shift));
    sum += widen(p[j]);
  }
  return sum;
}

// The softmax gradient of one query's n scores: p = e^(s * scale - lse), ds = p * (dp - delta) * scale, both bf16.
void grad_row(const float* s, const float* dp, int64_t n, float scale, float lse, float delta, bf16* ds, bf16* p) {
  int64_t j = 0;
#if SPARSELM_AVX2
  const __m256 vscale = _mm256_set1_ps(scale), vlse = _mm256_set1_ps(lse), vdelta = _mm256_set1_ps(delta);
  for (; j + kVecLanes <= n; j += kVecLanes) {
    const __m256 prob = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vscale, vlse));
    round8(prob, p + j);
    const __m256 grad = _mm256_mul_ps(_mm256_mul_ps(prob, _mm256_sub_ps(_mm256_loadu_ps(dp + j), vdelta)), vscale);
    round8(grad, ds + j);
  }
#endif
  for (; j < n; ++j) {
    const float prob = exp_approx(s[j] * scale - lse);
    p[j] = round_bf16(prob);
    ds[j] = round_bf16(prob * (dp[j] - delta) * scale);
  }
}

struct Strides {  // element strides of a [B, H, T, D] tensor whose last dimension is contiguous
  int64_t b, h, t;
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), h(x.stride(1)), t(x.stride(2)) {}
  int64_t at(int64_t batch, int64_t head) const { return batch * b + head * h; }
};

// q [B, H, Tq, D], k and v [B, H, Tk, D] with Tk >= Tq (equal for the backward): bf16, even D, D contiguous.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool same_length) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(),
              "causal_attention: q, k, v must be [B, H, T, D], k and v of one shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "causal_attention: q, k, v must share B, H and D");
  TORCH_CHECK(same_length ? k.size(2) == q.size(2) : k.size(2) >= q.size(2),
              same_length ? "causal_attention: q, k, v must be of one shape"
                          : "causal_attention: fewer keys than queries");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "causal_attention: q, k, v must be bf16");
  TORCH_CHECK(q.size(3) % 2 == 0, "causal_attention: the head dimension must be even");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "causal_attention: the head dimension must be contiguous");
}

at::Tensor empty_like_heads(const at::Tensor& q, at::ScalarType dtype) {  // [B, H, T, D] stored as [B, T, H, D]
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options().dtype(dtype)).transpose(1, 2);
}

// Tk keys for T queries: query i sees keys 0 .. Tk - T + i (the queries are the last T positions of the keys: a
// prompt chunk after keys already cached; Tk == T in training).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           double scale_d) {
  check_inputs(q, k, v, /*same_length=*/false);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Tk = k.size(2), Tp = key_bucket(Tk);
  const int64_t past = Tk - T;
  const float scale = static_cast<float>(scale_d);
  at::Tensor out = empty_like_heads(q, at::kBFloat16);
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  const Strides sq(q), sk(k), sv(v), so(out);
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>(), *vp = v.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  float* lp = lse.data_ptr<float>();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> k_t(D * Tp), v_pairs(Tp * D), probs(kBlock * Tp), q_block(kBlock * D);  // zero-filled
    std::vector<float> scores(kBlock * Tp), acc(kBlock * D), inv_sum(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const bf16 *qb = qp + sq.at(b, h), *kb = kp + sk.at(b, h), *vb = vp + sv.at(b, h);
      pack_transposed(kb, sk.t, Tk, D, Tp, k_t.data());
      pack_rows(vb, sv.t, Tk, D, v_pairs.data());
      for (int64_t r0 = 0; r0 < T; r0 += kBlock) {
        // Every product has kBlock rows and a multiple of kBlock keys: the shapes oneDNN compiles a kernel for
        // stay few (see key_bucket). Rows past the queries and keys past `seen` are computed and never read.
        const int64_t rows = std::min(kBlock, T - r0), keys = past + r0 + rows, keys_even = round_up(keys, kBlock);
        for (int64_t i = 0; i < rows; ++i) std::copy_n(qb + (r0 + i) * sq.t, D, q_block.data() + i * D);
        gemm(kBlock, keys_even, D, q_block.data(), D, k_t.data(), Tp, scores.data(), Tp, false);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t seen = past + r0 + i + 1;  // query r0 + i sees keys 0 .. past + r0 + i
          float* s = scores.data() + i * Tp;
          bf16* p = probs.data() + i * Tp;
          const float top = row_max(s, seen) * scale;  // scale > 0
          const float sum = exp_row(s, seen, scale, top, p);
          for (int64_t j = seen; j < keys_even; ++j) p[j] = bf16(0.f);
          inv_sum[i] = 1.f / sum;
          lp[task * T + r0 + i] = top + std::log(sum);
        }
        gemm(kBlock, D, keys_even, probs.data(), Tp, v_pairs.data(), D, acc.data(), D, false);
        for (int64_t i = 0; i < rows; ++i) {
          bf16* o = op + so.at(b, h) + (r0 + i) * so.t;
          for (int64_t d = 0; d < D; ++d) o[d] = round_bf16(acc[i * D + d] * inv_sum[i]);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        double scale_d) {
  check_inputs(q, k, v, /*same_length=*/true);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "causal_attention: gradient shape");
  TORCH_CHECK(grad_out.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "causal_attention: the output and its gradient must be bf16");
  TORCH_CHECK(grad_out.stride(3) == 1 && out.stride(3) == 1, "causal_attention: the head dimension must be contiguous");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "causal_attention: lse must be contiguous fp32");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Tp = round_even(T);
  const float scale = static_cast<float>(scale_d);
  at::Tensor dq = empty_like_heads(q, at::kBFloat16), dk = empty_like_heads(q, at::kBFloat16),
             dv = empty_like_heads(q, at::kBFloat16);
  const Strides sq(q), sk(k), sv(v), so(out), sg(grad_out), sdq(dq), sdk(dk), sdv(dv);
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>(), *vp = v.data_ptr<bf16>(),
             *op = out.data_ptr<bf16>(), *gp = grad_out.data_ptr<bf16>();
  const float* lp = lse.data_ptr<float>();
  bf16 *dqp = dq.data_ptr<bf16>(), *dkp = dk.data_ptr<bf16>(), *dvp = dv.data_ptr<bf16>();
  constexpr int64_t kBlockEven = round_even(kBlock);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> k_t(D * Tp), v_t(D * Tp), k_pairs(Tp * D), q_pairs(kBlockEven * D), g_pairs(kBlockEven * D);
    std::vector<bf16> ds(kBlockEven * Tp), p(kBlockEven * Tp), ds_t(Tp * kBlockEven), p_t(Tp * kBlockEven);
    std::vector<float> probs(kBlock * Tp), dprobs(kBlock * Tp), dq_acc(kBlock * D), dk_acc(Tp * D), dv_acc(Tp * D);
    std::vector<float> delta(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const bf16 *qb = qp + sq.at(b, h), *kb = kp + sk.at(b, h), *vb = vp + sv.at(b, h);
      const bf16 *ob = op + so.at(b, h), *gb = gp + sg.at(b, h);
      const float* lb = lp + task * T;
      pack_transposed(kb, sk.t, T, D, Tp, k_t.data());
      pack_transposed(vb, sv.t, T, D, Tp, v_t.data());
      pack_rows(kb, sk.t, T, D, k_pairs.data());
      for (int64_t t = 0; t < T; ++t)  // delta_t = sum_d dO[t, d] * O[t, d]: the softmax gradient's row term
        delta[t] = dot_bf16(gb + t * sg.t, ob + t * so.t, D);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      for (int64_t r0 = 0; r0 < T; r0 += kBlock) {
        const int64_t rows = std::min(kBlock, T - r0), rows_even = round_even(rows), keys = r0 + rows,
                      keys_even = round_even(keys);
        gemm(rows, keys, D, qb + r0 * sq.t, sq.t, k_t.data(), Tp, probs.data(), Tp, false);
        gemm(rows, keys, D, gb + r0 * sg.t, sg.t, v_t.data(), Tp, dprobs.data(), Tp, false);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t seen = r0 + i + 1;
          const float row_lse = lb[r0 + i], row_delta = delta[r0 + i];
          const float* s = probs.data() + i * Tp;
          const float* dp = dprobs.data() + i * Tp;
          bf16* dsi = ds.data() + i * Tp;
          bf16* pi = p.data() + i * Tp;
          grad_row(s, dp, seen, scale, row_lse, row_delta, dsi, pi);
          for (int64_t j = seen; j < keys_even; ++j) dsi[j] = pi[j] = bf16(0.f);
        }
        for (int64_t i = rows; i < rows_even; ++i)  // the padding row of an odd last block
          for (int64_t j = 0; j < keys_even; ++j) ds[i * Tp + j] = p[i * Tp + j] = bf16(0.f);
        transpose(ds.data(), Tp, rows_even, keys_even, ds_t.data());
        transpose(p.data(), Tp, rows_even, keys_even, p_t.data());
        gemm(rows, D, keys_even, ds.data(), Tp, k_pairs.data(), D, dq_acc.data(), D, false);
        for (int64_t i = 0; i < rows; ++i) {
          bf16* o = dqp + sdq.at(b, h) + (r0 + i) * sdq.t;
          for (int64_t d = 0; d < D; ++d) o[d] = round_bf16(dq_acc[i * D + d]);
        }
        pack_rows(qb + r0 * sq.t, sq.t, rows, D, q_pairs.data());
        pack_rows(gb + r0 * sg.t, sg.t, rows, D, g_pairs.data());
        gemm(keys, D, rows_even, ds_t.data(), rows_even, q_pairs.data(), D, dk_acc.data(), D, true);
        gemm(keys, D, rows_even, p_t.data(), rows_even, g_pairs.data(), D, dv_acc.data(), D, true);
      }
      for (int64_t t = 0; t < T; ++t) {
        bf16* dko = dkp + sdk.at(b, h) + t * sdk.t;
        bf16* dvo = dvp + sdv.at(b, h) + t * sdv.t;
        for (int64_t d = 0; d < D; ++d) {
          dko[d] = round_bf16(dk_acc[t * D + d]);
          dvo[d] = round_bf16(dv_acc[t * D + d]);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(sparselm_causal, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparselm_causal, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
