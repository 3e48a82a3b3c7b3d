// bf16 backward-weights at planes of at most 4 pixels (GS-SOC's 512 / 1024 channels in 4 groups at 2x2, its 1x1
// layers at 1x1) as im2col + ONE oneDNN bf16 matmul batched over the groups: dW_i = dY_i^T im2col(X_i), bf16
// operands, float32 accumulation and output. oneDNN 2.6's convolution backward-weights at such planes is its
// slowest kernel in both types (its AMX one runs at reference speed at 1x1; float32 is already replaced by
// im2col + sgemm, run_gemm_backward_weights); its matmul runs AMX tiles on this problem, whose reduction axis is
// the N * H * W pixels of the stacked batch (2560 at 1024 channels 2x2).
//
// The operands are gathered from the bf16 conv inputs (to_conv_input: the conv layout with 2-byte elements), so
// no rounding happens here: the values are those oneDNN's bf16 convolution would have read.
#include <omp.h>

#include <cstdint>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

using dnnl::memory;

void CpuBackend::run_bf16_gemm_backward_weights(const ConvShape& shape, int64_t block, const float* src,
                                                const float* diff_dst, float* diff_weights) {
  // Row r = (n, y, x) of the N*H*W output pixels. Group i, channel l of cg: cols_i[r, (l, ky, kx)] =
  // X(n, i*cg + l, y + ky - k/2, x + kx - k/2) (0 outside) and dyT_i[l, r] = dY(n, i*cg + l, y, x). Conv layout:
  // element (n, c, y, x) at ((n * blocks + c / block) * H * W + y * W + x) * block + c % block.
  const int64_t n = shape.batch, c = shape.in_channels, h = shape.height, w = shape.width, k = shape.kernel;
  const int64_t plane = h * w, rows = n * plane, taps = k * k, pad = k / 2, groups = shape.groups;
  const int64_t cg = c / groups, group_cols = cg * taps, blocks = (c + block - 1) / block;
  const auto* x = reinterpret_cast<const uint16_t*>(src);
  const auto* dy = reinterpret_cast<const uint16_t*>(diff_dst);
  const size_t needed = static_cast<size_t>(groups * rows * (group_cols + cg));
  if (bf16_gemm_scratch_.size() < needed) bf16_gemm_scratch_.resize(needed);
  uint16_t* cols = bf16_gemm_scratch_.data();          // [groups, rows, group_cols]
  uint16_t* dy_t = cols + groups * rows * group_cols;  // [groups, cg, rows]
  auto at = [&](int64_t image, int64_t channel, int64_t pixel) {
    return ((image * blocks + channel / block) * plane + pixel) * block + channel % block;
  };
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t image = r / plane, y = r % plane / w, xx = r % w;
    for (int64_t ci = 0; ci < c; ++ci) {
      uint16_t* row = cols + ((ci / cg) * rows + r) * group_cols + (ci % cg) * taps;
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx) {
          const int64_t sy = y + ky - pad, sx = xx + kx - pad;
          row[ky * k + kx] = sy >= 0 && sy < h && sx >= 0 && sx < w ? x[at(image, ci, sy * w + sx)] : uint16_t{0};
        }
      dy_t[ci * rows + r] = dy[at(image, ci, r % plane)];  // ci = i * cg + l: [i, l, r]
    }
  }
  ShapeKey key{shape.batch, shape.in_channels, shape.out_channels, shape.height,
               shape.width, shape.kernel,      shape.groups,       true};
  auto it = bf16_gemm_.find(key);
  if (it == bf16_gemm_.end()) {
    try {
      memory::desc a({groups, cg, rows}, memory::data_type::bf16, memory::format_tag::abc);
      memory::desc b({groups, rows, group_cols}, memory::data_type::bf16, memory::format_tag::abc);
      memory::desc out({groups, cg, group_cols}, memory::data_type::f32, memory::format_tag::abc);
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, out), engine_);
      it = bf16_gemm_.emplace(key, Bf16Gemm{dnnl::matmul(pd), a, b, out, pd.impl_info_str()}).first;
    } catch (const dnnl::error& e) {
      throw BackendError(detail::concat("oneDNN bf16 matmul creation failed for the backward-weights of ", shape.str(),
                                        ": ", e.what()));
    }
  }
  const Bf16Gemm& gemm = it->second;
  try {
    memory a(gemm.a, engine_, dy_t), b(gemm.b, engine_, cols), out(gemm.out, engine_, diff_weights);
    gemm.primitive.execute(stream_, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, out}});
    stream_.wait();
  } catch (const dnnl::error& e) {
    throw BackendError(
        detail::concat("oneDNN bf16 matmul failed for the backward-weights of ", shape.str(), ": ", e.what()));
  }
}

std::string CpuBackend::bf16_gemm_implementation(const ConvShape& shape) const {
  ShapeKey key{shape.batch, shape.in_channels, shape.out_channels, shape.height,
               shape.width, shape.kernel,      shape.groups,       true};
  auto it = bf16_gemm_.find(key);
  return it == bf16_gemm_.end() ? std::string("not run yet") : it->second.impl;
}

}  // namespace orthoconv::cpu
