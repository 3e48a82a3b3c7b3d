// The float64 certifying pass (certifying_pass.hpp) against an independent double reference of the whole model,
// against the float32 model, and its rounding analysis (network_bound.hpp) against the rounding it really does.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>

#include "orthoconv/certifying_pass.hpp"
#include "orthoconv/network_bound.hpp"
#include "reference.hpp"

using namespace orthoconv;
namespace ref = orthoconv::reference;

namespace {

struct Variant {
  const char* name;
  ModelConfig config;
};

std::vector<Variant> variants() {
  std::vector<Variant> out;
  ModelConfig base;
  base.depth = 5;
  base.init_channels = 4;
  base.classes = 10;
  base.seed = 17;
  ModelConfig gs = base;
  gs.conv = ConvKind::gs_soc;
  gs.groups = GroupCounts{2, 1};
  out.push_back({"gs-soc(2,1), soc head", gs});
  ModelConfig soc = base;
  soc.conv = ConvKind::soc;
  soc.groups = GroupCounts{2, std::nullopt};
  soc.head = HeadKind::lln;
  out.push_back({"soc(g2), lln head", soc});
  ModelConfig paired = gs;
  paired.groups = GroupCounts{2, std::nullopt};
  paired.activation = ActivationKind::maxmin_paired;
  paired.keep = KeepChannels::per_group;
  out.push_back({"gs-soc(2,-), paired MaxMin, keep per group", paired});
  ModelConfig ten = gs;
  ten.depth = 10;
  ten.groups = GroupCounts{2, 2};
  out.push_back({"LipConvnet-10 gs-soc(2,2)", ten});
  return out;
}

std::vector<uint8_t> random_pixels(int64_t n, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<uint8_t> p(static_cast<size_t>(n * kCifarPixels));
  for (auto& v : p) v = static_cast<uint8_t>(rng() % 256);
  return p;
}

// A SocConv's reference parameters with the layer's own float32 A_n, so that the reference computes exactly the
// function the certifying pass does (the reference's own sigma would differ in the 7th digit).
ref::SocParams given_filter(SocConv& soc) {
  ref::SocParams p = ref::soc_params(soc);
  p.scaled = ref::to_double(soc.scaled_filter());
  return p;
}

// The whole LipConvnet in double, from the reference's pieces, step by step along model.steps() (which the
// "[steps]" tests check against the model's own forward): x0 = (p/255 - mean)/std, then each shuffle, SocConv,
// MaxMin, the flatten and the head.
ref::Vec reference_logits(LipConvnet& model, const Normalization& norm, const uint8_t* pixels) {
  const int64_t side = model.config().input_side, plane = side * side;
  ref::Vec x(static_cast<size_t>(3 * plane));
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t i = 0; i < plane; ++i)
      x[static_cast<size_t>(c * plane + i)] =
          (pixels[c * plane + i] / 255.0 - static_cast<double>(norm.mean[c])) / static_cast<double>(norm.std[c]);
  for (const NetworkStep& step : model.steps()) {
    const int64_t channels = step.input[1], h = step.input[2];
    switch (step.kind) {
      case StepKind::shuffle: {
        const std::vector<int32_t>& destination = step.shuffle->destination();
        x = ref::permute_channels(x, std::vector<int64_t>(destination.begin(), destination.end()), 1, channels, h * h);
        break;
      }
      case StepKind::soc:
        x = ref::soc_forward(given_filter(*step.soc), x, 1, h, h);
        break;
      case StepKind::maxmin:
        x = ref::maxmin(x, 1, channels, h * h, step.maxmin->paired());
        break;
      case StepKind::flatten:  // C, H, W order: the same values
        break;
      case StepKind::lln: {
        const int64_t features = channels;
        const std::vector<double> q = step.lln->normalized_rows();
        const ref::Vec b = ref::to_double(step.lln->bias().value);
        ref::Vec y(static_cast<size_t>(model.config().classes));
        for (size_t i = 0; i < y.size(); ++i) {
          double sum = b[i];
          for (int64_t f = 0; f < features; ++f)
            sum += q[i * static_cast<size_t>(features) + static_cast<size_t>(f)] * x[static_cast<size_t>(f)];
          y[i] = sum;
        }
        x = y;
        break;
      }
    }
  }
  return x;
}

double max_abs(const double* v, int64_t n) {
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(v[i]));
  return m;
}

// What the rounding bound promises for one image: the l2 norm of the logit error (soc head), or the largest
// per-logit error (lln head, including each logit's own u |y_i|).
double observed_error(const NetworkBound& bound, const double* a, const double* b, int64_t classes) {
  double sum = 0.0, largest = 0.0;
  for (int64_t j = 0; j < classes; ++j) {
    const double d = std::abs(a[j] - b[j]);
    sum += d * d;
    largest = std::max(largest, d - bound.unit * std::abs(b[j]));
  }
  return bound.lln ? largest : std::sqrt(sum);
}

// ||x0|| of one image as the certifying pass normalizes it.
double input_norm(const Float64Network& pass, const uint8_t* pixels) {
  double sum = 0.0;
  for (double x : pass.normalize(pixels)) sum += x * x;
  return std::sqrt(sum);
}

}  // namespace

TEST_CASE("float64 certifying pass equals an independent double reference of the whole model", "[certifying]") {
  for (const Variant& v : variants()) {
    SECTION(v.name) {
      LipConvnet model(v.config);
      model.set_training(false);
      Normalization norm;
      norm.std = {0.2f, 0.25f, 0.3f};
      const int64_t n = 3, classes = v.config.classes;
      const std::vector<uint8_t> pixels = random_pixels(n, 7);
      Float64Network pass(model, norm, model.config().eval_terms);
      REQUIRE(pass.classes() == classes);
      std::vector<double> logits(static_cast<size_t>(n * classes));
      pass.forward(pixels.data(), n, logits.data());
      for (int64_t i = 0; i < n; ++i) {
        const ref::Vec expected = reference_logits(model, norm, pixels.data() + i * kCifarPixels);
        // Both are double: ~1e-16 per operation over a few thousand operations per logit (the Horner form and the
        // reference's sum of terms round differently), far below 1e-10 of the logits' scale.
        const double scale = max_abs(expected.data(), classes);
        REQUIRE(scale > 1e-3);
        for (int64_t j = 0; j < classes; ++j)
          CHECK(std::abs(logits[static_cast<size_t>(i * classes + j)] - expected[static_cast<size_t>(j)]) <=
                1e-10 * scale);
      }
    }
  }
}

TEST_CASE("float64 pass and float32 model differ by no more than their two rounding bounds", "[certifying]") {
  for (const Variant& v : variants()) {
    SECTION(v.name) {
      LipConvnet model(v.config);
      model.set_training(false);
      Normalization norm;
      const int64_t n = 4, classes = v.config.classes, terms = model.config().eval_terms;
      CifarSplit split;
      split.pixels = random_pixels(n, 9);
      split.fine_labels.assign(n, 0);
      split.coarse_labels.assign(n, 0);
      std::vector<int64_t> indices{0, 1, 2, 3};
      const NetworkBound b32 = verify_network(model, static_cast<int>(terms), Precision::float32, norm);
      const NetworkBound b64 = verify_network(model, static_cast<int>(terms), Precision::float64, norm);
      std::vector<float> f32;
      for_each_evaluation_batch(model, split, indices, norm, 8,
                                [&](const Batch&, const std::vector<float>& logits) { f32 = logits; });
      Float64Network pass(model, norm, static_cast<int>(terms));
      std::vector<double> f64(static_cast<size_t>(n * classes));
      pass.forward(split.pixels.data(), n, f64.data());
      for (int64_t i = 0; i < n; ++i) {
        std::vector<double> row32(f32.begin() + i * classes, f32.begin() + (i + 1) * classes);
        const double x0 = input_norm(pass, split.pixels.data() + i * kCifarPixels);
        const double allowed = logit_error_bound(b32, x0) + logit_error_bound(b64, x0);
        const double seen = observed_error(b32, row32.data(), &f64[static_cast<size_t>(i * classes)], classes);
        INFO("image " << i << ": |float32 - float64| " << seen << ", bounds allow " << allowed);
        CHECK(seen > 0.0);  // float32 really rounds...
        CHECK(seen <= allowed);
        CHECK(seen < 1e-4 * max_abs(&f64[static_cast<size_t>(i * classes)], classes));  // ...by ~1e-6 relative
      }
    }
  }
}

TEST_CASE("the rounding analysis covers the certifying pass's own structure run in float32", "[certifying]") {
  // HostNetwork<float> is the certifying pass's code in float32: its error against the float64 pass is visible,
  // and the analysis with u = 2^-24 must cover it (with u = 2^-53 the same analysis covers the float64 pass).
  for (const Variant& v : variants()) {
    SECTION(v.name) {
      LipConvnet model(v.config);
      model.set_training(false);
      Normalization norm;
      norm.std = {0.2f, 0.25f, 0.3f};
      const int terms = model.config().eval_terms;
      const int64_t n = 4, classes = v.config.classes;
      const std::vector<uint8_t> pixels = random_pixels(n, 21);
      HostNetwork<float> single(model, norm, terms);
      Float64Network twice(model, norm, terms);
      std::vector<float> f32(static_cast<size_t>(n * classes));
      std::vector<double> f64(static_cast<size_t>(n * classes));
      single.forward(pixels.data(), n, f32.data());
      twice.forward(pixels.data(), n, f64.data());
      const NetworkBound b32 = verify_network(model, terms, Precision::float32, norm);
      const NetworkBound b64 = verify_network(model, terms, Precision::float64, norm);
      for (int64_t i = 0; i < n; ++i) {
        std::vector<double> row32(f32.begin() + i * classes, f32.begin() + (i + 1) * classes);
        const double x0 = input_norm(twice, pixels.data() + i * kCifarPixels);
        const double allowed = logit_error_bound(b32, x0) + logit_error_bound(b64, x0);
        const double seen = observed_error(b32, row32.data(), &f64[static_cast<size_t>(i * classes)], classes);
        INFO("image " << i << ": float32 run of the pass errs by " << seen << ", the analysis allows " << allowed);
        CHECK(seen > 0.0);
        CHECK(seen <= allowed);
      }
    }
  }
}

TEST_CASE("certifying pass: x0 has one rounding, and bad settings are refused", "[certifying]") {
  ModelConfig config = variants().front().config;
  LipConvnet model(config);
  model.set_training(false);
  Normalization norm;
  norm.mean = {0.5f, 0.25f, 0.125f};
  norm.std = {0.3f, 0.7f, 0.1f};
  Float64Network pass(model, norm, 12);
  REQUIRE(pass.image_bytes() == kCifarPixels);
  std::vector<uint8_t> pixels = random_pixels(1, 3);
  const std::vector<double> x = pass.normalize(pixels.data());
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t i = 0; i < 1024; i += 37) {
      // (p/255 - mean)/std to within one rounding of the exact value. Referee: long double, where
      // p - 255 mean is exact and the quotient rounds by 2^-64.
      const long double exact =
          (static_cast<long double>(pixels[c * 1024 + i]) - 255.0L * norm.mean[c]) / (255.0L * norm.std[c]);
      CHECK(std::abs(static_cast<long double>(x[c * 1024 + i]) - exact) <=
            (static_cast<long double>(kFloat64Unit) + 0x1p-63L) * std::abs(exact));
    }
  CHECK_THROWS_AS(Float64Network(model, norm, 0), ConfigError);
  Normalization bad = norm;
  bad.std[2] = 0.0f;
  CHECK_THROWS_AS(Float64Network(model, bad, 12), ConfigError);
  // The float64 bound is required by evaluate_verified, for the model's evaluation terms.
  CifarSplit split;
  split.pixels = pixels;
  split.fine_labels = {0};
  split.coarse_labels = {0};
  CHECK_THROWS_AS(evaluate_verified(model, verify_network(model, 12, Precision::float32, norm), split, {0}, norm, {36}),
                  ConfigError);
  CHECK_THROWS_AS(evaluate_verified(model, verify_network(model, 5, Precision::float64, norm), split, {0}, norm, {36}),
                  ConfigError);
}

TEST_CASE("the certifying pass and the verified bound take the model's evaluation terms unless given",
          "[certifying][steps]") {
  ModelConfig config = variants().front().config;
  config.eval_terms = 7;
  LipConvnet model(config);
  model.set_training(false);
  const Normalization norm;
  const std::vector<uint8_t> pixels = random_pixels(2, 5);
  const int64_t classes = config.classes;
  auto logits = [&](const Float64Network& pass) {
    std::vector<double> out(static_cast<size_t>(2 * classes));
    pass.forward(pixels.data(), 2, out.data());
    return out;
  };
  const std::vector<double> from_model = logits(Float64Network(model, norm));
  CHECK(from_model == logits(Float64Network(model, norm, 7)));
  CHECK(from_model != logits(Float64Network(model, norm, 12)));  // the terms do change the logits
  const NetworkBound bound = verify_network(model, Precision::float64, norm);
  const NetworkBound seven = verify_network(model, 7, Precision::float64, norm);
  const NetworkBound twelve = verify_network(model, 12, Precision::float64, norm);
  CHECK(bound.terms == 7);
  CHECK(bound.lipschitz == seven.lipschitz);
  CHECK(bound.error_per_input_norm == seven.error_per_input_norm);
  CHECK(bound.error_per_input_norm != twelve.error_per_input_norm);
  // After set_terms both follow the model again.
  model.set_terms(config.train_terms, 12);
  CHECK(verify_network(model, Precision::float64, norm).terms == 12);
  CHECK(logits(Float64Network(model, norm)) == logits(Float64Network(model, norm, 12)));
}
