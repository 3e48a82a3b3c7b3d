// SocConv's matrix path for 1x1 layers, and the cost model that chooses it (see include/orthoconv/soc_conv.hpp).
//
// The series of a 1x1 layer is one matrix per group applied to every pixel: Horner's p_j = x0 + (A_n / j) p_{j+1}
// (j = K..1, p_{K+1} = x0) gives y = Q_1 x0 with Q_{K+1} = I, Q_j = I + (A_n / j) Q_{j+1}, i.e.
// P = Q_1 = sum_{i=0..K} A_n^i / i!, the same K terms as the series path. The matrices are C x C per group.
//
// Orientation. The weight gradient below needs the partial products transposed, so the forward forms
// T_j = Q_j^T = I + (A_n^T / j) T_{j+1} (A_n and Q_{j+1} commute) directly, with A_n^T as a transpose flag:
//   T_K = I + A_n^T / K, then T_j = I + (1/j) A_n^T T_{j+1} for j = K-1..1: one matmul each (the identity is the
//   matmul's shift), K-1 products in all; T_1 = P^T.
// Forward: P = T_1^T (a transposed copy: matmul without B), then y = P x0, one convolution.
// Backward, with h = dL/dy:
//   dL/dx0 = P^T h: the convolution by T_1 (conv_forward), one call;
//   dL/dP^T = sum over pixels x0 h^T: one backward-weights call with the roles of src and diff_dst swapped
//     (it returns sum diff_dst src^T);
//   reverse-mode Horner (exact): with H_1 = dL/dP and H_{j+1} = A_n^T H_j / (j+1), dL/dA_n = sum_{j=1..K} H_j
//     Q_{j+1}^T (Q_{K+1} = I). In the transposed variables H'_j = H_j^T: H'_1 = dL/dP^T, H'_{j+1} = H'_j A_n / (j+1),
//     and dL/dA_n = H_K + sum_{j<K} H'_j^T T_{j+1}. H_K = A_n^T H'_{K-1}^T / K is one matmul straight into
//     dL/dA_n, and the sum is ONE matmul of inner size (K-1) C: the stacks [H'_1; ..; H'_{K-1}] and
//     [T_2; ..; T_K] are contiguous per group, so their product op(A)^T B adds up all K-1 terms.
//   Then dL/dA_n goes through sigma and the skew-symmetrization as on the series path (soc_conv.cpp).
// Products: K-1 forward, 2(K-1) backward, each g C^3 multiply-adds; 1 convolution forward, 2 backward.
// Two applications of P (soc_matrix_variant): matrix_conv runs the three convolutions above on the conv layout
// (oneDNN's 1x1 convolution: the pixels of all images in one GEMM; x0 and h converted into the layout and dx0
// out of it); matrix_gemm runs them as GEMMs on the NCHW buffers, per group: y_n = P x_n and dx0_n = T_1 h_n
// (one matmul each, batched over the images n with A shared), dL/dP^T = sum_n x_n h_n^T (one matmul summed over
// the images). Per 1x1 layer and training step, counting passes over the activation (read or write of N*H*W*g*C
// floats): matrix_conv 2 (x0 into the layout) + 2 (conv) + 2 (y out of it) forward, 2 (h in) + 2 + 2 (the two
// convolutions) + 2 (dx0 out) backward = 14; matrix_gemm 2 + 2 + 2 = 6, against a floor of 5 (read x0, write y;
// read h and x0, write dx0: h is read twice). But P (C x C) is read once per image and group there, and the
// GEMMs are small: soc_matrix_variant takes matrix_gemm where C <= 4 H W. Measured (one 1x1 SocConv, batch 128,
// 2 threads, CPU ms per training step, conv / gemm): 32ch 32x32 25.3 / 19.8, 64ch 16x16 21.8 / 11.4, 128ch 8x8
// 13.7 / 10.6, 256ch 8x8 42.3 / 40.0 (C = 4 H W), 128ch 4x4 4.1 / 3.5 (but evaluation 1.5 / 1.9), 256ch 4x4
// 14.1 / 15.3, 512ch 4x4 67.4 / 73.3, 512ch 2x2 44.7 / 69.0.
//
// The cost model (soc_path_cost) counts what differs between the paths, with u = N*H*W*g*C^2 the multiply-adds
// of one convolution, a = N*H*W*g*C the floats of one activation buffer and m = g*C^2 those of one filter:
//   series forward   K u MACs; K (3a + m) floats: each term reads its input, the added x0 and its filter,
//                    and writes its output (one fused convolution).
//   series backward  2K u MACs; K (2a + m) for the K transposed convolutions, (K+2) a for the weighted sum of
//                    the terms, 2K a + m for the backward-weights call over the K stored terms.
//   matrix forward   (K-1) g C^3 + u MACs; 2m for T_K, 3m per Horner product (A, T_{j+1}, T_j), 2m for the
//                    transposed copy P, 2m for the filter reorder, 2a + m for the convolution: (3K + 4) m + 2a.
//   matrix backward  2(K-1) g C^3 + 2u MACs; 2m reorder, 2 (2a + m) for the convolution and backward-weights,
//                    (2m copying dL/dP^T into the stack when g > 1), 3m per product of the H' chain and H_K
//                    (K-1 of them), 2Km for the stacked product: 4a + (5K + 1) m.
// In multiply-adds the matrix path is cheaper exactly when C < N*H*W (forward and training alike: the K-1 saved
// convolutions cost C/(N*H*W) as much as products). At N*H*W = C they tie and the bytes decide: the series path
// streams the activations three times per term, so the matrix path is chosen there and down to
//   evaluation (K = 12): N*H*W = 0.88 C at C = 32, 0.94 C at 128, 0.98 C at 512, 0.99 C at 1024;
//   training (K = 5):    N*H*W = 0.95 C at C = 32, 0.98 C at 128, 0.99 C at 512 and above.
// LipConvnet-15 at batch 128: the GS-SOC second stage at widths 32 to 512 (N*H*W / C = 4096 down to 1) takes the
// matrix path; the 2048-channel stride-2 layer (C = 512 per group, or 1024 in its second stage, N*H*W = 128) and
// the head (C = 1024) take the series path. Measured (docs/performance.md): at N*H*W = C (512 channels, 2 x 2)
// the two paths run within a few percent of each other, as the model says.
#include <string>

#include "orthoconv/soc_conv.hpp"

namespace orthoconv {

SocPath parse_soc_path(const std::string& text) {
  for (SocPath path :
       {SocPath::automatic, SocPath::series, SocPath::matrix, SocPath::matrix_conv, SocPath::matrix_gemm})
    if (text == soc_path_name(path)) return path;
  throw ConfigError("SocConv path must be 'auto', 'series', 'matrix', 'matrix-conv' or 'matrix-gemm', got '" + text +
                    "'");
}

std::string soc_path_name(SocPath path) {
  switch (path) {
    case SocPath::automatic:
      return "auto";
    case SocPath::series:
      return "series";
    case SocPath::matrix:
      return "matrix";
    case SocPath::matrix_conv:
      return "matrix-conv";
    case SocPath::matrix_gemm:
      return "matrix-gemm";
  }
  return "?";
}

bool is_matrix_path(SocPath path) {
  return path == SocPath::matrix || path == SocPath::matrix_conv || path == SocPath::matrix_gemm;
}

SocPath soc_matrix_variant(int64_t channels, int64_t plane) {
  return 4 * plane >= channels ? SocPath::matrix_gemm : SocPath::matrix_conv;
}

SocPathCost soc_path_cost(int64_t groups, int64_t channels, int64_t pixels, int terms, bool training) {
  require(groups > 0 && channels > 0 && pixels > 0 && terms > 0,
          "soc_path_cost: sizes and terms must be "
          "positive, got groups ",
          groups, ", channels ", channels, ", pixels ", pixels, ", terms ", terms);
  const double g = static_cast<double>(groups), c = static_cast<double>(channels), k = terms;
  const double conv = static_cast<double>(pixels) * g * c * c;  // u
  const double act = static_cast<double>(pixels) * g * c;       // a
  const double filter = g * c * c;                              // m
  const double product = g * c * c * c;
  SocPathCost cost;
  cost.series_macs = k * conv;
  cost.series_bytes = k * (3.0 * act + filter);
  cost.matrix_macs = (k - 1.0) * product + conv;
  cost.matrix_bytes = (3.0 * k + 4.0) * filter + 2.0 * act;
  if (training) {
    cost.series_macs += 2.0 * k * conv;
    cost.series_bytes += (5.0 * k + 2.0) * act + (k + 1.0) * filter;
    cost.matrix_macs += 2.0 * (k - 1.0) * product + 2.0 * conv;
    cost.matrix_bytes += 4.0 * act + (5.0 * k + 1.0 + (groups > 1 ? 2.0 : 0.0)) * filter;
  }
  cost.series_bytes *= sizeof(float);
  cost.matrix_bytes *= sizeof(float);
  return cost;
}

void SocConv::set_path(SocPath path) {
  SocConfig changed = config_;
  changed.path = path;
  changed.validate();
  config_.path = path;
}

SocPath SocConv::path_for(const Shape& input) const {
  const Shape out = output_shape(input);
  if (config_.kernel != 1) return SocPath::series;
  const SocPath path = config_.path != SocPath::automatic ? config_.path
                                                          : soc_path_cost(config_.groups, config_.group_channels(),
                                                                          out[0] * out[2] * out[3], terms(), training_)
                                                                .cheaper();
  return path == SocPath::matrix ? soc_matrix_variant(config_.group_channels(), out[2] * out[3]) : path;
}

void SocConv::apply_nchw(const ConvShape& shape, const float* p, const float* x, float* y) {
  const int64_t g = config_.groups, c = config_.group_channels(), plane = shape.height * shape.width;
  MatmulShape s;
  s.batch = shape.batch;
  s.rows = s.inner = c;
  s.cols = plane;
  s.stride_b = s.stride_c = g * c * plane;  // image n of group i: c x plane at n * g c plane + i c plane
  for (int64_t i = 0; i < g; ++i)
    backend_->matmul(s, 1.0f, p + i * c * c, x + i * c * plane, 0.0f, 0.0f, y + i * c * plane);
}

void SocConv::matrix_forward(const ConvShape& shape, const float* x0, float* y) {
  const int K = forward_terms_;
  const int64_t g = config_.groups, c = config_.group_channels(), cc = c * c;
  Backend& be = *backend_;
  // T_2..T_K stay for the backward (in evaluation mode too: attacks differentiate the evaluated model).
  const int64_t slots = K - 1;
  if (slots > 0) horner_.resize(Shape{g, slots, c, c}, backend_->device());
  transposed_.resize(Shape{g, c, c}, backend_->device());
  series_matrix_.resize(Shape{g, c, c}, backend_->device());
  auto target = [&](int j) { return j == 1 ? transposed_.data() : horner_.data() + (j - 2) * cc; };

  MatmulShape s;
  s.batch = g;
  s.rows = s.cols = s.inner = c;
  s.transpose_a = true;  // A_n^T
  s.stride_a = cc;
  s.stride_b = slots * cc;
  for (int j = K; j >= 1; --j) {
    s.stride_c = j == 1 ? cc : slots * cc;
    be.matmul(s, 1.0f / static_cast<float>(j), scaled_.data(), j == K ? nullptr : target(j + 1), 0.0f, 1.0f, target(j));
  }

  // P = T_1^T, then y = P x0.
  s.stride_a = s.stride_c = cc;
  be.matmul(s, 1.0f, transposed_.data(), nullptr, 0.0f, 0.0f, series_matrix_.data());
  if (forward_path_ == SocPath::matrix_gemm) {
    if (y != nullptr) apply_nchw(shape, series_matrix_.data(), x0, y);
    return;
  }
  const int64_t wsize = be.conv_weights_size(shape, ConvPass::forward);
  matrix_weights_.resize(Shape{2 * wsize}, backend_->device());
  if (y == nullptr) return;
  be.weights_to_conv_layout(shape, ConvPass::forward, series_matrix_.data(), matrix_weights_.data());
  be.conv_forward(shape, x0, matrix_weights_.data(), y, false);
}

void SocConv::matrix_backward(const ConvShape& shape, const float* h, float* dx0, bool weight_gradient) {
  const int K = forward_terms_;
  const int64_t g = config_.groups, c = config_.group_channels(), cc = c * c;
  Backend& be = *backend_;
  const float* a = scaled_.data();
  const bool gemm = forward_path_ == SocPath::matrix_gemm;

  // dL/dx0 = P^T h: the product by T_1.
  if (gemm) {
    apply_nchw(shape, transposed_.data(), h, dx0);
  } else {
    float* transposed_weights = matrix_weights_.data() + be.conv_weights_size(shape, ConvPass::forward);
    be.weights_to_conv_layout(shape, ConvPass::forward, transposed_.data(), transposed_weights);
    be.conv_forward(shape, h, transposed_weights, dx0, false);
  }
  if (!weight_gradient) return;

  // H'_1 = dL/dP^T = sum x0 h^T into slot 0 of each group's stack: on NCHW one GEMM per group summed over the
  // images; in the conv layout backward-weights with src = h, diff_dst = x0 (written in place when there is one
  // group, else through diff_weights_).
  const float* x0 = kept_x0();
  const int64_t slots = std::max(K - 1, 1);
  adjoint_.resize(Shape{g, slots, c, c}, backend_->device());
  if (gemm) {
    const int64_t plane = shape.height * shape.width;
    MatmulShape sum;
    sum.batch = shape.batch;
    sum.rows = sum.cols = c;
    sum.inner = plane;
    sum.transpose_b = true;
    sum.stride_a = sum.stride_b = g * c * plane;
    for (int64_t i = 0; i < g; ++i)
      be.matmul(sum, 1.0f, x0 + i * c * plane, h + i * c * plane, 0.0f, 0.0f, adjoint_.data() + i * slots * cc);
  } else if (g == 1) {
    be.conv_backward_weights(shape, h, x0, adjoint_.data());
  } else {
    be.conv_backward_weights(shape, h, x0, diff_weights_.data());
    for (int64_t i = 0; i < g; ++i) be.copy(diff_weights_.data() + i * cc, adjoint_.data() + i * slots * cc, cc);
  }
  auto adjoint = [&](int j) { return adjoint_.data() + (j - 1) * cc; };

  MatmulShape s;
  s.batch = g;
  s.rows = s.cols = s.inner = c;
  if (K == 1) {  // P = I + A_n: dL/dA_n = dL/dP = H'_1^T
    s.transpose_a = true;
    s.stride_a = slots * cc;
    s.stride_c = cc;
    be.matmul(s, 1.0f, adjoint(1), nullptr, 0.0f, 0.0f, diff_weights_.data());
    return;
  }
  // H'_{j+1} = H'_j A_n / (j+1) for j = 1..K-2.
  s.stride_a = s.stride_c = slots * cc;
  s.stride_b = cc;
  for (int j = 1; j + 1 < K; ++j)
    be.matmul(s, 1.0f / static_cast<float>(j + 1), adjoint(j), a, 0.0f, 0.0f, adjoint(j + 1));
  // dL/dA_n = H_K = A_n^T H'_{K-1}^T / K ...
  s.transpose_a = s.transpose_b = true;
  s.stride_a = cc;
  s.stride_b = slots * cc;
  s.stride_c = cc;
  be.matmul(s, 1.0f / static_cast<float>(K), a, adjoint(K - 1), 0.0f, 0.0f, diff_weights_.data());
  // ... + sum_{j<K} H'_j^T T_{j+1}: the stacked product, inner size (K-1) C.
  s.inner = (K - 1) * c;
  s.transpose_a = true;
  s.transpose_b = false;
  s.stride_a = s.stride_b = slots * cc;
  be.matmul(s, 1.0f, adjoint(1), horner_.data(), 1.0f, 0.0f, diff_weights_.data());
}

}  // namespace orthoconv
