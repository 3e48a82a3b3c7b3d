// Batched small matrix products on the GPU (Backend::matmul): one cublasSgemmStridedBatched call (a summed batch:
// one call per matrix, accumulating), then the shift on the diagonals; the products without B (B = I) are one
// elementwise kernel. The twin of backend/cpu/matmul.cpp.
//
// cuBLAS is column-major: a row-major matrix is its transpose there, so the row-major C = op(A) op(B) is the
// column-major C^T = op(B)^T op(A)^T: the call swaps A and B (and rows and cols) and keeps the transpose flags.
#include <climits>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernel_utils.cuh"

namespace orthoconv::cuda {

namespace {

// C_b = alpha op(A_b) + beta C_b over all batch * rows * cols entries (beta == 0 never reads C).
__global__ void scaled_copy_kernel(const float* a, bool transpose_a, int64_t stride_a, float alpha, float beta,
                                   float* c, int64_t stride_c, int64_t rows, int64_t cols, int64_t batch) {
  const int64_t count = batch * rows * cols;
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) {
    const int64_t q = index % cols, r = (index / cols) % rows, b = index / (rows * cols);
    const float* ab = a + b * stride_a;
    const float value = alpha * (transpose_a ? ab[q * rows + r] : ab[r * cols + q]);
    float& out = c[b * stride_c + r * cols + q];
    out = beta == 0.0f ? value : value + beta * out;
  }
}

__global__ void shift_diagonal_kernel(float* c, int64_t stride_c, int64_t n, int64_t batch, float shift) {
  ORTHOCONV_GRID_STRIDE_LOOP(index, batch * n) {
    const int64_t r = index % n, b = index / n;
    c[b * stride_c + r * n + r] += shift;
  }
}

int as_int(int64_t value, const MatmulShape& s) {
  require<ShapeError>(value <= INT_MAX, "matmul ", s.str(), ": ", value, " exceeds cuBLAS's int range");
  return static_cast<int>(value);
}

}  // namespace

void CudaBackend::matmul(const MatmulShape& s, float alpha, const float* a, const float* b, float beta, float shift,
                         float* c) {
  s.validate();
  require(b != nullptr || s.inner == s.cols, "matmul without B needs inner == cols (B = I), got ", s.str());
  require(shift == 0.0f || s.rows == s.cols, "matmul with a shift needs square C, got ", s.str());
  expect_device("matmul", a, b, c);
  // A summed batch (stride_c == 0) runs as one product per matrix, each adding into C after the first.
  const bool summed = s.batch > 1 && s.stride_c == 0;
  const int64_t calls = summed ? s.batch : 1, batch = summed ? 1 : s.batch;
  for (int64_t i = 0; i < calls; ++i) {
    const float beta_i = i == 0 ? beta : 1.0f;
    const float* a_i = a + i * s.stride_a;
    if (b != nullptr) {
      const int lda = as_int(s.transpose_a ? s.rows : s.inner, s), ldb = as_int(s.transpose_b ? s.inner : s.cols, s);
      ORTHOCONV_CUBLAS_CHECK(cublasSgemmStridedBatched(
          cublas_, s.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N, s.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N,
          as_int(s.cols, s), as_int(s.rows, s), as_int(s.inner, s), &alpha, b + i * s.stride_b, ldb, s.stride_b, a_i,
          lda, s.stride_a, &beta_i, c, as_int(s.cols, s), s.stride_c, as_int(batch, s)));
    } else {
      scaled_copy_kernel<<<grid_for(batch * s.rows * s.cols), kThreads, 0, stream()>>>(
          a_i, s.transpose_a, s.stride_a, alpha, beta_i, c, s.stride_c, s.rows, s.cols, batch);
      ORTHOCONV_CUDA_LAUNCHED("scaled_copy_kernel");
    }
  }
  if (shift != 0.0f) {
    shift_diagonal_kernel<<<grid_for(batch * s.rows), kThreads, 0, stream()>>>(c, s.stride_c, s.rows, batch, shift);
    ORTHOCONV_CUDA_LAUNCHED("shift_diagonal_kernel");
  }
}

}  // namespace orthoconv::cuda
