// Batched small matrix products on the CPU (Backend::matmul): oneDNN's sgemm (row-major, JIT-compiled, threaded
// by oneDNN itself) once per matrix of the batch, then the shift on the diagonal. The products without B (B = I)
// and the shift are plain loops: they touch rows * cols and rows floats.
// SocConv's matrix path calls this with batch = groups (1 to 4 in LipConvnet) and C x C matrices, C = 32..2048.
#include <string>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

void CpuBackend::matmul(const MatmulShape& s, float alpha, const float* a, const float* b, float beta, float shift,
                        float* c) {
  s.validate();
  require(b != nullptr || s.inner == s.cols, "matmul without B needs inner == cols (B = I), got ", s.str());
  require(shift == 0.0f || s.rows == s.cols, "matmul with a shift needs square C, got ", s.str());
  const int64_t lda = s.transpose_a ? s.rows : s.inner, ldb = s.transpose_b ? s.inner : s.cols;
  for (int64_t i = 0; i < s.batch; ++i) {
    const float* ai = a + i * s.stride_a;
    float* ci = c + i * s.stride_c;
    if (b != nullptr) {
      const dnnl::status status = dnnl::sgemm(s.transpose_a ? 'T' : 'N', s.transpose_b ? 'T' : 'N', s.rows, s.cols,
                                              s.inner, alpha, ai, lda, b + i * s.stride_b, ldb, beta, ci, s.cols);
      require<BackendError>(status == dnnl::status::success, "oneDNN sgemm failed (status ",
                            static_cast<int>(status), ") for matmul ", s.str());
    } else {
      for (int64_t r = 0; r < s.rows; ++r)
        for (int64_t q = 0; q < s.cols; ++q) {
          const float value = alpha * (s.transpose_a ? ai[q * lda + r] : ai[r * lda + q]);
          float& out = ci[r * s.cols + q];
          out = beta == 0.0f ? value : value + beta * out;
        }
    }
    if (shift != 0.0f)
      for (int64_t r = 0; r < s.rows; ++r) ci[r * s.cols + r] += shift;
  }
}

}  // namespace orthoconv::cpu
