// bf16 backward-weights at planes of at most 4 pixels where the pixel matmul (pixel_matmul.cpp, which takes GS-SOC's
// 512 / 1024 channels in 4 groups at 2x2 and its 1x1 layers) does not apply, as im2col + ONE oneDNN bf16 matmul
// batched over the groups: dW_i = dY_i^T im2col(X_i), bf16
// operands, float32 accumulation and output. oneDNN 2.6's convolution backward-weights at such planes is its
// slowest kernel in both types (its AMX one runs at reference speed at 1x1; float32 is already replaced by
// im2col + sgemm, run_gemm_backward_weights); its matmul runs AMX tiles on this problem, whose reduction axis is
// the N * H * W pixels of the stacked batch (2560 at 1024 channels 2x2).
//
// The operands are gathered from the bf16 conv inputs (to_conv_input: the conv layout with 2-byte elements), so
// no rounding happens here: the values are those oneDNN's bf16 convolution would have read.
#include <omp.h>

#include <cstdint>
#include <cstring>

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

// Dense (one group) in nhwc: a pixel's channels are contiguous, so im2col copies C values per tap, with the
// columns ordered (ky, kx, ci); dW' [C, k*k*C] then goes back to the plain [C, C, k, k] order. The stacked batch
// (K * N images, up to 640 x 256 pixels) is taken in chunks of whole images (im2col of at most kChunkBytes,
// the chunk a divisor of the batch so one primitive shape serves all), the first overwriting dW', the others
// adding to it (sum post-op). A = dY^T is the nhwc dY of the chunk read transposed (format ba).
namespace {
constexpr int64_t kChunkBytes = int64_t{24} << 20;
}  // namespace

bool CpuBackend::nhwc_gemm_backward_weights(const ConvShape& shape, int64_t block) {
  return shape.groups == 1 && block == shape.in_channels && shape.height * shape.width > 4;
}

void CpuBackend::run_bf16_nhwc_gemm_backward_weights(const ConvShape& shape, const float* src, const float* diff_dst,
                                                     float* diff_weights) {
  const int64_t n = shape.batch, c = shape.in_channels, h = shape.height, w = shape.width, k = shape.kernel;
  const int64_t plane = h * w, taps = k * k, cols = taps * c, pad = k / 2;
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(uint16_t));
  int64_t chunk = n;  // images per chunk: the largest divisor of n whose im2col fits kChunkBytes (at least 1)
  while (chunk > 1 && (n % chunk != 0 || chunk * plane * row_bytes > kChunkBytes)) --chunk;
  const int64_t rows = chunk * plane;
  const auto* x = reinterpret_cast<const uint16_t*>(src);
  const auto* dy = reinterpret_cast<const uint16_t*>(diff_dst);
  ShapeKey key{shape.batch, shape.in_channels, shape.out_channels, shape.height,
               shape.width, shape.kernel,      shape.groups,       true};
  auto it = bf16_nhwc_gemm_.find(key);
  if (it == bf16_nhwc_gemm_.end()) {
    try {
      memory::desc a({c, rows}, memory::data_type::bf16, memory::format_tag::ba);
      memory::desc b({rows, cols}, memory::data_type::bf16, memory::format_tag::ab);
      memory::desc out({c, cols}, memory::data_type::f32, memory::format_tag::ab);
      dnnl::matmul::primitive_desc first(dnnl::matmul::desc(a, b, out), engine_);
      dnnl::post_ops sum;
      sum.append_sum(1.0f);
      dnnl::primitive_attr attr;
      attr.set_post_ops(sum);
      dnnl::matmul::primitive_desc rest(dnnl::matmul::desc(a, b, out), attr, engine_);
      NhwcGemm entry{dnnl::matmul(first), dnnl::matmul(rest), a, b, out, first.impl_info_str()};
      it = bf16_nhwc_gemm_.emplace(key, std::move(entry)).first;
    } catch (const dnnl::error& e) {
      throw BackendError(detail::concat("oneDNN bf16 matmul creation failed for the backward-weights of ", shape.str(),
                                        ": ", e.what()));
    }
  }
  const NhwcGemm& gemm = it->second;
  const int64_t im2col_size = (rows * cols + 1) / 2 * 2;  // dW' after it, 4-byte aligned
  const size_t needed = static_cast<size_t>(im2col_size + c * cols * 2);
  if (bf16_gemm_scratch_.size() < needed) bf16_gemm_scratch_.resize(needed);
  uint16_t* im2col = bf16_gemm_scratch_.data();
  float* dw = reinterpret_cast<float*>(im2col + im2col_size);  // [C, (ky, kx, ci)]
  for (int64_t first = 0; first < n; first += chunk) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t image = first + r / plane, y = r % plane / w, xx = r % w;
      uint16_t* row = im2col + r * cols;
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx) {
          const int64_t sy = y + ky - pad, sx = xx + kx - pad;
          uint16_t* to = row + (ky * k + kx) * c;
          if (sy >= 0 && sy < h && sx >= 0 && sx < w)
            std::memcpy(to, x + ((image * h + sy) * w + sx) * c, static_cast<size_t>(c) * sizeof(uint16_t));
          else
            std::memset(to, 0, static_cast<size_t>(c) * sizeof(uint16_t));
        }
    }
    try {
      memory a(gemm.a, engine_, const_cast<uint16_t*>(dy + first * plane * c)), b(gemm.b, engine_, im2col),
          out(gemm.out, engine_, dw);
      (first == 0 ? gemm.first : gemm.rest)
          .execute(stream_, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, out}});
      stream_.wait();
    } catch (const dnnl::error& e) {
      throw BackendError(
          detail::concat("oneDNN bf16 matmul failed for the backward-weights of ", shape.str(), ": ", e.what()));
    }
  }
  // [co, (ky, kx, ci)] -> plain [co, ci, ky, kx]
#pragma omp parallel for schedule(static)
  for (int64_t co = 0; co < c; ++co)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t t = 0; t < taps; ++t) diff_weights[(co * c + ci) * taps + t] = dw[co * cols + t * c + ci];
}

std::string CpuBackend::bf16_gemm_implementation(const ConvShape& shape) const {
  ShapeKey key{shape.batch, shape.in_channels, shape.out_channels, shape.height,
               shape.width, shape.kernel,      shape.groups,       true};
  auto it = bf16_gemm_.find(key);
  if (it != bf16_gemm_.end()) return it->second.impl;
  auto dense = bf16_nhwc_gemm_.find(key);
  return dense == bf16_nhwc_gemm_.end() ? std::string("not run yet") : dense->second.impl;
}

}  // namespace orthoconv::cpu
