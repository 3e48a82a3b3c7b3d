// orthoconv/jacobian.hpp: the public orthogonality checker ("is this layer really 1-Lipschitz?").
//
// layer_jacobian builds the full Jacobian of an affine layer (SocConv, GsSocConv, ChannelShuffle, ...) on one
// input of shape [1, C, H, W] from impulse responses, J e_i = f(e_i) - f(0), in batches. It is exact for
// affine layers; for piecewise-linear ones (MaxMin) it is meaningless. The singular values are computed in
// double precision (Eigen's divide-and-conquer SVD), so what they show is the float32 layer itself.
// Cost: in = C*H*W forward passes' worth of work and an in x out dense matrix: keep C*H*W in the low thousands.
#pragma once

#include <vector>

#include "orthoconv/layer.hpp"

namespace orthoconv {

struct DenseMatrix {
  int64_t rows = 0, cols = 0;
  std::vector<double> values;  // row-major
  double operator()(int64_t r, int64_t c) const { return values[static_cast<size_t>(r * cols + c)]; }
};

// Rows: outputs (NCHW order), columns: inputs. The layer's mode (training/evaluation) is used as it is set.
DenseMatrix layer_jacobian(Layer& layer, const Shape& input_shape, int64_t impulses_per_batch = 64);

// Singular values, largest first.
std::vector<double> singular_values(const DenseMatrix& matrix);

// The matrix of the zero-padded "same" convolution by a plain filter [g, C, C, k, k] on a [g*C, H, W] input,
// in double precision (for skew-symmetry checks and references).
DenseMatrix conv_operator_matrix(const std::vector<float>& filter, int64_t groups, int64_t channels, int64_t kernel,
                                 int64_t height, int64_t width);

// max |(T + T^T)_{ij}| / max |T_{ij}|: zero for an exactly skew-symmetric operator.
double skew_residual(const DenseMatrix& op);

}  // namespace orthoconv
