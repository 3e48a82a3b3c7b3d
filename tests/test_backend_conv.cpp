// The CPU backend's convolutions (oneDNN, blocked layout) against the double reference: forward (overwrite and
// accumulate), backward-data and backward-weights, through the conv-layout conversions the layers use.
//
// Tolerance: every output is a sum of at most (C/g) k^2 = 216 (forward, backward-data) or N H W = 70
// (backward-weights) float32 products; float32 rounding is 6e-8 per operation and grows like sqrt(terms) for
// these random-sign sums, i.e. ~1e-6 of the largest output. 1e-5 of the largest |output| is the bound.
#include <catch2/catch.hpp>

#include "reference.hpp"

namespace ref = orthoconv::reference;
using orthoconv::ConvPass;
using orthoconv::ConvShape;

namespace {

constexpr double kConvTolerance = 1e-5;

struct ConvCase {
  int64_t channels, kernel, groups;
};

std::vector<float> run_layout_roundtrip(orthoconv::Backend& be, const ConvShape& s, const std::vector<float>& nchw,
                                        std::vector<float>& conv) {
  conv.assign(static_cast<size_t>(be.conv_buffer_size(s)), 0.0f);
  be.to_conv_layout(s, nchw.data(), conv.data());
  std::vector<float> back(nchw.size(), -1.0f);
  be.from_conv_layout(s, conv.data(), back.data());
  return back;
}

}  // namespace

TEST_CASE("oneDNN grouped convolution matches the double reference (forward, accumulate, backward-data, "
          "backward-weights)", "[backend][conv]") {
  auto backend = orthoconv::cpu_backend();
  auto& be = *backend;
  const ConvCase cases[] = {{8, 1, 1},  {8, 3, 1},  {8, 3, 2},  {12, 1, 1}, {12, 3, 1}, {12, 3, 4},
                            {16, 3, 1}, {16, 1, 4}, {16, 3, 16}, {24, 3, 1}, {24, 3, 3}, {24, 5, 2},
                            {32, 3, 4}, {32, 1, 1}};
  uint64_t seed = 100;
  for (const ConvCase& c : cases) {
    ConvShape s;
    s.batch = 3;
    s.in_channels = s.out_channels = c.channels;
    s.height = 5;
    s.width = 7;
    s.kernel = c.kernel;
    s.groups = c.groups;
    ref::ConvDims d{s.batch, s.in_channels, s.out_channels, s.height, s.width, s.kernel, s.groups};
    INFO("shape " << s.str());

    const auto x = ref::random_normal(d.input_size(), ++seed);
    const auto w = ref::random_normal(d.weight_size(), ++seed, 1.0 / std::sqrt(double(c.channels / c.groups)));
    const auto dy = ref::random_normal(d.output_size(), ++seed);
    const auto y0 = ref::random_normal(d.output_size(), ++seed);
    // Quantise the inputs to float32 first: the reference then computes exactly what float32 data defines.
    const auto xf = ref::to_float(x), wf = ref::to_float(w), dyf = ref::to_float(dy), y0f = ref::to_float(y0);
    const auto xq = ref::to_double(xf), wq = ref::to_double(wf), dyq = ref::to_double(dyf), y0q = ref::to_double(y0f);

    std::vector<float> x_conv, dy_conv, y_conv;
    CHECK(run_layout_roundtrip(be, s, xf, x_conv) == xf);  // the layout conversion is exact
    run_layout_roundtrip(be, s, dyf, dy_conv);

    std::vector<float> w_fwd(static_cast<size_t>(be.conv_weights_size(s, ConvPass::forward)));
    std::vector<float> w_bwd(static_cast<size_t>(be.conv_weights_size(s, ConvPass::backward_data)));
    be.weights_to_conv_layout(s, ConvPass::forward, wf.data(), w_fwd.data());
    be.weights_to_conv_layout(s, ConvPass::backward_data, wf.data(), w_bwd.data());

    const auto expected = ref::conv_forward(d, xq, wq);
    std::vector<float> out(static_cast<size_t>(d.output_size()));

    {
      INFO("forward overwrites");
      run_layout_roundtrip(be, s, y0f, y_conv);  // a non-zero destination that must be overwritten
      be.conv_forward(s, x_conv.data(), w_fwd.data(), y_conv.data(), false);
      be.from_conv_layout(s, y_conv.data(), out.data());
      CHECK(ref::max_relative_error(ref::to_double(out), expected) < kConvTolerance);
    }
    {
      INFO("forward accumulates");
      run_layout_roundtrip(be, s, y0f, y_conv);
      be.conv_forward(s, x_conv.data(), w_fwd.data(), y_conv.data(), true);
      be.from_conv_layout(s, y_conv.data(), out.data());
      auto sum = expected;
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += y0q[i];
      CHECK(ref::max_relative_error(ref::to_double(out), sum) < kConvTolerance);
    }
    {
      INFO("backward-data is the transposed convolution");
      std::vector<float> dx_conv(static_cast<size_t>(be.conv_buffer_size(s)), 7.0f);
      be.conv_backward_data(s, dy_conv.data(), w_bwd.data(), dx_conv.data());
      std::vector<float> dx(static_cast<size_t>(d.input_size()));
      be.from_conv_layout(s, dx_conv.data(), dx.data());
      CHECK(ref::max_relative_error(ref::to_double(dx), ref::conv_backward_data(d, dyq, wq)) < kConvTolerance);
    }
    {
      INFO("backward-weights is the weight gradient, plain layout");
      std::vector<float> dw(static_cast<size_t>(d.weight_size()), 7.0f);
      be.conv_backward_weights(s, x_conv.data(), dy_conv.data(), dw.data());
      CHECK(ref::max_relative_error(ref::to_double(dw), ref::conv_backward_weights(d, xq, dyq)) < kConvTolerance);
    }
  }
}

TEST_CASE("oneDNN convolution of a stacked batch equals the convolutions of its parts", "[backend][conv]") {
  // SocConv's weight gradient runs ONE backward-weights call over K*N images laid out back to back; that needs
  // the batch to be the outermost axis of the conv layout.
  auto backend = orthoconv::cpu_backend();
  auto& be = *backend;
  ConvShape part;
  part.batch = 2;
  part.in_channels = part.out_channels = 12;
  part.height = part.width = 4;
  part.kernel = 3;
  part.groups = 2;
  ConvShape stacked = part;
  stacked.batch = 3 * part.batch;
  const int64_t part_size = be.conv_buffer_size(part);
  REQUIRE(be.conv_buffer_size(stacked) == 3 * part_size);
  ref::ConvDims d{stacked.batch, 12, 12, 4, 4, 3, 2};
  const auto xf = ref::to_float(ref::random_normal(d.input_size(), 5));
  const auto dyf = ref::to_float(ref::random_normal(d.output_size(), 6));
  std::vector<float> x_conv(static_cast<size_t>(3 * part_size)), dy_conv(x_conv.size());
  be.to_conv_layout(stacked, xf.data(), x_conv.data());
  be.to_conv_layout(stacked, dyf.data(), dy_conv.data());
  std::vector<float> dw(static_cast<size_t>(d.weight_size()));
  be.conv_backward_weights(stacked, x_conv.data(), dy_conv.data(), dw.data());
  ref::Vec sum(dw.size(), 0.0);
  std::vector<float> part_dw(dw.size());
  for (int p = 0; p < 3; ++p) {
    be.conv_backward_weights(part, x_conv.data() + p * part_size, dy_conv.data() + p * part_size, part_dw.data());
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += part_dw[i];
  }
  CHECK(ref::max_relative_error(ref::to_double(dw), sum) < kConvTolerance);
  CHECK(ref::max_relative_error(ref::to_double(dw),
                                ref::conv_backward_weights(d, ref::to_double(xf), ref::to_double(dyf))) <
        kConvTolerance);
}
