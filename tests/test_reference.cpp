// The reference itself: the three convolution loops are adjoint to each other, the skew filter is skew, and the
// shuffle formulas are permutations. If these failed, every comparison against the reference would be void.
#include <catch2/catch.hpp>

#include "reference.hpp"

namespace ref = orthoconv::reference;

TEST_CASE("reference convolution: forward, backward-data and backward-weights are adjoint", "[reference]") {
  for (int64_t groups : {1, 2}) {
    ref::ConvDims d{2, 4, 6, 5, 4, 3, groups};
    const auto x = ref::random_normal(d.input_size(), 1), w = ref::random_normal(d.weight_size(), 2),
               dy = ref::random_normal(d.output_size(), 3);
    // <dy, conv(x, w)> = <conv^T(dy, w), x> = <dW(x, dy), w>, exactly up to double rounding.
    const double a = ref::dot(dy, ref::conv_forward(d, x, w));
    const double b = ref::dot(ref::conv_backward_data(d, dy, w), x);
    const double c = ref::dot(ref::conv_backward_weights(d, x, dy), w);
    CHECK(std::abs(a - b) <= 1e-12 * std::abs(a));
    CHECK(std::abs(a - c) <= 1e-12 * std::abs(a));
  }
}

TEST_CASE("reference convolution: a centred delta kernel is the identity, an off-centre one a shift with zero padding",
          "[reference]") {
  ref::ConvDims d{1, 1, 1, 3, 3, 3, 1};
  ref::Vec x{1, 2, 3, 4, 5, 6, 7, 8, 9};
  ref::Vec centre(9, 0.0), right(9, 0.0);
  centre[4] = 1.0;
  right[5] = 1.0;  // tap (ky=1, kx=2): y[i, j] = x[i, j + 1]
  CHECK(ref::conv_forward(d, x, centre) == x);
  CHECK(ref::conv_forward(d, x, right) == ref::Vec{2, 3, 0, 5, 6, 0, 8, 9, 0});
}

TEST_CASE("reference shuffle formulas are permutations, unshuffle follows the issue's index map", "[reference]") {
  for (bool paired : {false, true})
    for (int64_t g : {1, 2, 4}) {
      auto dest = ref::shuffle_destination(16, g, paired);
      std::vector<int> hits(16, 0);
      for (int64_t d : dest) ++hits[static_cast<size_t>(d)];
      CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
    }
  // input[b, c, 2i+p, 2j+q] -> [b, 4c + 2p + q, i, j] on 2 channels 4x4.
  ref::Vec x(32);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<double>(i);
  auto y = ref::pixel_unshuffle(x, 1, 2, 4, 4, 2);
  for (int64_t c = 0; c < 2; ++c)
    for (int64_t p = 0; p < 2; ++p)
      for (int64_t q = 0; q < 2; ++q)
        for (int64_t i = 0; i < 2; ++i)
          for (int64_t j = 0; j < 2; ++j)
            CHECK(y[((4 * c + 2 * p + q) * 2 + i) * 2 + j] == x[(c * 4 + 2 * i + p) * 4 + 2 * j + q]);
}
