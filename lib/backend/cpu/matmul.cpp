// Batched matrix products on the CPU (Backend::matmul): oneDNN's sgemm (row-major, JIT-compiled) per matrix of the
// batch, then the shift on the diagonal. One matrix: sgemm threads itself. A batch: the matrices are spread over
// the OpenMP threads, one single-threaded sgemm each (oneDNN runs sequentially inside a parallel region); a summed
// batch (stride_c == 0): each thread sums its share into its own partial C, then the partials are added.
// The products without B (B = I) and the shift are plain loops: they touch rows * cols and rows floats.
// SocConv's matrix path calls this with batch = groups and C x C matrices (C = 32..2048, the Horner products), and
// with batch = images for its 1x1 convolutions on NCHW buffers.
// One exception, chosen by shape alone (summed_by_primitive, so the same shape always runs the same kernel): a
// summed NT batch with a long inner dimension, sum_b A_b B_b^T with inner >= 16 rows and cols (dL/dP^T = sum_n
// X_n dY_n^T of a 1x1 layer with C <= H W / 16: LipConvnet-15's 32 channels at 32x32, 32 x 32 x 1024 per image),
// where the single-threaded sgemm calls run at about 55 GF/s (2 threads, this Xeon). There one oneDNN matmul
// primitive (brgemm) writes the batch of products into summed_scratch_ and a pass adds them up in batch order
// (the result does not depend on the thread count): 128 images at 32 x 32 x 1024, CPU ms with 2 threads, sgemm
// with per-thread partials 4.9, matmul + sum 3.2; at 64 x 64 x 256 the two tie, at 128 x 128 x 64 the primitive
// takes 4.2 against 2.2 (its batch of C x C outputs outweighs the product), hence the 16.
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

constexpr int64_t kSumChunk = 256;  // entries of C summed per task (a float accumulator block on the stack)

}  // namespace

bool CpuBackend::summed_by_primitive(const MatmulShape& s, const float* b) {
  return b != nullptr && s.batch > 1 && s.stride_c == 0 && !s.transpose_a && s.transpose_b && s.stride_a > 0 &&
         s.stride_b > 0 && s.inner >= 16 * std::max(s.rows, s.cols);
}

void CpuBackend::run_summed_by_primitive(const MatmulShape& s, float alpha, const float* a, const float* b, float beta,
                                         float* c) {
  using dnnl::memory;
  const int64_t size = s.rows * s.cols;
  // A_b rows x inner at b * stride_a; op(B_b) = B_b^T inner x cols, B_b stored cols x inner at b * stride_b.
  const memory::desc a_desc({s.batch, s.rows, s.inner}, memory::data_type::f32, {s.stride_a, s.inner, 1});
  const memory::desc b_desc({s.batch, s.inner, s.cols}, memory::data_type::f32, {s.stride_b, 1, s.inner});
  const memory::desc c_desc({s.batch, s.rows, s.cols}, memory::data_type::f32, memory::format_tag::abc);
  try {
    const std::array<int64_t, 6> key{s.batch, s.rows, s.cols, s.inner, s.stride_a, s.stride_b};
    auto found = summed_products_.find(key);
    if (found == summed_products_.end())
      found =
          summed_products_
              .emplace(key,
                       dnnl::matmul(dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_desc, b_desc, c_desc), engine_)))
              .first;
    if (summed_scratch_.size() < static_cast<size_t>(s.batch * size))
      summed_scratch_.resize(static_cast<size_t>(s.batch * size));
    memory a_mem(a_desc, engine_, const_cast<float*>(a)), b_mem(b_desc, engine_, const_cast<float*>(b));
    memory c_mem(c_desc, engine_, summed_scratch_.data());
    found->second.execute(stream_, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
    stream_.wait();
  } catch (const dnnl::error& e) {
    throw BackendError(detail::concat("oneDNN matmul failed for matmul ", s.str(), ": ", e.what()));
  }
  // C = alpha * (sum over b in order) + beta * C, a block of entries per task.
  const float* products = summed_scratch_.data();
#pragma omp parallel for schedule(static)
  for (int64_t first = 0; first < size; first += kSumChunk) {
    const int64_t count = std::min(kSumChunk, size - first);
    float sum[kSumChunk];
    for (int64_t e = 0; e < count; ++e) sum[e] = products[first + e];
    for (int64_t i = 1; i < s.batch; ++i) {
      const float* next = products + i * size + first;
      for (int64_t e = 0; e < count; ++e) sum[e] += next[e];
    }
    for (int64_t e = 0; e < count; ++e) {
      float& out = c[first + e];
      out = beta == 0.0f ? alpha * sum[e] : alpha * sum[e] + beta * out;
    }
  }
}

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
  if (summed_by_primitive(s, b)) {
    run_summed_by_primitive(s, alpha, a, b, beta, c);
  } else if (s.batch == 1) {
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
