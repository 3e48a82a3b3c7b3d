// Gradients of every layer against central finite differences of the DOUBLE reference (reference.hpp) of the
// same function: same M, bias, power-iteration vectors u, v (held fixed; sigma = min_i <A, u_i (x) v_i> is
// recomputed from the perturbed M, so the sigma path is differentiated too), same number of series terms.
// The float32 analytic gradients come from Layer::backward of the scalar loss L(x, M, b) = <w, f(x)>.
// Forward outputs and sigma are compared with the reference as well.
//
// Tolerances (all as max |error| / max |reference|), from float32 rounding (6e-8 per operation) growing like
// sqrt(number of operations) in these random-sign sums:
//  - forward 1e-5: K <= 12 convolutions of <= C k^2 = 144 products each: ~1e-6 (the bound of one convolution).
//  - sigma 1e-6: a double sum of float32 products, rounded once to float32 (6e-8).
//  - every gradient 1e-5: the backward series is the same kind of computation as the forward; dL/dA_n sums
//    K N H W <= 250 products per entry, and the sigma path adds one O(1) correction computed the same way. The
//    errors observed are <= 1e-6. A modelling error (a missing term, the sigma path left out, a wrong sign or
//    transpose) is O(1e-2) or larger: "the sigma path changes the M gradient" below shows it for the sigma path.
//  The finite differences themselves (step 1e-5, double) are exact to ~1e-9 relative (O(h^2) truncation of a
//  smooth function, 1e-16 / h rounding), far below these bounds.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <functional>

#include "reference.hpp"

using namespace orthoconv;
namespace ref = orthoconv::reference;
using ref::Vec;

namespace {

constexpr double kForwardTolerance = 1e-5;
constexpr double kSigmaTolerance = 1e-6;
constexpr double kInputGradTolerance = 1e-5;
constexpr double kWeightGradTolerance = 1e-5;
constexpr double kStep = 1e-5;

// Float32-representable random data (so the reference sees exactly what the layer sees).
Vec random_input(int64_t count, uint64_t seed) {
  return ref::to_double(ref::to_float(ref::random_normal(static_cast<size_t>(count), seed)));
}

void check_gradient(const std::string& what, const Vec& analytic, const std::function<double(const Vec&)>& loss,
                    const Vec& at, double tolerance) {
  const Vec numeric = ref::finite_difference_gradient(loss, at, kStep);
  const double error = ref::max_relative_error(analytic, numeric);
  double largest = 0.0;
  for (double v : numeric) largest = std::max(largest, std::abs(v));
  INFO(what << ": max |analytic - finite difference| / max |finite difference| = " << error << " (max |gradient| "
            << largest << ")");
  CHECK(largest > 1e-3);  // a vanishing gradient would make the comparison vacuous
  if (std::getenv("ORTHOCONV_TEST_VERBOSE")) WARN(what << " error " << error);
  CHECK(error < tolerance);
}

Vec grad_of(Parameter& p) { return ref::to_double(p.grad); }

// Forward + backward of `layer` on (x, w); returns the input gradient. Parameter gradients are in the layer.
Vec run_layer(Layer& layer, const Shape& input_shape, const Vec& x, const Vec& w, Vec* output = nullptr) {
  Tensor xt = ref::to_tensor(x, input_shape), y, dx;
  layer.zero_grad();
  layer.forward(xt, y);
  REQUIRE(static_cast<size_t>(y.numel()) == w.size());
  layer.backward(ref::to_tensor(w, y.shape()), dx);
  REQUIRE(dx.shape() == input_shape);
  if (output) *output = ref::to_double(y);
  return ref::to_double(dx);
}

void check_soc(const SocConfig& config, const Shape& in, bool training) {
  SocConv layer(config);
  layer.set_training(training);
  INFO(layer.describe() << ", input " << in.str() << (training ? ", training" : ", evaluation"));
  const int64_t n = in[0], h = in[2], wd = in[3];
  const Vec x = random_input(in.numel(), config.seed + 1000);
  const Vec w = random_input(layer.output_shape(in).numel(), config.seed + 2000);
  Vec y;
  const Vec dx = run_layer(layer, in, x, w, &y);
  if (config.path != SocPath::automatic) REQUIRE(layer.last_path() == config.path);

  // The function the forward computed: the layer's M, bias and (updated) u, v.
  ref::SocParams p = ref::soc_params(layer);
  REQUIRE(p.terms == (training ? config.train_terms : config.eval_terms));
  const Vec sigma = ref::soc_sigma(p);
  CHECK(ref::max_relative_error(ref::to_double(layer.sigma()), sigma) < kSigmaTolerance);
  CHECK(ref::max_relative_error(y, ref::soc_forward(p, x, n, h, wd)) < kForwardTolerance);

  check_gradient(
      "input", dx, [&](const Vec& v) { return ref::dot(w, ref::soc_forward(p, v, n, h, wd)); }, x, kInputGradTolerance);
  ref::SocParams q = p;
  check_gradient(
      "M (through the series, sigma and the skew)", grad_of(layer.weight()),
      [&](const Vec& m) {
        q.weight = m;
        return ref::dot(w, ref::soc_forward(q, x, n, h, wd));
      },
      p.weight, kWeightGradTolerance);
  if (config.bias) {
    q = p;
    check_gradient(
        "bias", grad_of(layer.bias()),
        [&](const Vec& b) {
          q.bias = b;
          return ref::dot(w, ref::soc_forward(q, x, n, h, wd));
        },
        p.bias, kInputGradTolerance);
  }
}

SocConfig soc(int64_t c_in, int64_t c_out, int64_t kernel, int64_t groups, int64_t stride, uint64_t seed) {
  SocConfig c;
  c.in_channels = c_in;
  c.out_channels = c_out;
  c.kernel = kernel;
  c.groups = groups;
  c.stride = stride;
  c.seed = seed;
  return c;
}

}  // namespace

TEST_CASE("SocConv gradients (input, M through sigma, bias) match finite differences: stride 1, kernels 1/3/5",
          "[soc][gradient]") {
  SECTION("8 -> 8, k3") { check_soc(soc(8, 8, 3, 1, 1, 1), Shape{2, 8, 5, 5}, true); }
  SECTION("8 -> 8, k1") { check_soc(soc(8, 8, 1, 1, 1, 2), Shape{2, 8, 5, 5}, true); }
  SECTION("4 -> 4, k5") { check_soc(soc(4, 4, 5, 1, 1, 3), Shape{2, 4, 5, 6}, true); }
  SECTION("8 -> 8, k3, evaluation mode (12 terms)") { check_soc(soc(8, 8, 3, 1, 1, 4), Shape{1, 8, 5, 5}, false); }
  SECTION("8 -> 8, k3, no bias, correction 0.5") {
    SocConfig c = soc(8, 8, 3, 1, 1, 5);
    c.bias = false;
    c.correction = 0.5f;
    check_soc(c, Shape{2, 8, 4, 4}, true);
  }
}

TEST_CASE("the sigma path changes the M gradient: holding sigma fixed gives a different gradient", "[soc][gradient]") {
  // Guards the test above: if backward left out the gradient through sigma, the finite differences (which
  // recompute sigma from the perturbed M) would disagree by far more than the tolerance.
  SocConv layer(soc(8, 8, 3, 1, 1, 71));
  const Shape in{1, 8, 4, 4};
  const Vec x = random_input(in.numel(), 72), w = random_input(in.numel(), 73);
  run_layer(layer, in, x, w);
  ref::SocParams frozen = ref::soc_params(layer);
  frozen.sigma = ref::soc_sigma(frozen);
  const Vec weight = frozen.weight;
  const Vec without_sigma_path = ref::finite_difference_gradient(
      [&](const Vec& m) {
        frozen.weight = m;
        return ref::dot(w, ref::soc_forward(frozen, x, 1, 4, 4));
      },
      weight, kStep);
  CHECK(ref::max_relative_error(grad_of(layer.weight()), without_sigma_path) > 100 * kWeightGradTolerance);
}

TEST_CASE("SocConv gradients match finite differences: grouped, truncating, keep per group, zero channels",
          "[soc][gradient]") {
  SECTION("grouped 8 -> 8, g2, k3") { check_soc(soc(8, 8, 3, 2, 1, 11), Shape{2, 8, 5, 5}, true); }
  // (C = 4 per group: with C = 2 a 1x1 skew filter is one number and A / sigma(A) is constant, so the gradient
  // in M vanishes and there would be nothing to compare.)
  SECTION("grouped 16 -> 16, g4, k1") { check_soc(soc(16, 16, 1, 4, 1, 12), Shape{2, 16, 3, 3}, true); }
  SECTION("truncating 8 -> 4, k3") { check_soc(soc(8, 4, 3, 1, 1, 13), Shape{2, 8, 5, 5}, true); }
  SECTION("truncating 8 -> 4, g2, keep per group") {
    SocConfig c = soc(8, 4, 3, 2, 1, 14);
    c.keep = KeepChannels::per_group;
    check_soc(c, Shape{2, 8, 5, 5}, true);
  }
  SECTION("zero channels appended 4 -> 8, k3") { check_soc(soc(4, 8, 3, 1, 1, 15), Shape{2, 4, 5, 5}, true); }
}

TEST_CASE("SocConv stride-2 gradients match finite differences", "[soc][gradient]") {
  SECTION("2 -> 8, k3 (c_out = 4 c_in)") { check_soc(soc(2, 8, 3, 1, 2, 21), Shape{2, 2, 6, 4}, true); }
  SECTION("2 -> 4, k3, g2 (truncating)") { check_soc(soc(2, 4, 3, 2, 2, 22), Shape{2, 2, 4, 4}, true); }
  SECTION("2 -> 8, k1") { check_soc(soc(2, 8, 1, 1, 2, 23), Shape{2, 2, 4, 4}, true); }
  SECTION("3 -> 16, k3, zero channels appended after the unshuffle") {
    check_soc(soc(3, 16, 3, 2, 2, 24), Shape{1, 3, 4, 4}, true);
  }
}

TEST_CASE("1x1 SocConv gradients match finite differences on the series and the matrix path (conv and GEMM)",
          "[soc][gradient]") {
  for (SocPath path : {SocPath::series, SocPath::matrix_conv, SocPath::matrix_gemm}) {
    INFO("path " << soc_path_name(path));
    auto with_path = [path](SocConfig c) {
      c.path = path;
      return c;
    };
    check_soc(with_path(soc(8, 8, 1, 1, 1, 31)), Shape{2, 8, 3, 3}, true);
    check_soc(with_path(soc(8, 8, 1, 1, 1, 32)), Shape{1, 8, 3, 3}, false);  // 12 terms
    check_soc(with_path(soc(16, 16, 1, 4, 1, 33)), Shape{2, 16, 2, 3}, true);
    check_soc(with_path(soc(2, 8, 1, 1, 2, 34)), Shape{2, 2, 4, 4}, true);    // stride 2, c_out = 4 c_in
    check_soc(with_path(soc(4, 8, 1, 2, 2, 35)), Shape{1, 4, 4, 4}, true);    // stride 2, half kept
    check_soc(with_path(soc(12, 4, 1, 1, 1, 36)), Shape{3, 12, 1, 1}, true);  // a head: truncating, 1 x 1
    SocConfig one_term = with_path(soc(8, 8, 1, 2, 1, 37));
    one_term.train_terms = 1;
    check_soc(one_term, Shape{2, 8, 2, 2}, true);
  }
}

namespace {

void check_gs(int64_t c_in, int64_t c_out, int64_t a, std::optional<int64_t> b, bool paired, int64_t stride,
              const Shape& in, uint64_t seed) {
  GsSocConfig config;
  config.base = soc(c_in, c_out, 3, 1, stride, seed);
  config.groups = GroupCounts{a, b};
  config.paired = paired;
  GsSocConv layer(config);
  INFO(layer.describe() << ", input " << in.str());
  const int64_t n = in[0], h = in[2], wd = in[3];
  const Vec x = random_input(in.numel(), seed + 1000);
  const Vec w = random_input(layer.output_shape(in).numel(), seed + 2000);
  Vec y;
  const Vec dx = run_layer(layer, in, x, w, &y);

  const ref::GsSocParams p = ref::gs_soc_params(layer);
  CHECK(ref::max_relative_error(y, ref::gs_soc_forward(p, x, n, h, wd)) < kForwardTolerance);
  auto loss_of = [&](const ref::GsSocParams& params, const Vec& input) {
    return ref::dot(w, ref::gs_soc_forward(params, input, n, h, wd));
  };
  check_gradient(
      "input", dx, [&](const Vec& v) { return loss_of(p, v); }, x, kInputGradTolerance);
  ref::GsSocParams q = p;
  check_gradient(
      "first M", grad_of(layer.first().weight()),
      [&](const Vec& m) {
        q.first.weight = m;
        return loss_of(q, x);
      },
      p.first.weight, kWeightGradTolerance);
  q = p;
  check_gradient(
      "first bias", grad_of(layer.first().bias()),
      [&](const Vec& v) {
        q.first.bias = v;
        return loss_of(q, x);
      },
      p.first.bias, kInputGradTolerance);
  if (layer.second()) {
    q = p;
    check_gradient(
        "second M", grad_of(layer.second()->weight()),
        [&](const Vec& m) {
          q.second.weight = m;
          return loss_of(q, x);
        },
        p.second.weight, kWeightGradTolerance);
    q = p;
    check_gradient(
        "second bias", grad_of(layer.second()->bias()),
        [&](const Vec& v) {
          q.second.bias = v;
          return loss_of(q, x);
        },
        p.second.bias, kInputGradTolerance);
  }
}

}  // namespace

TEST_CASE("GsSocConv gradients (input, both M, both biases) match finite differences", "[gs-soc][gradient]") {
  SECTION("(4,1)") { check_gs(8, 8, 4, 1, false, 1, Shape{2, 8, 4, 4}, 41); }
  SECTION("(2,4) paired") { check_gs(16, 16, 2, 4, true, 1, Shape{1, 16, 3, 3}, 42); }
  SECTION("(4,-)") { check_gs(8, 8, 4, std::nullopt, false, 1, Shape{2, 8, 4, 4}, 43); }
  SECTION("(4,2) stride 2, 4 -> 16") { check_gs(4, 16, 4, 2, false, 2, Shape{1, 4, 4, 4}, 44); }
  SECTION("(4,1), input shuffle skipped (6 channels)") { check_gs(6, 8, 4, 1, false, 1, Shape{1, 6, 4, 4}, 45); }
}

TEST_CASE("MaxMin forward is exact and its gradient matches finite differences (plain and paired)",
          "[maxmin][gradient]") {
  for (bool paired : {false, true}) {
    MaxMin layer(paired);
    INFO(layer.kind());
    const Shape in{2, 6, 3, 4};
    const Vec x = random_input(in.numel(), paired ? 51 : 52);
    const Vec w = random_input(in.numel(), 53);
    Vec y;
    const Vec dx = run_layer(layer, in, x, w, &y);
    CHECK(y == ref::maxmin(x, 2, 6, 12, paired));  // min and max are exact in float32
    // The step (1e-5) is far below the smallest gap between paired inputs, so no min/max switches sides.
    check_gradient(
        "input", dx, [&](const Vec& v) { return ref::dot(w, ref::maxmin(v, 2, 6, 12, paired)); }, x, 1e-8);
  }
}

TEST_CASE("MaxMin sends tied gradients to min = first input, max = second input", "[maxmin][gradient]") {
  for (bool paired : {false, true}) {
    MaxMin layer(paired);
    const Shape in{1, 4, 1, 1};
    // Channels: plain pairs (0, 2), (1, 3); paired pairs (0, 1), (2, 3). All values equal: every pair ties.
    Tensor x = Tensor::from_vector({1.5f, 1.5f, 1.5f, 1.5f}, in), y, dx;
    layer.forward(x, y);
    layer.backward(Tensor::from_vector({10.0f, 20.0f, 30.0f, 40.0f}, in), dx);
    // The Jacobian stays a permutation: the gradient is the upstream gradient, unpermuted.
    CHECK(dx.to_vector() == std::vector<float>{10.0f, 20.0f, 30.0f, 40.0f});
  }
}

TEST_CASE("ChannelShuffle gradient is the inverse permutation (finite differences)", "[shuffle][gradient]") {
  for (bool paired : {false, true})
    for (bool inverse : {false, true}) {
      ChannelShuffle layer(8, 2, paired, inverse);
      INFO(layer.describe());
      const Shape in{2, 8, 2, 3};
      const Vec x = random_input(in.numel(), 61), w = random_input(in.numel(), 62);
      const Vec dx = run_layer(layer, in, x, w);
      const auto dest = ref::shuffle_destination(8, 2, paired);
      check_gradient(
          "input", dx, [&](const Vec& v) { return ref::dot(w, ref::permute_channels(v, dest, 2, 8, 6, inverse)); }, x,
          1e-8);
    }
}
