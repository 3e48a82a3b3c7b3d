// Orthogonality of the layers, from their full Jacobians (layer_jacobian: impulse responses on [1, C, H, W]) in
// evaluation mode with 12 series terms. Inputs are small (mostly 4x4: the cost grows like (C H W)^2, and oneDNN
// runs its slow reference kernel when channels per group are not a multiple of 16).
//
// Tolerance 1e-5 on the singular values: the truncation error of the series is sum_{i>12} rho^i / i! < 1e-9 for
// ||A_n|| = rho <= 1, and each output is float32 arithmetic over 12 convolutions whose rounding (6e-8 per
// operation, sqrt-growth over ~C k^2 terms) moves a singular value by ~1e-6.
// Square layers: every singular value in [1 - 1e-5, 1 + 1e-5]. Layers that drop channels (truncating, stride 2
// with c_out < 4 c_in): every singular value <= 1 + 1e-5 (a coordinate projection of an orthogonal map).
// Layers that append zero channels (c_out > c_in s^2) or stride 2 with c_out = 4 c_in: isometries, all == 1.
#include <catch2/catch.hpp>

#include "reference.hpp"

using namespace orthoconv;

namespace {

constexpr double kOrthTolerance = 1e-5;

std::vector<double> eval_singular_values(Layer& layer, const Shape& input) {
  layer.set_training(false);
  return singular_values(layer_jacobian(layer, input));
}

// Every layer here is Q, P Q or Q P' with Q orthogonal, P a row selection (dropped channels) and P' a zero
// extension (appended channels): J^T J = I (out >= in) or J J^T = I (out < in). So all min(in, out) singular values
// are 1; in particular all are <= 1 + 1e-5 (1-Lipschitz), and for square layers all are in [1 - 1e-5, 1 + 1e-5].
void check_singular_values_one(Layer& layer, const Shape& input) {
  INFO(layer.describe() << " on " << input.str());
  auto sv = eval_singular_values(layer, input);
  REQUIRE(static_cast<int64_t>(sv.size()) == std::min(input.numel(), layer.output_shape(input).numel()));
  CHECK(sv.front() <= 1.0 + kOrthTolerance);
  CHECK(sv.back() >= 1.0 - kOrthTolerance);
}

void check_isometry(Layer& layer, const Shape& input) { check_singular_values_one(layer, input); }

// Truncating layers: the requirement is sv <= 1 + 1e-5; the kept directions are exactly 1 as well.
void check_contraction(Layer& layer, const Shape& input) {
  REQUIRE(layer.output_shape(input).numel() < input.numel());
  check_singular_values_one(layer, input);
}

SocConfig soc(int64_t c_in, int64_t c_out, int64_t kernel, int64_t groups = 1, int64_t stride = 1, uint64_t seed = 1) {
  SocConfig c;
  c.in_channels = c_in;
  c.out_channels = c_out;
  c.kernel = kernel;
  c.groups = groups;
  c.stride = stride;
  c.seed = seed;
  return c;
}

GsSocConfig gs(int64_t c_in, int64_t c_out, int64_t a, std::optional<int64_t> b, bool paired = false,
               int64_t stride = 1, uint64_t seed = 3) {
  GsSocConfig g;
  g.base = soc(c_in, c_out, 3, 1, stride, seed);
  g.groups = GroupCounts{a, b};
  g.paired = paired;
  return g;
}

}  // namespace

TEST_CASE("SocConv in evaluation mode is orthogonal: all Jacobian singular values are 1 +- 1e-5",
          "[soc][orthogonality]") {
  uint64_t seed = 1;
  for (int64_t groups : {1, 2, 4})
    for (int64_t kernel : {1, 3, 5}) {
      SocConv layer(soc(8, 8, kernel, groups, 1, ++seed));
      REQUIRE(layer.terms() == 5);
      layer.set_training(false);
      REQUIRE(layer.terms() == 12);
      check_isometry(layer, Shape{1, 8, 4, 4});
    }
  SocConv example(soc(8, 8, 3, 1, 1, 98));  // the example size
  check_isometry(example, Shape{1, 8, 6, 6});
  SocConv wide(soc(16, 16, 3, 1, 1, 99));
  check_isometry(wide, Shape{1, 16, 5, 5});
}

TEST_CASE("the Jacobian check can fail: an inflated series scale breaks orthogonality", "[soc][orthogonality]") {
  // Correction 1.4 instead of 0.7 doubles A_n; the layer computes exp(A_n) of a skew matrix still (orthogonal if
  // the series converged), so make the series too short to converge: 2 terms. Then singular values leave 1.
  SocConfig c = soc(8, 8, 3);
  c.correction = 1.4f;
  c.eval_terms = 2;
  SocConv layer(c);
  auto sv = eval_singular_values(layer, Shape{1, 8, 4, 4});
  CHECK(sv.front() > 1.0 + 100 * kOrthTolerance);
}

TEST_CASE("SocConv stride 2 and channel-changing layers: isometries are exact, truncations contract",
          "[soc][orthogonality]") {
  SECTION("stride 2, c_out = 4 c_in: orthogonal") {
    SocConv layer(soc(4, 16, 3, 1, 2, 5));
    check_isometry(layer, Shape{1, 4, 6, 6});
  }
  SECTION("stride 2, grouped, c_out = 4 c_in: orthogonal") {
    SocConv layer(soc(4, 16, 3, 4, 2, 6));
    check_isometry(layer, Shape{1, 4, 4, 4});
  }
  SECTION("stride 2, c_out = 2 c_in (truncating): contraction") {
    SocConv layer(soc(4, 8, 3, 1, 2, 7));
    check_contraction(layer, Shape{1, 4, 6, 6});
  }
  SECTION("stride 1, c_out < c_in (truncating): contraction") {
    SocConv layer(soc(8, 4, 3, 1, 1, 8));
    check_contraction(layer, Shape{1, 8, 4, 4});
  }
  SECTION("stride 1, c_out < c_in, keep per group: contraction") {
    SocConfig c = soc(8, 4, 3, 2, 1, 9);
    c.keep = KeepChannels::per_group;
    SocConv layer(c);
    check_contraction(layer, Shape{1, 8, 4, 4});
  }
  SECTION("stride 1, c_out > c_in (zero channels appended): isometry") {
    SocConv layer(soc(4, 8, 3, 1, 1, 10));
    check_isometry(layer, Shape{1, 4, 4, 4});
  }
}

TEST_CASE("GsSocConv in evaluation mode is orthogonal for (4,1), (4,2), (2,4), (4,-) and paired shuffles",
          "[gs-soc][orthogonality]") {
  struct Case {
    int64_t channels, a;
    std::optional<int64_t> b;
    bool paired;
  };
  const Case cases[] = {{8, 4, 1, false}, {8, 4, 2, false}, {8, 2, 4, false}, {8, 4, std::nullopt, false},
                        {8, 4, 1, true},  {8, 2, 2, true},  {16, 4, 2, true}, {16, 4, std::nullopt, true},
                        {16, 2, 4, false}};
  uint64_t seed = 20;
  for (const Case& c : cases) {
    GsSocConv layer(gs(c.channels, c.channels, c.a, c.b, c.paired, 1, ++seed));
    check_isometry(layer, Shape{1, c.channels, 4, 4});
  }
}

TEST_CASE("GsSocConv with stride 2 or truncation: isometric when c_out = 4 c_in, else contracting",
          "[gs-soc][orthogonality]") {
  SECTION("(4,1) stride 2, 4 -> 16: orthogonal") {
    GsSocConv layer(gs(4, 16, 4, 1, false, 2, 31));
    check_isometry(layer, Shape{1, 4, 4, 4});
  }
  SECTION("(4,2) paired stride 2, 8 -> 16 (truncating): contraction") {
    GsSocConv layer(gs(8, 16, 4, 2, true, 2, 32));
    check_contraction(layer, Shape{1, 8, 4, 4});
  }
  SECTION("(2,-) stride 2, 4 -> 8: contraction") {
    GsSocConv layer(gs(4, 8, 2, std::nullopt, false, 2, 33));
    check_contraction(layer, Shape{1, 4, 4, 4});
  }
  SECTION("(4,1), input channels not divisible by a (input shuffle skipped), 6 -> 8: isometry") {
    GsSocConv layer(gs(6, 8, 4, 1, false, 1, 34));
    REQUIRE_FALSE(layer.shuffles_input());
    check_isometry(layer, Shape{1, 6, 4, 4});
  }
}

TEST_CASE("GsSocConv (4,1) and 1x1 SocConvs on the matrix path are orthogonal: singular values 1 +- 1e-5",
          "[gs-soc][matrix][orthogonality]") {
  for (SocPath variant : {SocPath::matrix_conv, SocPath::matrix_gemm}) {
    INFO(soc_path_name(variant));
    for (int64_t channels : {16, 32}) {
      GsSocConfig config = gs(channels, channels, 4, 1, false, 1, 40 + static_cast<uint64_t>(channels));
      config.base.path = variant;  // for the 1x1 stage; the 3x3 one takes the series
      GsSocConv layer(config);
      REQUIRE(layer.second()->config().path == variant);
      check_isometry(layer, Shape{1, channels, 4, 4});
      CHECK(layer.second()->last_path() == variant);
    }
    SocConfig grouped = soc(8, 8, 1, 2, 1, 45);
    grouped.path = variant;
    SocConv plain(grouped);
    check_isometry(plain, Shape{1, 8, 4, 4});
    SocConfig strided = soc(4, 16, 1, 1, 2, 46);  // c_out = 4 c_in: an isometry
    strided.path = variant;
    SocConv down(strided);
    check_isometry(down, Shape{1, 4, 4, 4});
    CHECK(down.last_path() == variant);
  }
  SocConfig grouped = soc(8, 8, 1, 2, 1, 45);
  grouped.path = SocPath::matrix;

  // The check can fail here too: a doubled A_n with a 2-term series is not orthogonal.
  SocConfig inflated = grouped;
  inflated.correction = 2.0f;
  inflated.eval_terms = 2;
  SocConv broken(inflated);
  CHECK(eval_singular_values(broken, Shape{1, 8, 4, 4}).front() > 1.0 + 100 * kOrthTolerance);
}

TEST_CASE("ChannelShuffle is orthogonal (a permutation matrix)", "[shuffle][orthogonality]") {
  ChannelShuffle shuffle(8, 4, true);
  auto jac = layer_jacobian(shuffle, Shape{1, 8, 2, 3});
  for (double v : jac.values) CHECK((v == 0.0 || v == 1.0));
  auto sv = singular_values(jac);
  CHECK(sv.front() == Approx(1.0).margin(1e-12));
  CHECK(sv.back() == Approx(1.0).margin(1e-12));
}
