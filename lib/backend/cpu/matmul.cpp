// Batched matrix products on the CPU (Backend::matmul): oneDNN's sgemm (row-major, JIT-compiled) per matrix of the
// batch, then the shift on the diagonal. One matrix: sgemm threads itself. A batch: the matrices are spread over
// the OpenMP threads, one single-threaded sgemm each (oneDNN runs sequentially inside a parallel region); a summed
// batch (stride_c == 0): each thread sums its share into its own partial C, then the partials are added.
// The products without B (B = I) and the shift are plain loops: they touch rows * cols and rows floats.
// SocConv's matrix path calls this with batch = groups and C x C matrices (C = 32..2048, the Horner products), and
// with batch = images for its 1x1 convolutions on NCHW buffers.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

namespace {

// C = alpha op(A) op(B) + beta C for one matrix of the batch (B = I when b is null).
dnnl::status product(const MatmulShape& s, float alpha, const float* a, const float* b, float beta, float* c) {
  const int64_t lda = s.transpose_a ? s.rows : s.inner, ldb = s.transpose_b ? s.inner : s.cols;
  if (b != nullptr)
    return dnnl::sgemm(s.transpose_a ? 'T' : 'N', s.transpose_b ? 'T' : 'N', s.rows, s.cols, s.inner, alpha, a, lda, b,
                       ldb, beta, c, s.cols);
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t q = 0; q < s.cols; ++q) {
      const float value = alpha * (s.transpose_a ? a[q * lda + r] : a[r * lda + q]);
      float& out = c[r * s.cols + q];
      out = beta == 0.0f ? value : value + beta * out;
    }
  return dnnl::status::success;
}

}  // namespace

void CpuBackend::matmul(const MatmulShape& s, float alpha, const float* a, const float* b, float beta, float shift,
                        float* c) {
  s.validate();
  require(b != nullptr || s.inner == s.cols, "matmul without B needs inner == cols (B = I), got ", s.str());
  require(shift == 0.0f || s.rows == s.cols, "matmul with a shift needs square C, got ", s.str());
  auto operand_b = [&](int64_t i) { return b != nullptr ? b + i * s.stride_b : nullptr; };
  std::atomic<int> failed{static_cast<int>(dnnl::status::success)};
  auto run = [&](int64_t i, float beta_i, float* ci) {
    const dnnl::status status = product(s, alpha, a + i * s.stride_a, operand_b(i), beta_i, ci);
    if (status != dnnl::status::success) failed = static_cast<int>(status);
  };
  const bool summed = s.batch > 1 && s.stride_c == 0;
  const int64_t size = s.rows * s.cols;
  if (s.batch == 1) {
    run(0, beta, c);
  } else if (!summed) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < s.batch; ++i) run(i, beta, c + i * s.stride_c);
  } else {
    const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), s.batch));
    std::vector<float> partial(static_cast<size_t>(threads * size), 0.0f);
#pragma omp parallel num_threads(threads)
    {
      float* mine = partial.data() + omp_get_thread_num() * size;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < s.batch; ++i) run(i, 1.0f, mine);
    }
    for (int64_t e = 0; e < size; ++e) {
      float sum = beta == 0.0f ? 0.0f : beta * c[e];
      for (int t = 0; t < threads; ++t) sum += partial[static_cast<size_t>(t * size + e)];
      c[e] = sum;
    }
  }
  require<BackendError>(failed == static_cast<int>(dnnl::status::success), "oneDNN sgemm failed (status ",
                        failed.load(), ") for matmul ", s.str());
  if (shift != 0.0f)
    for (int64_t i = 0; i < (summed ? 1 : s.batch); ++i)
      for (int64_t r = 0; r < s.rows; ++r) c[i * s.stride_c + r * s.cols + r] += shift;
}

}  // namespace orthoconv::cpu
