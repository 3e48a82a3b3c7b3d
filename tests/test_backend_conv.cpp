// The CPU backend's convolutions (oneDNN, blocked layout) against the double reference: forward (overwrite and
// accumulate), backward-data and backward-weights, through the conv-layout conversions the layers use.
//
// Tolerance: every output is a sum of at most (C/g) k^2 = 216 (forward, backward-data) or N H W = 70
// (backward-weights) float32 products; float32 rounding is 6e-8 per operation and grows like sqrt(terms) for
// these random-sign sums, i.e. ~1e-6 of the largest output. 1e-5 of the largest |output| is the bound.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <limits>

#include "backend/cpu/cpu_backend.hpp"
#include "reference.hpp"

namespace ref = orthoconv::reference;
using orthoconv::ConvPass;
using orthoconv::ConvShape;

namespace {

constexpr double kConvTolerance = 1e-5;

struct ConvCase {
  int64_t channels, kernel, groups;
};

// A square convolution (in = out channels) of `batch` images of height x width.
ConvShape conv_of(int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t kernel, int64_t groups,
                  orthoconv::ConvPrecision precision = orthoconv::ConvPrecision::fp32) {
  ConvShape s;
  s.batch = batch;
  s.in_channels = s.out_channels = channels;
  s.height = height;
  s.width = width;
  s.kernel = kernel;
  s.groups = groups;
  s.precision = precision;
  return s;
}

// A case as a batch of 3 images of 5 x 7.
ConvShape shape_of(const ConvCase& c, orthoconv::ConvPrecision precision = orthoconv::ConvPrecision::fp32) {
  return conv_of(3, c.channels, 5, 7, c.kernel, c.groups, precision);
}

// The CPU backend's description of a shape's kernels (its layout first: "nChw16c: ...", "nhwc: ...").
std::string implementation(orthoconv::Backend& be, const ConvShape& s) {
  auto* cpu = dynamic_cast<orthoconv::cpu::CpuBackend*>(&be);
  REQUIRE(cpu != nullptr);
  return cpu->implementation(s);
}

bool cpu_has_amx(orthoconv::Backend& be) { return be.name().find("AMX") != std::string::npos; }

// Sets the backend's precision choice for a scope.
struct PrecisionChoiceScope {
  orthoconv::Backend& be;
  PrecisionChoiceScope(orthoconv::Backend& backend, orthoconv::Backend::PrecisionChoice choice) : be(backend) {
    be.set_precision_choice(choice);
  }
  ~PrecisionChoiceScope() { be.set_precision_choice(orthoconv::Backend::PrecisionChoice::measured); }
};

ref::ConvDims dims_of(const ConvShape& s) {
  return {s.batch, s.in_channels, s.out_channels, s.height, s.width, s.kernel, s.groups};
}

std::vector<float> run_layout_roundtrip(orthoconv::Backend& be, const ConvShape& s, const std::vector<float>& nchw,
                                        std::vector<float>& conv) {
  conv.assign(static_cast<size_t>(be.conv_buffer_size(s)), 0.0f);
  be.to_conv_layout(s, nchw.data(), conv.data());
  std::vector<float> back(nchw.size(), -1.0f);
  be.from_conv_layout(s, conv.data(), back.data());
  return back;
}

// bf16 backward-weights of a stacked batch as SocConv runs it (x then dy as one input, dy then x as the other, back
// to back), against the double reference on the rounded inputs: dW(x, dy) + dW(dy, x), which the float32 sums of
// exact products meet within kConvTolerance. x_conv and dy_conv are in s's conv layout; returns the implementation
// that ran.
std::string check_stacked_bf16_backward_weights(orthoconv::Backend& be, const ConvShape& s,
                                                const std::vector<float>& x_conv, const std::vector<float>& dy_conv,
                                                const ref::Vec& xr, const ref::Vec& dyr) {
  ConvShape stacked = s;
  stacked.batch = 2 * s.batch;
  const ref::ConvDims d = dims_of(s);
  const size_t half = static_cast<size_t>(be.conv_input_size(s));
  std::vector<float> x2(2 * half), dy2(2 * half);
  be.to_conv_input(s, x_conv.data(), x2.data());
  be.to_conv_input(s, dy_conv.data(), x2.data() + half);
  be.to_conv_input(s, dy_conv.data(), dy2.data());
  be.to_conv_input(s, x_conv.data(), dy2.data() + half);
  std::vector<float> dw(static_cast<size_t>(d.weight_size()), 7.0f);
  be.conv_backward_weights(stacked, x2.data(), dy2.data(), dw.data());
  const std::string impl = implementation(be, stacked);
  INFO("shape " << stacked.str() << ": " << impl);
  auto want = ref::conv_backward_weights(d, xr, dyr), second = ref::conv_backward_weights(d, dyr, xr);
  for (size_t i = 0; i < want.size(); ++i) want[i] += second[i];
  CHECK(ref::max_relative_error(ref::to_double(dw), want) < kConvTolerance);
  return impl;
}

// The forward passes of a shape whose forward weights w (conv layout) and input x_in (conv input: bf16 where the
// forward runs bf16) give `expected` (double reference): overwrite, accumulate onto a float32 destination, and
// scaled with and without a float32 addend (Horner's x0), in s's conv layout. add_conv and addq: the addend.
void check_forward_passes(orthoconv::Backend& be, const ConvShape& s, const std::vector<float>& x_in,
                          const std::vector<float>& w, const std::vector<float>& add_conv, const ref::Vec& expected,
                          const ref::Vec& addq) {
  std::vector<float> out_conv(static_cast<size_t>(be.conv_buffer_size(s))), out(expected.size());
  {
    INFO("forward overwrites");
    std::fill(out_conv.begin(), out_conv.end(), 7.0f);
    be.conv_forward(s, x_in.data(), w.data(), out_conv.data(), false);
    be.from_conv_layout(s, out_conv.data(), out.data());
    CHECK(ref::max_relative_error(ref::to_double(out), expected) < kConvTolerance);
  }
  {
    INFO("forward accumulates into a float32 destination");
    out_conv = add_conv;
    be.conv_forward(s, x_in.data(), w.data(), out_conv.data(), true);
    be.from_conv_layout(s, out_conv.data(), out.data());
    auto sum = expected;
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += addq[i];
    CHECK(ref::max_relative_error(ref::to_double(out), sum) < kConvTolerance);
  }
  for (float alpha : {1.0f, -0.25f, 1.0f / 3.0f}) {
    INFO("scaled forward, alpha " << alpha << ", float32 addend (Horner's x0) and without");
    for (bool with_addend : {true, false}) {
      std::fill(out_conv.begin(), out_conv.end(), 7.0f);
      be.conv_forward_scaled(s, x_in.data(), w.data(), alpha, with_addend ? add_conv.data() : nullptr, out_conv.data());
      be.from_conv_layout(s, out_conv.data(), out.data());
      auto want = expected;
      for (size_t i = 0; i < want.size(); ++i) want[i] = double(alpha) * expected[i] + (with_addend ? addq[i] : 0.0);
      CHECK(ref::max_relative_error(ref::to_double(out), want) < kConvTolerance);
    }
  }
}

}  // namespace

// Float32 shapes; then, where the CPU runs bf16, the same shapes with bf16 requested and every pass kept float32
// (PrecisionChoice::never): the float32 fallback in the layout of a bf16 request (nhwc where the CPU has AMX).
TEST_CASE(
    "oneDNN grouped convolution matches the double reference (forward, accumulate, backward-data, "
    "backward-weights)",
    "[backend][conv]") {
  auto backend = orthoconv::cpu_backend();
  auto& be = *backend;
  const ConvCase cases[] = {{8, 1, 1},  {8, 3, 1},  {8, 3, 2},  {12, 1, 1},  {12, 3, 1},
                            {12, 3, 4}, {16, 3, 1}, {16, 1, 4}, {16, 3, 16}, {24, 3, 1},
                            {24, 3, 3}, {24, 5, 2}, {32, 3, 4}, {32, 1, 1},  {64, 3, 4}};
  uint64_t seed = 100;
  const bool bf16 = ref::cpu_has_bf16();
  PrecisionChoiceScope never(be, orthoconv::Backend::PrecisionChoice::never);
  int nhwc_cases = 0;
  for (const auto precision : {orthoconv::ConvPrecision::fp32, orthoconv::ConvPrecision::bf16})
    for (const ConvCase& c : cases) {
      if (precision == orthoconv::ConvPrecision::bf16 && !bf16) break;
      const ConvShape s = shape_of(c, precision);
      const ref::ConvDims d = dims_of(s);
      INFO("shape " << s.str() << ": " << implementation(be, s));
      REQUIRE(be.conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::fp32);
      REQUIRE(be.conv_precision(s, ConvPass::backward_weights) == orthoconv::ConvPrecision::fp32);
      nhwc_cases += precision == orthoconv::ConvPrecision::bf16 && implementation(be, s).rfind("nhwc", 0) == 0;

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
  // Where oneDNN has AMX bf16 kernels only in nhwc, a bf16 request runs in nhwc (here 24 channels in 3 groups
  // and up, but those with 8 channels or fewer per group), and the loop above ran the float32 fallback there.
  if (bf16 && cpu_has_amx(be)) CHECK(nhwc_cases >= 3);
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
  CHECK(ref::max_relative_error(ref::to_double(dw), ref::conv_backward_weights(d, ref::to_double(xf),
                                                                               ref::to_double(dyf))) < kConvTolerance);
}

// ---- bf16 inputs (ConvShape::precision = bf16, Backend::PrecisionChoice::always) ----
// A bf16 pass rounds its activation inputs (to_conv_input) and weights (weights_to_conv_layout) to bfloat16 and
// accumulates in float32. The reference gets the same rounded inputs (reference::round_to_bf16, written from the
// definition): products of two 8-bit significands are exact in float32, so what is left is float32 accumulation,
// and the float32 tolerance above holds unchanged. A pass that rounded anything else (its output, the addend,
// the weight gradient) would be off by up to u = 2^-8 = 3.9e-3 relative.

namespace {

// bfloat16 values (as uint16) of a conv-input buffer.
std::vector<uint16_t> bf16_bits(const std::vector<float>& conv_input, size_t count) {
  std::vector<uint16_t> out(count);
  std::memcpy(out.data(), conv_input.data(), count * sizeof(uint16_t));
  return out;
}

uint16_t bits_of(double rounded) {
  const float f = static_cast<float>(rounded);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace

TEST_CASE(
    "float32 backward-weights on planes of at most 4 pixels (im2col + sgemm per group, or the pixel matmul) matches "
    "the double reference",
    "[backend][conv]") {
  auto& be = *orthoconv::cpu_backend();
  struct Case {
    int64_t channels, kernel, height, width, groups;
  };
  uint64_t seed = 700;
  // 20 channels: padded channels in the blocked layout; 1x1 and 1x2 planes: every tap but the centre is padding;
  // groups: GS-SOC's 4 groups at 2x2 (3x3) and 1x1 (1x1 kernel), 16-channel groups in nChw16c, 8-channel groups
  // (nChw8c), 3 groups of 8 channels (padded blocks). Where the kernel covers the plane and the groups are whole
  // blocks of the layout the pixel matmul runs instead (its own test is below); padded channels and a kernel of 1
  // at 2x2 keep im2col in every layout.
  int im2col = 0, pixel = 0;
  for (const Case& c : {Case{32, 3, 2, 2, 1}, Case{20, 3, 2, 2, 1}, Case{16, 3, 1, 2, 1}, Case{24, 5, 2, 2, 1},
                        Case{8, 3, 1, 1, 1}, Case{64, 3, 2, 2, 4}, Case{64, 1, 1, 1, 4}, Case{32, 3, 2, 2, 4},
                        Case{24, 3, 1, 2, 3}, Case{16, 1, 1, 1, 1}, Case{32, 1, 2, 2, 2}, Case{20, 1, 1, 1, 1}}) {
    const ConvShape s = conv_of(5, c.channels, c.height, c.width, c.kernel, c.groups);
    const ref::ConvDims d = dims_of(s);
    const std::string impl = implementation(be, s);
    INFO("shape " << s.str() << ": " << impl);
    im2col += impl.find("im2col + sgemm") != std::string::npos;
    pixel += impl.find("bwd-weights pixel matmul sgemm") != std::string::npos;
    const auto xf = ref::to_float(ref::random_normal(d.input_size(), ++seed));
    const auto dyf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
    std::vector<float> x_conv, dy_conv;
    run_layout_roundtrip(be, s, xf, x_conv);
    run_layout_roundtrip(be, s, dyf, dy_conv);
    std::vector<float> dw(static_cast<size_t>(d.weight_size()), 7.0f);  // overwritten
    be.conv_backward_weights(s, x_conv.data(), dy_conv.data(), dw.data());
    const auto expected = ref::conv_backward_weights(d, ref::to_double(xf), ref::to_double(dyf));
    CHECK(ref::max_relative_error(ref::to_double(dw), expected) < kConvTolerance);
  }
  CHECK(im2col + pixel == 12);  // each case ran one of the two
  CHECK(im2col >= 3);
}

TEST_CASE("to_conv_input rounds to bfloat16 to nearest, ties to even, as the reference", "[backend][conv][bf16]") {
  ref::AlwaysBf16 always;
  auto& be = *orthoconv::cpu_backend();
  if (!ref::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: bf16 conversion not tested");
    return;
  }
  ConvShape s;
  s.batch = 1;
  s.in_channels = s.out_channels = 16;
  s.height = 4;
  s.width = 4;
  s.kernel = 3;
  s.precision = orthoconv::ConvPrecision::bf16;
  REQUIRE(be.conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::bf16);
  const size_t count = static_cast<size_t>(be.conv_buffer_size(s));
  REQUIRE(be.conv_input_size(s) == static_cast<int64_t>(count / 2));
  // Halfway cases both ways, just off halfway, subnormals, the overflow threshold, signs, infinities; then
  // random values (the conversion is elementwise, so the conv layout does not matter here).
  const float tie_even = 1.0f + std::ldexp(1.0f, -8), tie_odd = 1.0f + 3 * std::ldexp(1.0f, -8);
  std::vector<float> special{0.0f,
                             -0.0f,
                             1.0f,
                             -1.5f,
                             tie_even,
                             tie_odd,
                             -tie_even,
                             std::nextafter(tie_even, 2.0f),
                             std::nextafter(tie_even, 0.0f),
                             std::ldexp(1.0f, -130),
                             -std::ldexp(3.0f, -140),
                             std::numeric_limits<float>::max(),
                             -std::numeric_limits<float>::max(),
                             std::ldexp(255.0f, 120),
                             std::ldexp(511.0f, 119),
                             std::numeric_limits<float>::infinity(),
                             -std::numeric_limits<float>::infinity(),
                             std::numeric_limits<float>::denorm_min()};
  std::vector<float> src = ref::to_float(ref::random_normal(count, 77, 100.0));
  std::copy(special.begin(), special.end(), src.begin());
  std::vector<float> dst(static_cast<size_t>(be.conv_input_size(s)));
  be.to_conv_input(s, src.data(), dst.data());
  const auto bits = bf16_bits(dst, count);
  size_t mismatches = 0;
  for (size_t i = 0; i < count; ++i)
    if (bits[i] != bits_of(ref::round_to_bf16(src[i]))) {
      if (mismatches++ < 5)
        UNSCOPED_INFO("element " << i << ": " << src[i] << " -> 0x" << std::hex << bits[i] << ", reference 0x"
                                 << bits_of(ref::round_to_bf16(src[i])));
    }
  CHECK(mismatches == 0);
  // NaN stays NaN.
  src[0] = std::numeric_limits<float>::quiet_NaN();
  be.to_conv_input(s, src.data(), dst.data());
  CHECK((bf16_bits(dst, 1)[0] & 0x7fffu) > 0x7f80u);
}

TEST_CASE(
    "oneDNN bf16 convolutions (bf16 inputs, float32 accumulation and outputs) match the double reference "
    "on the rounded inputs",
    "[backend][conv][bf16]") {
  ref::AlwaysBf16 always;
  auto& be = *orthoconv::cpu_backend();
  if (!ref::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: bf16 convolutions not tested");
    return;
  }
  const ConvCase cases[] = {{16, 3, 1}, {16, 1, 1}, {32, 3, 2}, {32, 3, 4},
                            {32, 1, 4}, {64, 3, 4}, {48, 3, 1}, {128, 3, 4}};
  int forward_cases = 0, weight_cases = 0, amx_cases = 0;
  uint64_t seed = 300;
  for (const ConvCase& c : cases) {
    const ConvShape s = shape_of(c, orthoconv::ConvPrecision::bf16);
    const ref::ConvDims d = dims_of(s);
    const std::string impl = implementation(be, s);
    INFO("shape " << s.str() << ": " << impl);
    amx_cases += impl.find("amx") != std::string::npos;
    const auto xf = ref::to_float(ref::random_normal(d.input_size(), ++seed));
    const auto wf = ref::to_float(ref::random_normal(d.weight_size(), ++seed, 1.0 / std::sqrt(double(c.channels))));
    const auto dyf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
    const auto addf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
    const auto xr = ref::round_to_bf16(ref::to_double(xf)), wr = ref::round_to_bf16(ref::to_double(wf)),
               dyr = ref::round_to_bf16(ref::to_double(dyf)), addq = ref::to_double(addf);
    std::vector<float> x_conv, dy_conv, add_conv;
    run_layout_roundtrip(be, s, xf, x_conv);
    run_layout_roundtrip(be, s, dyf, dy_conv);
    run_layout_roundtrip(be, s, addf, add_conv);
    std::vector<float> x_in(static_cast<size_t>(be.conv_input_size(s)));

    if (be.conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::bf16) {
      ++forward_cases;
      be.to_conv_input(s, x_conv.data(), x_in.data());
      std::vector<float> w(static_cast<size_t>(be.conv_weights_size(s, ConvPass::forward)));
      be.weights_to_conv_layout(s, ConvPass::forward, wf.data(), w.data());
      check_forward_passes(be, s, x_in, w, add_conv, ref::conv_forward(d, xr, wr), addq);
    }
    ConvShape stacked = s;  // backward-weights as SocConv runs it: K = 2 batches back to back
    stacked.batch = 2 * s.batch;
    if (be.conv_precision(stacked, ConvPass::backward_weights) == orthoconv::ConvPrecision::bf16) {
      ++weight_cases;
      INFO("backward-weights of a stacked batch, float32 plain diff_weights");
      std::vector<float> x2(2 * x_in.size()), dy2(2 * x_in.size());
      be.to_conv_input(s, x_conv.data(), x2.data());
      be.to_conv_input(s, dy_conv.data(), x2.data() + x_in.size());
      be.to_conv_input(s, dy_conv.data(), dy2.data());
      be.to_conv_input(s, x_conv.data(), dy2.data() + x_in.size());
      std::vector<float> dw(static_cast<size_t>(d.weight_size()), 7.0f);
      be.conv_backward_weights(stacked, x2.data(), dy2.data(), dw.data());
      // sum over the two halves: <dy, conv(x, w)> + <x, conv(dy, w)>
      auto want = ref::conv_backward_weights(d, xr, dyr), second = ref::conv_backward_weights(d, dyr, xr);
      for (size_t i = 0; i < want.size(); ++i) want[i] += second[i];
      CHECK(ref::max_relative_error(ref::to_double(dw), want) < kConvTolerance);
    }
  }
  // oneDNN 2.6 has jit bf16 kernels for every blocked shape here but the grouped backward-weights with 8 channels
  // per group; the test must not pass by running nothing in bf16.
  CHECK(forward_cases == static_cast<int>(std::size(cases)));
  CHECK(weight_cases >= 4);
  // On a CPU with AMX the shapes with 16 or more channels per group run oneDNN's AMX kernels (the grouped ones in
  // nhwc): the checks above covered them.
  if (cpu_has_amx(be)) CHECK(amx_cases >= 6);
}

// The layout a bf16 request runs in, and the guard of the measured choice. nhwc only where the CPU has AMX (oneDNN
// 2.6's AMX kernels of grouped convolutions exist only there) and the plane has more than 4 pixels (at 1x1 and
// 2x2 its AMX backward-weights runs at reference speed: 1024 channels at 1x1 took 516 CPU ms for 64 images,
// against 9 in float32). A candidate whose first run exceeds too_slow_factor times float32 is dropped, for good.
TEST_CASE(
    "a bf16 request runs in nhwc only with AMX and on planes of more than 4 pixels, and a bf16 candidate "
    "far slower than float32 is dropped and never measured again",
    "[backend][conv][bf16]") {
  if (!ref::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: bf16 layouts not tested");
    return;
  }
  auto backend = orthoconv::cpu_backend();
  auto& cpu = dynamic_cast<orthoconv::cpu::CpuBackend&>(*backend);
  const bool amx = cpu_has_amx(*backend);
  {
    PrecisionChoiceScope never(*backend, orthoconv::Backend::PrecisionChoice::never);  // layouts only, no timing
    struct Case {
      int64_t channels, side, kernel, groups;
      bool nhwc_with_amx;
    };
    for (const Case& c : {Case{64, 4, 3, 4, true}, Case{64, 2, 3, 4, false}, Case{64, 1, 1, 4, false},
                          Case{64, 1, 1, 1, false}, Case{128, 2, 3, 4, false}}) {
      ConvShape s;
      s.batch = 4;
      s.in_channels = s.out_channels = c.channels;
      s.height = s.width = c.side;
      s.kernel = c.kernel;
      s.groups = c.groups;
      s.precision = orthoconv::ConvPrecision::bf16;
      const std::string impl = implementation(*backend, s);
      INFO("shape " << s.str() << ": " << impl);
      CHECK((impl.rfind("nhwc", 0) == 0) == (amx && c.nhwc_with_amx));
    }
  }
  // The Horner step (scaled, with the x0 addend) runs a jit kernel in every layout, float32 and bf16: in nhwc
  // oneDNN 2.6 had only its reference kernel for it with the weights format of a plain forward (brgconv's),
  // ~1000x slower; the backend refuses that kernel (BackendError).
  for (const auto choice : {orthoconv::Backend::PrecisionChoice::never, orthoconv::Backend::PrecisionChoice::always}) {
    PrecisionChoiceScope scope(*backend, choice);
    ConvShape s;
    s.batch = 2;
    s.in_channels = s.out_channels = 128;
    s.height = s.width = 8;
    s.kernel = 3;
    s.groups = 4;
    s.precision = orthoconv::ConvPrecision::bf16;
    const bool low = backend->conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::bf16;
    std::vector<float> x(static_cast<size_t>(backend->conv_buffer_size(s)), 0.5f), add(x.size(), 1.0f), y(x.size());
    std::vector<float> x_in(static_cast<size_t>(backend->conv_input_size(s)));
    std::vector<float> w(static_cast<size_t>(backend->conv_weights_size(s, ConvPass::forward)));
    const std::vector<float> plain(static_cast<size_t>(s.weight_count()), 0.25f);
    backend->weights_to_conv_layout(s, ConvPass::forward, plain.data(), w.data());
    if (low) backend->to_conv_input(s, x.data(), x_in.data());
    INFO("shape " << s.str() << (low ? " bf16" : " fp32") << ": " << implementation(*backend, s));
    CHECK(low == (choice == orthoconv::Backend::PrecisionChoice::always));
    REQUIRE_NOTHROW(
        backend->conv_forward_scaled(s, low ? x_in.data() : x.data(), w.data(), 0.5f, add.data(), y.data()));
    // Element 0 in either layout: image 0, channel 0, the corner pixel: 32 inputs x 4 taps of 0.5 * 0.25 (exact in
    // bf16 and float32), times alpha, plus the addend.
    CHECK(y[0] == 1.0f + 0.5f * (32 * 4 * 0.5f * 0.25f));
  }
  // Factor 0 and 0 s: every measured candidate is "too slow" after its first run; it stays dropped when the choice
  // is made again (set_precision_choice resets the choices, not the drops), even with the defaults back.
  ConvShape s = shape_of({32, 3, 1}, orthoconv::ConvPrecision::bf16);
  s.batch = 6;  // a shape no other test uses: its choices are made here
  cpu.set_too_slow(0.0, 0.0);
  CHECK(cpu.conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::fp32);
  cpu.set_too_slow(10.0, 0.05);
  CHECK(cpu.conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::fp32);
  backend->set_precision_choice(orthoconv::Backend::PrecisionChoice::always);
  backend->set_precision_choice(orthoconv::Backend::PrecisionChoice::measured);
  CHECK(cpu.conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::fp32);
  std::string line;
  for (const std::string& l : cpu.precision_choices())
    if (l.rfind("batch 6, 32 ch 5x7 k3 g1", 0) == 0) line = l;
  INFO(line);
  CHECK(line.find("fwd fp32 (dropped earlier: its first run was too slow)") != std::string::npos);
  // The backward-weights of the same shape, never dropped, is measured (bf16 or fp32 by its timings; a first run
  // of this tiny shape is far below 0.05 s, so not dropped).
  cpu.conv_precision(s, ConvPass::backward_weights);
  for (const std::string& l : cpu.precision_choices())
    if (l.rfind("batch 6, 32 ch 5x7 k3 g1", 0) == 0) line = l;
  CHECK(line.find("bwd-weights") != std::string::npos);
  CHECK(line.find("bwd-weights fp32 (dropped") == std::string::npos);
}

// bf16 at fewer than 16 channels per group (GS-SOC's 32 channels in 4 groups): oneDNN 2.6 has no bf16 kernel there
// faster than float32 (its grouped bf16 backward-weights is its reference kernel), so on a CPU with AMX the backend
// runs one dense AMX convolution with block-diagonal weights. Checked against the GROUPED double reference on the
// rounded inputs: a weight leaking into another group's block, a gradient taken from an off-diagonal block or a
// block of the wrong group fails it. Tolerance as above (float32 sums of exact products; the zero blocks add
// exact zeros).
TEST_CASE(
    "bf16 convolutions with fewer than 16 channels per group run as one dense block-diagonal convolution and "
    "match the grouped double reference on the rounded inputs",
    "[backend][conv][bf16]") {
  ref::AlwaysBf16 always;
  auto& be = *orthoconv::cpu_backend();
  if (!ref::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: bf16 dense block-diagonal convolutions not tested");
    return;
  }
  const bool amx = cpu_has_amx(be);
  int dense_cases = 0;
  uint64_t seed = 900;
  for (const ConvCase& c : {ConvCase{32, 3, 4}, ConvCase{24, 3, 3}, ConvCase{16, 3, 2}, ConvCase{32, 1, 4}}) {
    ConvShape s = shape_of(c, orthoconv::ConvPrecision::bf16);
    s.batch = 2;  // shapes of their own: no other test has made their choices
    const ref::ConvDims d = dims_of(s);
    const std::string impl = implementation(be, s);
    INFO("shape " << s.str() << ": " << impl);
    const bool dense = impl.find("dense block-diagonal") != std::string::npos;
    dense_cases += dense;
    if (amx) CHECK((dense && impl.find("amx") != std::string::npos));
    const auto xf = ref::to_float(ref::random_normal(d.input_size(), ++seed));
    const auto wf = ref::to_float(ref::random_normal(d.weight_size(), ++seed, 1.0 / std::sqrt(double(c.channels))));
    const auto dyf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
    const auto addf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
    const auto xr = ref::round_to_bf16(ref::to_double(xf)), wr = ref::round_to_bf16(ref::to_double(wf)),
               dyr = ref::round_to_bf16(ref::to_double(dyf)), addq = ref::to_double(addf);
    std::vector<float> x_conv, dy_conv, add_conv, out_conv(static_cast<size_t>(be.conv_buffer_size(s)));
    run_layout_roundtrip(be, s, xf, x_conv);
    run_layout_roundtrip(be, s, dyf, dy_conv);
    run_layout_roundtrip(be, s, addf, add_conv);
    std::vector<float> x_in(static_cast<size_t>(be.conv_input_size(s))), out(static_cast<size_t>(d.output_size()));
    REQUIRE(be.conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::bf16);
    be.to_conv_input(s, x_conv.data(), x_in.data());
    std::vector<float> w(static_cast<size_t>(be.conv_weights_size(s, ConvPass::forward)));
    be.weights_to_conv_layout(s, ConvPass::forward, wf.data(), w.data());
    const auto expected = ref::conv_forward(d, xr, wr);
    {
      INFO("forward overwrites");
      std::fill(out_conv.begin(), out_conv.end(), 7.0f);
      be.conv_forward(s, x_in.data(), w.data(), out_conv.data(), false);
      be.from_conv_layout(s, out_conv.data(), out.data());
      CHECK(ref::max_relative_error(ref::to_double(out), expected) < kConvTolerance);
    }
    {
      INFO("the Horner step: -1/3 conv + the float32 x0 addend");
      be.conv_forward_scaled(s, x_in.data(), w.data(), -1.0f / 3.0f, add_conv.data(), out_conv.data());
      be.from_conv_layout(s, out_conv.data(), out.data());
      auto want = expected;
      for (size_t i = 0; i < want.size(); ++i) want[i] = -expected[i] / 3.0 + addq[i];
      CHECK(ref::max_relative_error(ref::to_double(out), want) < kConvTolerance);
    }
    ConvShape stacked = s;  // as SocConv runs it: 2 batches back to back
    stacked.batch = 2 * s.batch;
    // Without AMX oneDNN's grouped bf16 backward-weights here is its reference kernel: float32, nothing to check.
    if (amx) REQUIRE(be.conv_precision(stacked, ConvPass::backward_weights) == orthoconv::ConvPrecision::bf16);
    if (be.conv_precision(stacked, ConvPass::backward_weights) == orthoconv::ConvPrecision::bf16) {
      INFO("backward-weights of a stacked batch: the diagonal blocks of the dense gradient");
      check_stacked_bf16_backward_weights(be, s, x_conv, dy_conv, xr, dyr);
    }
  }
  // Every case has fewer than 16 channels per group and at most 4 groups: with AMX all run dense, without none.
  CHECK(dense_cases == (amx ? 4 : 0));
}

// bf16 backward-weights at planes of at most 4 pixels: im2col + one oneDNN bf16 matmul over the groups
// (bf16_gemm.cpp), against the grouped double reference on the rounded inputs. Every output is a float32 sum of
// N H W = at most 24 exact products here: the tolerance above holds. A tap, channel or group gathered from the wrong
// place, or a group's gradient in another group's slot, fails it.
TEST_CASE(
    "bf16 backward-weights on planes of at most 4 pixels (im2col + bf16 matmul) matches the grouped double "
    "reference on the rounded inputs",
    "[backend][conv][bf16]") {
  ref::AlwaysBf16 always;
  auto& be = *orthoconv::cpu_backend();
  if (!ref::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: bf16 im2col + matmul backward-weights not tested");
    return;
  }
  struct Case {
    int64_t channels, height, width, kernel, groups;
  };
  uint64_t seed = 1200;
  // (Shapes the pixel matmul does not take in any layout: a kernel not covering the plane, groups of 4 channels on
  // planes of more than one pixel, padded channels.)
  for (const Case& c : {Case{12, 2, 2, 3, 3}, Case{20, 1, 1, 1, 1}, Case{20, 1, 2, 3, 5}, Case{32, 2, 2, 1, 2}}) {
    const ConvShape s = conv_of(3, c.channels, c.height, c.width, c.kernel, c.groups, orthoconv::ConvPrecision::bf16);
    ConvShape stacked = s;  // as SocConv runs it: 2 batches back to back
    stacked.batch = 2 * s.batch;
    const ref::ConvDims d = dims_of(s);
    REQUIRE(be.conv_precision(stacked, ConvPass::backward_weights) == orthoconv::ConvPrecision::bf16);
    const auto xf = ref::to_float(ref::random_normal(d.input_size(), ++seed));
    const auto dyf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
    const auto xr = ref::round_to_bf16(ref::to_double(xf)), dyr = ref::round_to_bf16(ref::to_double(dyf));
    std::vector<float> x_conv, dy_conv;
    run_layout_roundtrip(be, s, xf, x_conv);
    run_layout_roundtrip(be, s, dyf, dy_conv);
    const std::string impl = check_stacked_bf16_backward_weights(be, s, x_conv, dy_conv, xr, dyr);
    INFO("shape " << stacked.str() << ": " << impl);
    CHECK(impl.find("im2col + bf16 matmul") != std::string::npos);
    CHECK(impl.find("not run yet") == std::string::npos);
  }
}

// bf16 backward-weights of dense shapes whose layout holds all channels per pixel (nhwc with AMX; 16 channels in
// nChw16c): chunked im2col + bf16 matmul (bf16_gemm.cpp), against the double reference on the rounded inputs. The
// first case (96 stacked images of 16 x 32 x 32, 28 MB of im2col) runs in two chunks of 48 images, the second one
// adding to the first's result. Tolerance as above: float32 sums of exact products.
TEST_CASE(
    "bf16 backward-weights of dense nhwc shapes (chunked im2col + bf16 matmul) matches the double reference on "
    "the rounded inputs",
    "[backend][conv][bf16]") {
  ref::AlwaysBf16 always;
  auto& be = *orthoconv::cpu_backend();
  if (!ref::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: bf16 chunked im2col + matmul backward-weights not tested");
    return;
  }
  struct Case {
    int64_t batch, channels, height, width, kernel;
  };
  int gemm_cases = 0;
  uint64_t seed = 1500;
  for (const Case& c : {Case{48, 16, 32, 32, 3}, Case{3, 32, 5, 7, 3}, Case{3, 64, 4, 4, 1}}) {
    const ConvShape s = conv_of(c.batch, c.channels, c.height, c.width, c.kernel, 1, orthoconv::ConvPrecision::bf16);
    ConvShape stacked = s;  // as SocConv runs it: 2 batches back to back
    stacked.batch = 2 * s.batch;
    const ref::ConvDims d = dims_of(s);
    if (be.conv_precision(stacked, ConvPass::backward_weights) != orthoconv::ConvPrecision::bf16) continue;
    const auto xf = ref::to_float(ref::random_normal(d.input_size(), ++seed));
    const auto dyf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
    const auto xr = ref::round_to_bf16(ref::to_double(xf)), dyr = ref::round_to_bf16(ref::to_double(dyf));
    std::vector<float> x_conv, dy_conv;
    run_layout_roundtrip(be, s, xf, x_conv);
    run_layout_roundtrip(be, s, dyf, dy_conv);
    const std::string impl = check_stacked_bf16_backward_weights(be, s, x_conv, dy_conv, xr, dyr);
    gemm_cases += impl.find("im2col + bf16 matmul") != std::string::npos;
  }
  // With AMX all three run in a layout of all channels per pixel (nhwc, or nChw16c at 16 channels).
  if (cpu_has_amx(be)) CHECK(gemm_cases == 3);
}

// Planes of at most 4 pixels that the kernel covers from every pixel run the forward as one matmul per group by
// the pixel matrix, and backward-weights as that matrix's gradient folded into the taps (GS-SOC's 512 / 1024
// channels in 4 groups at 2x2, its 1x1 layers), float32 and, where the CPU has it, bf16: every forward pass and
// backward-weights against the double reference (bf16: on the rounded inputs; backward-weights of a stacked batch),
// on planes of 2x2, 2x1, 1x2 and 1x1, kernels 1 to 5, 1 to 4 groups. A kernel that does not cover the plane (k = 1 at
// 2x2) keeps oneDNN's convolution.
TEST_CASE(
    "convolutions on planes of at most 4 pixels run as a pixel matmul (forward, backward-weights) and match the double "
    "reference",
    "[backend][conv][bf16]") {
  struct PixelCase {
    int64_t channels, kernel, groups, height, width;
  };
  const PixelCase cases[] = {{32, 3, 2, 2, 2}, {64, 3, 4, 2, 2}, {48, 1, 3, 1, 1}, {16, 3, 1, 1, 1},
                             {32, 3, 1, 2, 1}, {16, 5, 1, 2, 2}, {32, 3, 2, 1, 2}};
  auto& be = *orthoconv::cpu_backend();
  ref::AlwaysBf16 always;
  uint64_t seed = 900;
  for (const auto precision : {orthoconv::ConvPrecision::fp32, orthoconv::ConvPrecision::bf16}) {
    if (precision == orthoconv::ConvPrecision::bf16 && !ref::cpu_has_bf16()) {
      WARN("no AVX512-BF16 on this CPU: the bf16 pixel matmul is not tested");
      break;
    }
    const bool low = precision == orthoconv::ConvPrecision::bf16;
    for (const PixelCase& c : cases) {
      const ConvShape s = conv_of(3, c.channels, c.height, c.width, c.kernel, c.groups, precision);
      const ref::ConvDims d = dims_of(s);
      REQUIRE(be.conv_precision(s, ConvPass::forward) == precision);
      const std::string impl = implementation(be, s);
      INFO("shape " << s.str() << ": " << impl);
      CHECK(impl.find("pixel matmul") != std::string::npos);
      const auto xf = ref::to_float(ref::random_normal(d.input_size(), ++seed));
      const auto wf = ref::to_float(ref::random_normal(d.weight_size(), ++seed, 1.0 / std::sqrt(double(c.channels))));
      const auto addf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
      auto xr = ref::to_double(xf), wr = ref::to_double(wf);
      if (low) {
        xr = ref::round_to_bf16(xr);
        wr = ref::round_to_bf16(wr);
      }
      std::vector<float> x_conv, add_conv;
      run_layout_roundtrip(be, s, xf, x_conv);
      run_layout_roundtrip(be, s, addf, add_conv);
      std::vector<float> x_in = x_conv;
      if (low) {
        x_in.assign(static_cast<size_t>(be.conv_input_size(s)), 0.0f);
        be.to_conv_input(s, x_conv.data(), x_in.data());
      }
      std::vector<float> w(static_cast<size_t>(be.conv_weights_size(s, ConvPass::forward)));
      be.weights_to_conv_layout(s, ConvPass::forward, wf.data(), w.data());
      check_forward_passes(be, s, x_in, w, add_conv, ref::conv_forward(d, xr, wr), ref::to_double(addf));

      const auto dyf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
      std::vector<float> dy_conv;
      run_layout_roundtrip(be, s, dyf, dy_conv);
      if (low) {  // a stacked batch of 2, as SocConv runs it
        const std::string stacked =
            check_stacked_bf16_backward_weights(be, s, x_conv, dy_conv, xr, ref::round_to_bf16(ref::to_double(dyf)));
        CHECK(stacked.find("bwd-weights pixel matmul brg") != std::string::npos);
      } else {
        INFO("backward-weights is the weight gradient, plain layout");
        std::vector<float> dw(static_cast<size_t>(d.weight_size()), 7.0f);
        be.conv_backward_weights(s, x_conv.data(), dy_conv.data(), dw.data());
        CHECK(ref::max_relative_error(ref::to_double(dw), ref::conv_backward_weights(d, xr, ref::to_double(dyf))) <
              kConvTolerance);
      }
    }
  }
  const ConvShape pointwise = conv_of(3, 32, 2, 2, 1, 1);  // k = 1 at 2x2: one pixel reaches only itself
  CHECK(implementation(be, pointwise).find("pixel matmul") == std::string::npos);
}

// conv_forward_scaled_to_input (SocConv's forward Horner steps where both bf16 passes run: oneDNN's bf16 dst after
// the float32 accumulation and addend; the pixel matmul rounds its float32 result) gives the very bits of
// conv_forward_scaled followed by to_conv_input, and leaves the scratch buffer alone where it fuses. Shapes: AMX
// nhwc (grouped and the 8-channel groups run dense), the blocked layout, and the pixel matmul at 2x2 and 1x1.
TEST_CASE("bf16 forward with a rounded destination equals the float32 forward rounded, bit for bit",
          "[backend][conv][bf16]") {
  ref::AlwaysBf16 always;
  auto& be = *orthoconv::cpu_backend();
  if (!ref::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: the rounded forward is not tested");
    return;
  }
  struct Case {
    int64_t channels, height, width, kernel, groups;
  };
  uint64_t seed = 1500;
  for (const Case& c : {Case{32, 6, 5, 3, 4}, Case{64, 5, 7, 3, 4}, Case{48, 5, 7, 3, 1}, Case{32, 2, 2, 3, 2},
                        Case{64, 1, 1, 1, 1}, Case{16, 5, 7, 1, 1}}) {
    const ConvShape s = conv_of(4, c.channels, c.height, c.width, c.kernel, c.groups, orthoconv::ConvPrecision::bf16);
    REQUIRE(be.conv_precision(s, ConvPass::forward) == orthoconv::ConvPrecision::bf16);
    const ref::ConvDims d = dims_of(s);
    INFO("shape " << s.str() << ": " << implementation(be, s));
    const auto xf = ref::to_float(ref::random_normal(d.input_size(), ++seed));
    const auto wf = ref::to_float(ref::random_normal(d.weight_size(), ++seed, 1.0 / std::sqrt(double(c.channels))));
    const auto addf = ref::to_float(ref::random_normal(d.output_size(), ++seed));
    std::vector<float> x_conv, add_conv;
    run_layout_roundtrip(be, s, xf, x_conv);
    run_layout_roundtrip(be, s, addf, add_conv);
    std::vector<float> x_in(static_cast<size_t>(be.conv_input_size(s)));
    be.to_conv_input(s, x_conv.data(), x_in.data());
    std::vector<float> w(static_cast<size_t>(be.conv_weights_size(s, ConvPass::forward)));
    be.weights_to_conv_layout(s, ConvPass::forward, wf.data(), w.data());
    for (float alpha : {1.0f, -0.25f, 1.0f / 3.0f})
      for (bool with_addend : {true, false}) {
        INFO("alpha " << alpha << (with_addend ? ", with" : ", without") << " the float32 addend");
        const float* addend = with_addend ? add_conv.data() : nullptr;
        std::vector<float> full(add_conv.size()), want(x_in.size()), got(x_in.size(), 7.0f), scratch(add_conv.size());
        be.conv_forward_scaled(s, x_in.data(), w.data(), alpha, addend, full.data());
        be.to_conv_input(s, full.data(), want.data());
        be.conv_forward_scaled_to_input(s, x_in.data(), w.data(), alpha, addend, scratch.data(), got.data());
        CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0);
        CHECK(std::all_of(scratch.begin(), scratch.end(), [](float v) { return v == 0.0f; }));  // fused
      }
  }
}
