#include "orthoconv/jacobian.hpp"

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>

namespace orthoconv {

DenseMatrix layer_jacobian(Layer& layer, const Shape& input_shape, int64_t impulses_per_batch) {
  require<ShapeError>(input_shape.rank() == 4 && input_shape[0] == 1,
                      "layer_jacobian needs an input shape [1, C, H, W], got ", input_shape.str());
  require(impulses_per_batch > 0, "layer_jacobian impulses_per_batch must be positive, got ", impulses_per_batch);
  const Shape out_shape = layer.output_shape(input_shape);
  const int64_t in = input_shape.numel(), out = out_shape.numel();
  DenseMatrix jac{out, in, std::vector<double>(static_cast<size_t>(in * out))};
  auto backend = cpu_backend();

  Tensor zero(input_shape), base;
  layer.forward(zero, base);
  std::vector<float> base_host = base.to_vector();

  Tensor batch_in, batch_out;
  for (int64_t first = 0; first < in; first += impulses_per_batch) {
    const int64_t count = std::min(impulses_per_batch, in - first);
    batch_in.resize(Shape{count, input_shape[1], input_shape[2], input_shape[3]});
    backend->fill(batch_in.data(), batch_in.numel(), 0.0f);
    for (int64_t b = 0; b < count; ++b) batch_in.data()[b * in + first + b] = 1.0f;
    layer.forward(batch_in, batch_out);
    std::vector<float> host = batch_out.to_vector();
    for (int64_t b = 0; b < count; ++b)
      for (int64_t r = 0; r < out; ++r)
        jac.values[static_cast<size_t>(r * in + first + b)] =
            static_cast<double>(host[static_cast<size_t>(b * out + r)]) - base_host[static_cast<size_t>(r)];
  }
  return jac;
}

std::vector<double> singular_values(const DenseMatrix& matrix) {
  Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> m(matrix.values.data(),
                                                                                             matrix.rows, matrix.cols);
  Eigen::BDCSVD<Eigen::MatrixXd> svd(m);
  const auto& s = svd.singularValues();
  std::vector<double> out(s.data(), s.data() + s.size());
  std::sort(out.rbegin(), out.rend());
  return out;
}

DenseMatrix conv_operator_matrix(const std::vector<float>& filter, int64_t groups, int64_t channels, int64_t kernel,
                                 int64_t height, int64_t width) {
  const int64_t c = channels, k = kernel, total = groups * c * height * width;
  require<ShapeError>(static_cast<int64_t>(filter.size()) == groups * c * c * k * k,
                      "conv_operator_matrix: filter has ", filter.size(), " values, expected ", groups * c * c * k * k);
  DenseMatrix op{total, total, std::vector<double>(static_cast<size_t>(total * total))};
  const int64_t pad = k / 2;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t o = 0; o < c; ++o)
      for (int64_t i = 0; i < c; ++i)
        for (int64_t y = 0; y < height; ++y)
          for (int64_t x = 0; x < width; ++x)
            for (int64_t ky = 0; ky < k; ++ky)
              for (int64_t kx = 0; kx < k; ++kx) {
                int64_t sy = y + ky - pad, sx = x + kx - pad;
                if (sy < 0 || sy >= height || sx < 0 || sx >= width) continue;
                int64_t row = ((g * c + o) * height + y) * width + x;
                int64_t col = ((g * c + i) * height + sy) * width + sx;
                op.values[static_cast<size_t>(row * total + col)] +=
                    filter[static_cast<size_t>((((g * c + o) * c + i) * k + ky) * k + kx)];
              }
  return op;
}

double skew_residual(const DenseMatrix& op) {
  require<ShapeError>(op.rows == op.cols, "skew_residual needs a square operator, got ", op.rows, "x", op.cols);
  double worst = 0.0, scale = 0.0;
  for (int64_t r = 0; r < op.rows; ++r)
    for (int64_t c = 0; c < op.cols; ++c) {
      worst = std::max(worst, std::abs(op(r, c) + op(c, r)));
      scale = std::max(scale, std::abs(op(r, c)));
    }
  return scale > 0.0 ? worst / scale : 0.0;
}

}  // namespace orthoconv
