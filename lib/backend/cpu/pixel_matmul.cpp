// Convolutions on planes of at most 4 pixels whose kernel reaches every pixel from every pixel (GS-SOC's 512 /
// 1024 channels in 4 groups at 2x2 with k = 3, its 1x1 layers at 1x1) as one matmul per group: there each output
// pixel is a dense function of every input pixel of its group, so
//   Y_i[n, (co, p)] = sum over (ci, q) of X_i[n, (ci, q)] * W_i[co, ci, q - p + k/2]
// is a [N, cg * P] x [cg * P, cg * P] product per group i, whose right factor (the "pixel matrix") holds each
// tap of the filter once per (p, q) pair that uses it. A convolution kernel does the same multiply-adds plus
// those of the zero padding: at 2x2 with k = 3, 9 taps per pixel pair where 4 are real, so the matmul does 2.25x
// fewer; at 1x1 it is the one centre tap. oneDNN 2.6's convolution kernels are also at their slowest at such
// planes. Standalone oneDNN timings, 1024 channels in 4 groups at 2x2, 128 images, the forward with alpha and the
// x0 addend, best of 7, CPU ms: convolution float32 9.8, bf16 9.3 (nChw16c); matmul float32 7.5 (jit gemm on the
// conv layout in place, scale and sum post-ops), bf16 0.8 (AMX brgemm, rows gathered contiguous per group, then
// the addend pass). Backward-weights: the pixel matrix's gradient per group, folded into the taps. Each output is
// a sum of cg * P <= cg * k * k exact-input products (the convolution's, without the zero taps), so the float32
// rounding bound of a Horner step (network_bound.hpp, gamma_{n+1} with n = C k^2) covers it unchanged.
//
// The conv layout keeps a group's values contiguous within an image where the group's channels are whole
// channel blocks (or the plane is one pixel): element (ci, q) of group i sits at offset
// i * cg * P + (ci / B) * P * B + q * B + ci % B of the image, with B the layout's channels per block. The pixel
// matrix's rows and columns use that same order, so the activations are read and written in the conv layout.
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

using dnnl::memory;

namespace {

constexpr int64_t kParallelPixelFloats = int64_t{1} << 16;

int64_t pixel_offset(int64_t channel, int64_t pixel, int64_t plane, int64_t block) {
  return (channel / block) * plane * block + pixel * block + channel % block;
}

// bf16 conv-layout values -> [groups, rows, size]: group i's `size` contiguous values of each of the `rows` images
// (`image` values apart), so that each group's operand is one contiguous matrix.
void gather_group_rows(const uint16_t* src, int64_t groups, int64_t rows, int64_t size, int64_t image, uint16_t* dst) {
#pragma omp parallel for collapse(2) schedule(static) if (groups * rows * size > kParallelPixelFloats)
  for (int64_t i = 0; i < groups; ++i)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dst + (i * rows + r) * size, src + r * image + i * size,
                  static_cast<size_t>(size) * sizeof(uint16_t));
}

}  // namespace

bool CpuBackend::pixel_matmul_applies(const ConvShape& shape, int64_t block) {
  const int64_t plane = shape.height * shape.width, cg = shape.in_channels / shape.groups;
  if (shape.in_channels != shape.out_channels || plane > 4) return false;
  // Every pixel reaches every pixel: |q - p| <= k / 2 along both axes.
  if (shape.kernel / 2 < std::max(shape.height, shape.width) - 1) return false;
  // A group's values contiguous in an image, and no padded channels in the layout.
  if (shape.in_channels % block != 0) return false;
  return plane == 1 || cg % block == 0;
}

std::unique_ptr<CpuBackend::PixelMatmul> CpuBackend::make_pixel_matmul(const ConvShape& shape, int64_t block,
                                                                       memory::data_type type) {
  auto pm = std::make_unique<PixelMatmul>();
  const int64_t plane = shape.height * shape.width;
  pm->type = type;
  pm->block = block;
  pm->row_block = plane == 1 ? shape.in_channels / shape.groups : block;  // one pixel: the channels in order
  pm->groups = shape.groups;
  pm->rows = shape.batch;
  pm->size = shape.in_channels / shape.groups * plane;
  pm->image = shape.in_channels * plane;
  const int64_t g = pm->groups, n = pm->rows, s = pm->size;
  memory::desc weights({g, s, s}, type, memory::format_tag::any);
  if (type == memory::data_type::bf16) {
    // bf16: oneDNN's AMX matmul wants contiguous operands: each group's rows are gathered first.
    pm->a = memory::desc({g, n, s}, type, memory::format_tag::abc);
    pm->c = memory::desc({g, n, s}, memory::data_type::f32, memory::format_tag::abc);
  } else {
    // float32: the conv layout in place (row stride: one image), dst scaled and summed onto the addend.
    pm->a = memory::desc({g, n, s}, type, memory::dims{s, pm->image, 1});
    pm->c = memory::desc({g, n, s}, type, memory::dims{s, pm->image, 1});
  }
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(pm->a, weights, pm->c), engine_);
  pm->weights = pd.weights_desc();
  // At one pixel the matrix is the filter's centre taps, [co, ci] per group: written in that order (format acb).
  // Allocated at the first pixel_weights (the stacked batch's kernels never need it).
  pm->plain_desc =
      memory::desc({g, s, s}, memory::data_type::f32, plane == 1 ? memory::format_tag::acb : memory::format_tag::abc);
  pm->reorder = dnnl::reorder(dnnl::reorder::primitive_desc(engine_, pm->plain_desc, engine_, pm->weights));
  pm->primitive = dnnl::matmul(pd);
  pm->impl = pd.impl_info_str();
  return pm;
}

dnnl::matmul& CpuBackend::pixel_scaled(PixelMatmul& pm, float alpha, bool sum) {
  auto key = std::make_pair(alpha, sum);
  auto it = pm.scaled.find(key);
  if (it != pm.scaled.end()) return it->second;
  dnnl::primitive_attr attr;
  if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
  if (sum) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(pm.a, pm.weights, pm.c), attr, engine_);
  return pm.scaled.emplace(key, dnnl::matmul(pd)).first->second;
}

void CpuBackend::pixel_weights(const ConvShape& shape, PixelMatmul& pm, const float* plain, float* dst) {
  // Row (ci, q), column (co, p) of group i: W_i[co, ci, qy - py + k/2, qx - px + k/2].
  const int64_t k = shape.kernel, pad = k / 2, plane = shape.height * shape.width, taps = k * k;
  const int64_t cg = shape.in_channels / shape.groups, s = pm.size;
  if (!pm.plain) pm.plain = memory(pm.plain_desc, engine_);
  auto* matrix = static_cast<float*>(pm.plain.get_data_handle());
  if (plane == 1) {  // W_i[co, ci, centre] at [i, co, ci] (the plain matrix is acb here): no transpose
    const int64_t centre = pad * k + pad;
#pragma omp parallel for schedule(static) if (pm.groups * s * s > kParallelPixelFloats)
    for (int64_t row = 0; row < pm.groups * cg; ++row)
      for (int64_t ci = 0; ci < cg; ++ci) matrix[row * cg + ci] = plain[(row * cg + ci) * taps + centre];
  } else {
    pixel_matrix_rows(shape, pm, plain, matrix);
  }
  dnnl_checked("pixel-matmul weights reorder", shape, [&] {
    memory out(pm.weights, engine_, dst);
    pm.reorder.execute(stream_, pm.plain, out);
    stream_.wait();
  });
}

// More than one pixel: the filter is first transposed to [i, ci, tap, co], so that each (row, p) takes runs of
// `block` contiguous output channels.
void CpuBackend::pixel_matrix_rows(const ConvShape& shape, const PixelMatmul& pm, const float* plain, float* matrix) {
  const int64_t h = shape.height, w = shape.width, k = shape.kernel, pad = k / 2, plane = h * w;
  const int64_t cg = shape.in_channels / shape.groups, s = pm.size, taps = k * k, block = pm.row_block;
  const size_t filter = static_cast<size_t>(pm.groups * cg * cg * taps);
  if (pixel_scratch_.size() < filter) pixel_scratch_.resize(filter);
  float* transposed = pixel_scratch_.data();
#pragma omp parallel for collapse(2) schedule(static) if (static_cast <int64_t>(filter) > kParallelPixelFloats)
  for (int64_t i = 0; i < pm.groups; ++i)
    for (int64_t ci = 0; ci < cg; ++ci)
      for (int64_t co = 0; co < cg; ++co)
        for (int64_t t = 0; t < taps; ++t)
          transposed[((i * cg + ci) * taps + t) * cg + co] = plain[((i * cg + co) * cg + ci) * taps + t];
#pragma omp parallel for collapse(3) schedule(static) if (pm.groups * s * s > kParallelPixelFloats)
  for (int64_t i = 0; i < pm.groups; ++i)
    for (int64_t ci = 0; ci < cg; ++ci)
      for (int64_t q = 0; q < plane; ++q) {
        float* row = matrix + (i * s + pixel_offset(ci, q, plane, block)) * s;
        for (int64_t p = 0; p < plane; ++p) {
          const int64_t tap = (q / w - p / w + pad) * k + (q % w - p % w + pad);
          const float* from = transposed + ((i * cg + ci) * taps + tap) * cg;
          for (int64_t b = 0; b < cg; b += block)
            std::memcpy(row + pixel_offset(b, p, plane, block), from + b, static_cast<size_t>(block) * sizeof(float));
        }
      }
}

void CpuBackend::run_pixel_matmul(const ConvShape& shape, PixelMatmul& pm, const float* src, const float* weights,
                                  float alpha, const float* addend, float* dst, bool rounded) {
  const int64_t g = pm.groups, n = pm.rows, s = pm.size, image = pm.image;
  if (pm.type == memory::data_type::f32) {
    // dst = alpha * X W (+ dst, holding the addend)
    if (addend != nullptr && addend != dst) copy(addend, dst, n * image);
    dnnl::matmul& mm = pixel_scaled(pm, alpha, addend != nullptr);
    dnnl_checked("pixel-matmul forward", shape, [&] {
      memory a(pm.a, engine_, const_cast<float*>(src)), b(pm.weights, engine_, const_cast<float*>(weights)),
          c(pm.c, engine_, dst);
      mm.execute(stream_, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
      stream_.wait();
    });
    return;
  }
  // bf16: gather [g, n, s], one batched matmul into [g, n, s] float32, then dst = addend + alpha * that.
  const size_t gathered = static_cast<size_t>((g * n * s + 1) / 2), product = static_cast<size_t>(g * n * s);
  if (pixel_scratch_.size() < gathered + product) pixel_scratch_.resize(gathered + product);
  auto* rows = reinterpret_cast<uint16_t*>(pixel_scratch_.data());
  float* out = pixel_scratch_.data() + gathered;
  gather_group_rows(reinterpret_cast<const uint16_t*>(src), g, n, s, image, rows);
  const bool parallel = g * n * s > kParallelPixelFloats;
  dnnl_checked("pixel-matmul forward", shape, [&] {
    memory a(pm.a, engine_, rows), b(pm.weights, engine_, const_cast<float*>(weights)), c(pm.c, engine_, out);
    pm.primitive.execute(stream_, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    stream_.wait();
  });
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < g; ++i) {
      float* from = out + (i * n + r) * s;
      if (addend != nullptr) {
        const float* add = addend + r * image + i * s;
        for (int64_t j = 0; j < s; ++j) from[j] = add[j] + alpha * from[j];
      } else {
        for (int64_t j = 0; j < s; ++j) from[j] = alpha * from[j];
      }
      if (rounded)
        round_to_bf16(from, reinterpret_cast<uint16_t*>(dst) + r * image + i * s, s);
      else
        std::memcpy(dst + r * image + i * s, from, static_cast<size_t>(s) * sizeof(float));
    }
}

void CpuBackend::run_pixel_backward_weights(const ConvShape& shape, std::string& impl, PixelMatmul& pm,
                                            const float* src, const float* diff_dst, float* diff_weights) {
  // The pixel matrix's gradient per group, transposed: G_i = dY_i^T X_i ([cg P, cg P], rows (co, p), columns
  // (ci, q), summed over the batch); then each tap's gradient is the sum of G_i over the (p, q) pairs using it.
  const int64_t g = pm.groups, n = pm.rows, s = pm.size, image = pm.image;
  const size_t matrices = static_cast<size_t>(g * s * s);
  if (pm.type == dnnl::memory::data_type::f32) {
    if (pixel_scratch_.size() < matrices) pixel_scratch_.resize(matrices);
    for (int64_t i = 0; i < g; ++i) {
      const dnnl::status status = dnnl::sgemm('T', 'N', s, s, n, 1.0f, diff_dst + i * s, image, src + i * s, image,
                                              0.0f, pixel_scratch_.data() + i * s * s, s);
      require<BackendError>(status == dnnl::status::success, "oneDNN sgemm failed (status ", static_cast<int>(status),
                            ") for the pixel-matmul backward-weights of ", shape.str());
    }
  } else {
    // bf16: both operands gathered contiguous per group, then one batched matmul (AMX) with dY_i read transposed.
    const size_t operand = static_cast<size_t>((g * n * s + 1) / 2);
    if (pixel_scratch_.size() < matrices + 2 * operand) pixel_scratch_.resize(matrices + 2 * operand);
    auto* x = reinterpret_cast<uint16_t*>(pixel_scratch_.data() + matrices);
    auto* dy = reinterpret_cast<uint16_t*>(pixel_scratch_.data() + matrices + operand);
    gather_group_rows(reinterpret_cast<const uint16_t*>(src), g, n, s, image, x);
    gather_group_rows(reinterpret_cast<const uint16_t*>(diff_dst), g, n, s, image, dy);
    dnnl_checked("pixel-matmul backward-weights", shape, [&] {
      if (!pm.backward) {
        pm.dy_t = memory::desc({g, s, n}, memory::data_type::bf16, memory::format_tag::acb);
        pm.x = memory::desc({g, n, s}, memory::data_type::bf16, memory::format_tag::abc);
        pm.gradient = memory::desc({g, s, s}, memory::data_type::f32, memory::format_tag::abc);
        dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(pm.dy_t, pm.x, pm.gradient), engine_);
        pm.backward = dnnl::matmul(pd);
        impl += detail::concat(" ", pd.impl_info_str());
      }
      memory a(pm.dy_t, engine_, dy), b(pm.x, engine_, x), c(pm.gradient, engine_, pixel_scratch_.data());
      pm.backward->execute(stream_, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
      stream_.wait();
    });
  }
  fold_pixel_gradient(shape, pm, pixel_scratch_.data(), diff_weights);
}

void CpuBackend::fold_pixel_gradient(const ConvShape& shape, const PixelMatmul& pm, const float* matrix,
                                     float* diff_weights) {
  // Output channel co of group i owns diff_weights[i, co, :, :]: its rows (co, p) of the transposed gradient add
  // runs of `block` input channels into tap (q - p + k/2) of each.
  const int64_t h = shape.height, w = shape.width, k = shape.kernel, pad = k / 2, plane = h * w;
  const int64_t cg = shape.in_channels / shape.groups, s = pm.size, taps = k * k;
  const int64_t block = pm.row_block;
#pragma omp parallel for collapse(2) schedule(static) if (pm.groups * s * s > kParallelPixelFloats)
  for (int64_t i = 0; i < pm.groups; ++i)
    for (int64_t co = 0; co < cg; ++co) {
      float* out = diff_weights + (i * cg + co) * cg * taps;
      std::fill(out, out + cg * taps, 0.0f);
      for (int64_t p = 0; p < plane; ++p) {
        const float* row = matrix + (i * s + pixel_offset(co, p, plane, block)) * s;
        for (int64_t q = 0; q < plane; ++q) {
          const int64_t tap = (q / w - p / w + pad) * k + (q % w - p % w + pad);
          for (int64_t b = 0; b < cg; b += block) {
            const float* from = row + pixel_offset(b, q, plane, block);
            for (int64_t l = 0; l < block; ++l) out[(b + l) * taps + tap] += from[l];
          }
        }
      }
    }
}

}  // namespace orthoconv::cpu
