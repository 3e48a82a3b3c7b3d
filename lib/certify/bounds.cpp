#include "orthoconv/bounds.hpp"

#include <Eigen/Dense>
#include <Eigen/Eigenvalues>
#include <cmath>
#include <complex>

namespace orthoconv {

double conv_spectral_norm_bound(const std::vector<float>& filter, int64_t groups, int64_t channels, int64_t kernel,
                                int64_t input_side) {
  const int64_t c = channels, k = kernel;
  require<ShapeError>(static_cast<int64_t>(filter.size()) == groups * c * c * k * k, "spectral bound: filter has ",
                      filter.size(), " values, expected ", groups * c * c * k * k);
  require(input_side > 0, "spectral bound: input side must be positive, got ", input_side);
  const int64_t grid = input_side + k - 1;
  const double pi = std::acos(-1.0);
  // Twiddles w^(f*y) for f in [0, grid), y in [0, k).
  std::vector<std::complex<double>> twiddle(static_cast<size_t>(grid * k));
  for (int64_t f = 0; f < grid; ++f)
    for (int64_t y = 0; y < k; ++y)
      twiddle[static_cast<size_t>(f * k + y)] = std::polar(1.0, -2.0 * pi * static_cast<double>(f * y % grid) / grid);

  double worst = 0.0;
  Eigen::MatrixXcd spectrum(c, c);
  for (int64_t g = 0; g < groups; ++g) {
    const float* a = filter.data() + g * c * c * k * k;
    // A real filter's spectrum at (-p, -q) is the conjugate of (p, q): same singular values. Visit half.
    for (int64_t p = 0; p < grid; ++p)
      for (int64_t q = 0; q < grid; ++q) {
        int64_t mp = (grid - p) % grid, mq = (grid - q) % grid;
        if (mp * grid + mq < p * grid + q) continue;
        for (int64_t o = 0; o < c; ++o)
          for (int64_t i = 0; i < c; ++i) {
            std::complex<double> sum = 0.0;
            for (int64_t y = 0; y < k; ++y)
              for (int64_t x = 0; x < k; ++x)
                sum += static_cast<double>(a[((o * c + i) * k + y) * k + x]) * twiddle[static_cast<size_t>(p * k + y)] *
                       twiddle[static_cast<size_t>(q * k + x)];
            spectrum(o, i) = sum;
          }
        Eigen::MatrixXcd gram = spectrum.adjoint() * spectrum;
        Eigen::SelfAdjointEigenSolver<Eigen::MatrixXcd> solver(gram, Eigen::EigenvaluesOnly);
        require<Error>(solver.info() == Eigen::Success, "spectral bound: eigen-solver failed at frequency (", p, ", ",
                       q, ")");
        worst = std::max(worst, solver.eigenvalues().maxCoeff());
      }
  }
  return std::sqrt(std::max(worst, 0.0)) * (1.0 + 1e-9);
}

double series_tail_bound(double rho, int terms) {
  require(terms >= 0, "series_tail_bound: terms must be >= 0, got ", terms);
  require(rho >= 0.0 && std::isfinite(rho), "series_tail_bound: rho must be finite and >= 0, got ", rho);
  if (rho == 0.0) return 0.0;
  // term_i = rho^i / i!; the tail after the terms fall below 1e-18 of the sum is bounded by a geometric series.
  double term = 1.0;
  for (int i = 1; i <= terms; ++i) term *= rho / i;
  double tail = 0.0;
  for (int i = terms + 1; i < 100000; ++i) {
    term *= rho / i;
    tail += term;
    double ratio = rho / (i + 1);
    if (ratio < 0.5 && term < 1e-18 * std::max(tail, 1e-300)) {
      tail += term * ratio / (1.0 - ratio);  // the rest, bounded geometrically
      break;
    }
  }
  return tail * (1.0 + 1e-12);
}

SocLayerBound soc_layer_bound(SocConv& layer, int64_t input_side, int terms) {
  const SocConfig& config = layer.config();
  require<ShapeError>(input_side > 0 && input_side % config.stride == 0, "soc_layer_bound: input side ", input_side,
                      " is not divisible by the stride ", config.stride);
  SocLayerBound out;
  out.description = layer.describe();
  out.input_side = input_side / config.stride;
  out.terms = terms;
  Tensor scaled = layer.scaled_filter();
  out.rho = conv_spectral_norm_bound(scaled.to_vector(), config.groups, config.group_channels(), config.kernel,
                                     out.input_side);
  out.bound = 1.0 + series_tail_bound(out.rho, terms);
  return out;
}

}  // namespace orthoconv
