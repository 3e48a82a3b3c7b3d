// The skew filter A = (M - M^T)/2 makes the zero-padded "same" convolution by A an exactly skew-symmetric
// operator: ||A + A^T|| = 0 as operators (conv_operator_matrix + skew_residual), for random M, every kernel size
// and group count. (M - M^T)/2 and (M^T - M)/2 are negatives of each other bit for bit in float32, so the residual
// is exactly zero: the tolerance 1e-12 only allows for the double sums in the checker.
#include <catch2/catch.hpp>

#include "reference.hpp"

namespace ref = orthoconv::reference;

TEST_CASE("skew-symmetrized filters give exactly skew-symmetric convolution operators", "[soc][skew]") {
  auto backend = orthoconv::cpu_backend();
  uint64_t seed = 1;
  for (int64_t kernel : {1, 3, 5})
    for (int64_t groups : {1, 2, 4}) {
      const int64_t c = 4, h = 5, w = 6;
      INFO("kernel " << kernel << ", groups " << groups);
      const auto m = ref::to_float(ref::random_normal(static_cast<size_t>(groups * c * c * kernel * kernel), ++seed));
      std::vector<float> a(m.size());
      backend->skew_symmetrize(m.data(), a.data(), groups, c, kernel);
      CHECK(orthoconv::skew_residual(orthoconv::conv_operator_matrix(a, groups, c, kernel, h, w)) <= 1e-12);
      // The checker can fail: the operator of M itself is far from skew.
      CHECK(orthoconv::skew_residual(orthoconv::conv_operator_matrix(m, groups, c, kernel, h, w)) > 0.1);
      // And the backend's skew is the reference's.
      CHECK(ref::max_relative_error(ref::to_double(a), ref::skew(ref::to_double(m), groups, c, kernel)) <= 1e-7);
    }
}

TEST_CASE("SocConv's skew filter (and its scaled filter) are skew-symmetric operators", "[soc][skew]") {
  for (int64_t kernel : {1, 3, 5})
    for (int64_t groups : {1, 2}) {
      orthoconv::SocConfig config;
      config.in_channels = config.out_channels = 4;
      config.kernel = kernel;
      config.groups = groups;
      config.seed = 10 + static_cast<uint64_t>(kernel * groups);
      orthoconv::SocConv layer(config);
      INFO(layer.describe());
      const int64_t c = config.group_channels();
      CHECK(orthoconv::skew_residual(
                orthoconv::conv_operator_matrix(layer.skew_filter().to_vector(), groups, c, kernel, 4, 4)) <= 1e-12);
      CHECK(orthoconv::skew_residual(
                orthoconv::conv_operator_matrix(layer.scaled_filter().to_vector(), groups, c, kernel, 4, 4)) <= 1e-12);
    }
}
