// Certificates that hold: the verified network bound, the rounding allowance, and the attack cross-check.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>

#include "orthoconv/attack.hpp"
#include "orthoconv/certifying_pass.hpp"
#include "orthoconv/jacobian.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/network_bound.hpp"
#include "orthoconv/trainer.hpp"
#include "reference.hpp"

using namespace orthoconv;

namespace {

ModelConfig tiny_config(const std::string& head = "soc") {
  ModelConfig c;
  c.conv = ConvKind::gs_soc;
  c.groups = GroupCounts{2, 1};
  c.depth = 5;
  c.init_channels = 4;
  c.classes = 10;
  c.head = parse_head(head);
  c.seed = 5;
  return c;
}

// A small synthetic split of random images (labels filled in by the caller).
CifarSplit random_split(int64_t n, uint64_t seed) {
  CifarSplit s;
  s.path = "synthetic";
  std::mt19937 rng(static_cast<uint32_t>(seed));
  s.pixels.resize(static_cast<size_t>(n * kCifarPixels));
  for (auto& p : s.pixels) p = static_cast<uint8_t>(rng() % 256);
  s.fine_labels.assign(static_cast<size_t>(n), 0);
  s.coarse_labels.assign(static_cast<size_t>(n), 0);
  return s;
}

std::vector<float> logits_of(LipConvnet& model, const Normalization& norm, const CifarSplit& split,
                             const std::vector<int64_t>& indices) {
  std::vector<float> logits;
  pixel_space_pass(model, norm, pixel_batch(split, indices), logits, nullptr, nullptr);
  return logits;
}

}  // namespace

TEST_CASE("verified network bound: layers listed in order, L >= 1, rounding bound tiny but positive", "[verified]") {
  LipConvnet model(tiny_config());
  model.set_training(false);
  NetworkBound bound = verify_network(model, 12, Precision::float32, Normalization{});
  REQUIRE(bound.layers.size() == model.soc_layers().size());
  for (size_t i = 0; i < bound.layers.size(); ++i) {
    CHECK(bound.layers[i].name == model.soc_layers()[i].name);
    CHECK(bound.layers[i].bound.bound >= 1.0);
    CHECK(bound.layers[i].bound.rho > 0.0);
    CHECK(bound.layers[i].abs_norm >= bound.layers[i].bound.rho * (1 - 1e-9));
  }
  CHECK(bound.lipschitz >= 1.0);
  CHECK(bound.lipschitz < 1.0 + 1e-4);  // 12 terms on freshly normalized filters
  CHECK(bound.error_per_input_norm > 0.0);
  // Tiny: 2e-2 of ||x0||, most of it from the 1x1 layers' matrix path (its bound has || |A_n| || ~ 5 at C = 128
  // where the series' has rho ~ 1; see the matrix-path test below), 3e-3 from the series alone.
  CHECK(bound.error_per_input_norm < 5e-2);
  // The float64 pass: the same L, rounding smaller by at least about 2^29 (u64 / u32; the series' per-layer
  // factors are the same, and the float32 bound of a 1x1 layer may be the matrix path's, larger).
  NetworkBound b64 = verify_network(model, 12, Precision::float64, Normalization{});
  CHECK(b64.lipschitz == bound.lipschitz);
  const double ratio = kFloat64Unit / kFloat32Unit;
  CHECK(b64.error_per_input_norm > 0.01 * ratio * bound.error_per_input_norm);
  CHECK(b64.error_per_input_norm < 1.01 * ratio * bound.error_per_input_norm);
  CHECK(b64.error_constant < 1.01 * ratio * bound.error_constant);
  CHECK(bound.error_constant > 0.0);  // the float32 input rounding term (p/255 rounded) at least
}

namespace {

// || float32 layer(x) - exact series(x) || for a random x (the layer in evaluation mode, 12 terms, no bias), and
// ||x||: the exact series summed term by term in double on the layer's own A_n (as an explicit operator matrix).
std::pair<double, double> float32_series_error(SocConv& layer, int64_t side) {
  const SocConfig& config = layer.config();
  const int64_t c = config.group_channels(), g = config.groups, k = config.kernel, channels = c * g;
  layer.set_training(false);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensor x(Shape{1, channels, side, side});
  for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = normal(rng);
  Tensor y;
  layer.forward(x, y);
  auto op = conv_operator_matrix(layer.scaled_filter().to_vector(), g, c, k, side, side);
  const int64_t n = op.rows;
  std::vector<double> term(x.data(), x.data() + n), sum = term;
  for (int i = 1; i <= 12; ++i) {
    std::vector<double> next(static_cast<size_t>(n), 0.0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t col = 0; col < n; ++col) next[static_cast<size_t>(r)] += op(r, col) * term[static_cast<size_t>(col)];
    for (int64_t r = 0; r < n; ++r)
      term[static_cast<size_t>(r)] = next[static_cast<size_t>(r)] / i,
      sum[static_cast<size_t>(r)] += term[static_cast<size_t>(r)];
  }
  double err = 0.0, xnorm = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    err += std::pow(y.data()[r] - sum[static_cast<size_t>(r)], 2);
    xnorm += std::pow(x.data()[r], 2);
  }
  return {std::sqrt(err), std::sqrt(xnorm)};
}

}  // namespace

TEST_CASE("the float32 rounding bound covers the actual float32 error of the series", "[verified]") {
  SocConfig config;
  config.in_channels = config.out_channels = 16;
  config.groups = 2;
  config.bias = false;
  config.seed = 11;
  SocConv layer(config);
  const int64_t side = 8, c = config.group_channels(), g = config.groups, k = 3;
  const auto [err, xnorm] = float32_series_error(layer, side);
  auto b = soc_layer_bound(layer, side, 12);
  const double abs_norm = abs_filter_norm_bound(layer.scaled_filter().to_vector(), g, c, k);
  const double coefficient = series_rounding_bound(b.rho, abs_norm, c * k * k, 12, kFloat32Unit);
  INFO("actual float32 error " << err << " vs ||x|| " << xnorm << ", rho " << b.rho << ", bound coefficient "
                               << coefficient);
  CHECK(err > 0.0);
  CHECK(err <= coefficient * xnorm);
  // Worst-case analysis is pessimistic, but not absurdly: within a factor 1e4 of what rounding really does.
  CHECK(coefficient * xnorm < 1e4 * err);
}

TEST_CASE("the float32 rounding bound of a 1x1 layer covers its matrix path, and verify_network takes it",
          "[verified][matrix]") {
  for (int64_t groups : {1, 4}) {
    SocConfig config;
    config.in_channels = config.out_channels = 32;
    config.kernel = 1;
    config.groups = groups;
    config.bias = false;
    config.seed = 12 + static_cast<uint64_t>(groups);
    config.path = SocPath::matrix;
    SocConv layer(config);
    const int64_t side = 6, c = config.group_channels();
    const auto [err, xnorm] = float32_series_error(layer, side);
    REQUIRE(is_matrix_path(layer.last_path()));
    const double abs_norm = abs_filter_norm_bound(layer.scaled_filter().to_vector(), groups, c, 1);
    const double coefficient = matrix_rounding_bound(abs_norm, c, 12, kFloat32Unit);
    INFO("groups " << groups << ": actual float32 error " << err << " vs ||x|| " << xnorm << ", || |A_n| || "
                   << abs_norm << ", bound coefficient " << coefficient);
    CHECK(err > 0.0);
    CHECK(err <= coefficient * xnorm);
    CHECK(coefficient * xnorm < 1e4 * err);
  }
  // In a network, the float32 bound of every 1x1 layer is at least the matrix path's; the float64 one is the
  // series' (the float64 pass never takes the matrix path).
  LipConvnet model(tiny_config());
  model.set_training(false);
  const Normalization norm;
  const NetworkBound b32 = verify_network(model, 12, Precision::float32, norm);
  const NetworkBound b64 = verify_network(model, 12, Precision::float64, norm);
  const auto socs = model.soc_layers();
  REQUIRE(socs.size() == b32.layers.size());
  int one_by_one = 0;
  for (size_t i = 0; i < socs.size(); ++i) {
    const SocConfig& config = socs[i].soc->config();
    INFO(b32.layers[i].name);
    const int64_t c = config.group_channels(), accumulation = c * config.kernel * config.kernel;
    const NamedLayerBound& l32 = b32.layers[i];
    const NamedLayerBound& l64 = b64.layers[i];
    CHECK(l64.rounding == series_rounding_bound(l64.bound.rho, l64.abs_norm, accumulation, 12, kFloat64Unit));
    const double series32 = series_rounding_bound(l32.bound.rho, l32.abs_norm, accumulation, 12, kFloat32Unit);
    CHECK(l64.rounding == Approx(kFloat64Unit / kFloat32Unit * series32).epsilon(1e-3));
    if (config.kernel == 1) {
      ++one_by_one;
      CHECK(l32.rounding == std::max(series32, matrix_rounding_bound(l32.abs_norm, c, 12, kFloat32Unit)));
    } else {
      CHECK(l32.rounding == series32);
    }
  }
  CHECK(one_by_one == 7);  // the five second stages, the stride-2 1x1 layer and the head
}

TEST_CASE("verified certificates: L-only radii within nominal, float64 radii by their formula, planted layer caught",
          "[verified]") {
  LipConvnet model(tiny_config());
  model.set_training(false);
  Normalization norm;
  CifarSplit split = random_split(16, 1);
  std::vector<int64_t> indices(16);
  for (int i = 0; i < 16; ++i) indices[static_cast<size_t>(i)] = i;
  // Label each image with the model's own prediction, so all are correct.
  auto logits = logits_of(model, norm, split, indices);
  for (int i = 0; i < 16; ++i) {
    const float* f = &logits[static_cast<size_t>(i * 10)];
    split.fine_labels[static_cast<size_t>(i)] = static_cast<int32_t>(std::max_element(f, f + 10) - f);
  }
  NetworkBound bound = verify_network(model, 12, Precision::float64, norm);
  auto eval = evaluate_verified(model, bound, split, indices, norm, {0, 1, 2});
  Float64Network pass(model, norm, 12);
  std::vector<double> f64(16 * 10);
  pass.forward(split.pixels.data(), 16, f64.data());
  double nominal_sum = 0.0, lipschitz_sum = 0.0, verified_sum = 0.0;
  for (size_t i = 0; i < indices.size(); ++i) {
    CHECK(eval.nominal_images[i].correct);
    // The Lipschitz-only column: the nominal radius divided by L >= 1, nothing else.
    CHECK(eval.lipschitz_images[i].radius == Approx(eval.nominal_images[i].radius / bound.lipschitz).epsilon(1e-12));
    // The certificate that holds: the float64 margin less sqrt(2) * its rounding bound, over sqrt(2) L L_in.
    const double* f = &f64[i * 10];
    const int64_t c = std::max_element(f, f + 10) - f;
    double runner_up = -1e300;
    for (int64_t j = 0; j < 10; ++j)
      if (j != c) runner_up = std::max(runner_up, f[j]);
    const double error = logit_error_bound(bound, eval.input_norms[i]);
    CHECK(error < 1e-9);  // float64: far below any margin that matters
    const double expected = std::max(
        0.0, (f[c] - runner_up - std::sqrt(2.0) * error) / (std::sqrt(2.0) * bound.lipschitz * norm.lipschitz()));
    CHECK(eval.verified_images[i].correct == (c == split.fine_labels[i]));
    CHECK(eval.verified_images[i].radius <= expected);
    CHECK(eval.verified_images[i].radius == Approx(expected).epsilon(1e-12).margin(1e-15));
    // float32 and float64 logits differ by float32 rounding only.
    CHECK(eval.logit_deviation[i] > 0.0);
    CHECK(eval.logit_deviation[i] < 1e-4);
    nominal_sum += eval.nominal_images[i].radius;
    lipschitz_sum += eval.lipschitz_images[i].radius;
    verified_sum += eval.verified_images[i].radius;
  }
  CHECK(verified_sum > 0.0);
  CHECK(lipschitz_sum <= nominal_sum);
  // The float64 margins differ from the float32 ones by float32 rounding only (a few 1e-7 of a radius here).
  CHECK(std::abs(verified_sum - lipschitz_sum) < 1e-4 * nominal_sum);
  // Plant: one layer's effective filter 3x larger (a wrong correction): the verified L must exceed 1 clearly and
  // the verified radii must drop below the nominal ones that ignore it.
  ModelConfig planted_config = tiny_config();
  LipConvnet planted(planted_config);
  SocConv& victim = *planted.soc_layers().front().soc;
  SocConfig vc = victim.config();
  REQUIRE(vc.kernel == 3);
  // Same filter, larger correction: rebuild the victim's scale by inflating M along u (x) v is invisible, so
  // instead scale every power-iteration u vector down: sigma = <A, u v> shrinks, A_n grows.
  for (Buffer b : victim.buffers())
    if (b.name[0] == 'u')
      for (int64_t i = 0; i < b.tensor->numel(); ++i) b.tensor->data()[i] *= 1.0f / 3.0f;
  planted.set_training(false);
  NetworkBound inflated = verify_network(planted, 12, Precision::float64, norm);
  INFO("planted L " << inflated.lipschitz << " vs " << bound.lipschitz);
  CHECK(inflated.layers.front().bound.rho > 2.5 * bound.layers.front().bound.rho);
  CHECK(inflated.lipschitz > 1.0 + 1e-3);
}

TEST_CASE("attacks find a known adversarial example next to a correctly classified image", "[attack]") {
  LipConvnet model(tiny_config());
  model.set_training(false);
  Normalization norm;
  // Find two images with different predictions, then bisect the segment between them for the boundary.
  CifarSplit split = random_split(32, 2);
  std::vector<int64_t> all(32);
  for (int i = 0; i < 32; ++i) all[static_cast<size_t>(i)] = i;
  auto logits = logits_of(model, norm, split, all);
  auto predict = [&](const float* f) { return static_cast<int32_t>(std::max_element(f, f + 10) - f); };
  int a = 0, b = -1;
  for (int i = 1; i < 32 && b < 0; ++i)
    if (predict(&logits[static_cast<size_t>(i * 10)]) != predict(&logits[0])) b = i;
  REQUIRE(b > 0);
  Tensor pa = pixel_batch(split, {a}), pb = pixel_batch(split, {b});
  auto blend = [&](double t) {
    Tensor x(pa.shape());
    for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = static_cast<float>((1 - t) * pa.data()[i] + t * pb.data()[i]);
    return x;
  };
  auto class_at = [&](double t) {
    std::vector<float> f;
    pixel_space_pass(model, norm, blend(t), f, nullptr, nullptr);
    return predict(f.data());
  };
  const int32_t ca = class_at(0.0);
  double lo = 0.0, hi = 1.0;
  for (int it = 0; it < 24; ++it) {
    double mid = (lo + hi) / 2;
    (class_at(mid) == ca ? lo : hi) = mid;
  }
  // The clean image: just on a's side; the known adversarial: just across, at distance (hi - lo') * ||pb - pa||.
  double seg = 0.0;
  for (int64_t i = 0; i < pa.numel(); ++i) seg += std::pow(pb.data()[i] - pa.data()[i], 2);
  seg = std::sqrt(seg);
  const double t_clean = std::max(0.0, lo - 0.02 / seg);
  Tensor clean = blend(t_clean);
  const double known_distance = (hi - t_clean) * seg;
  // Store the clean point as a one-image split (quantization to uint8 moves it: re-check its class).
  CifarSplit one;
  one.path = "crafted";
  one.pixels.resize(kCifarPixels);
  for (int64_t i = 0; i < kCifarPixels; ++i)
    one.pixels[static_cast<size_t>(i)] =
        static_cast<uint8_t>(std::lround(std::clamp(clean.data()[i], 0.0f, 1.0f) * 255));
  one.fine_labels = {0};
  one.coarse_labels = {0};
  auto f1 = logits_of(model, norm, one, {0});
  one.fine_labels = {predict(f1.data())};
  AttackOptions options;
  options.steps = 30;
  options.restarts = 1;
  options.initial_radius = 0.15;
  AttackResult r = attack_model(model, norm, one, {0}, known_distance + 0.05, options);
  INFO("known adversarial at distance " << known_distance << "; DDN found " << r.min_norm[0] << ", PGD "
                                        << (r.pgd_success[0] ? r.pgd_norm[0] : -1.0));
  REQUIRE(r.clean_correct[0]);
  CHECK(r.pgd_success[0]);
  CHECK(r.min_norm[0] <= known_distance + 0.05);
  // And the certificate of that image is below the adversarial distance (it must be).
  NetworkBound bound = verify_network(model, 12, Precision::float64, norm);
  auto eval = evaluate_verified(model, bound, one, {0}, norm, {36});
  CHECK(eval.verified_images[0].radius < r.min_norm[0]);
}

TEST_CASE("attacks on a batch: finished images drop out, the others are attacked exactly as alone", "[attack]") {
  LipConvnet model(tiny_config());
  model.set_training(false);
  Normalization norm;
  CifarSplit split = random_split(3, 4);
  auto logits = logits_of(model, norm, split, {0, 1, 2});
  auto predict = [&](int i) {
    const float* f = &logits[static_cast<size_t>(i * 10)];
    return static_cast<int32_t>(std::max_element(f, f + 10) - f);
  };
  split.fine_labels = {(predict(0) + 1) % 10, predict(1), (predict(2) + 3) % 10};  // 0 and 2 misclassified
  AttackOptions options;
  options.steps = 12;
  options.restarts = 1;  // the first restart starts at the clean image: no random numbers
  options.initial_radius = 0.5;
  const double eps = 0.3;
  AttackResult batch = attack_model(model, norm, split, {0, 1, 2}, eps, options);
  AttackResult alone = attack_model(model, norm, split, {1}, eps, options);
  for (int i : {0, 2}) {
    CHECK_FALSE(batch.clean_correct[static_cast<size_t>(i)]);
    CHECK(batch.pgd_success[static_cast<size_t>(i)]);
    CHECK(batch.pgd_norm[static_cast<size_t>(i)] == 0.0);
    CHECK(batch.min_norm[static_cast<size_t>(i)] == 0.0);
  }
  REQUIRE(batch.clean_correct[1]);
  REQUIRE(alone.clean_correct[0]);
  // Image 1 runs in a compact batch of its own at every step, in both calls: bit for bit the same attack.
  CHECK(batch.pgd_success[1] == alone.pgd_success[0]);
  if (batch.pgd_success[1]) {
    CHECK(batch.pgd_norm[1] == alone.pgd_norm[0]);
    CHECK(batch.pgd_norm[1] <= eps * (1 + 1e-6));
  }
  CHECK(batch.min_norm[1] == alone.min_norm[0]);
  CHECK(std::isfinite(batch.min_norm[1]));  // DDN found an adversarial example within 12 steps
  CHECK(batch.min_norm[1] > 0.0);
}

TEST_CASE("a bf16-trained model is certified exactly as a float32 one, and attacks break none of its certificates",
          "[verified][attack][bf16]") {
  if (!reference::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: bf16 training not tested");
    return;
  }
  reference::AlwaysBf16 always;
  // Width 8, plain SOC: every shape has a oneDNN bf16 kernel.
  ModelConfig config = tiny_config();
  config.conv = ConvKind::soc;
  config.groups = GroupCounts{1, std::nullopt};
  config.init_channels = 8;
  LipConvnet model(config);
  model.set_precision(ConvPrecision::bf16);
  Normalization norm;
  {
    Sgd sgd(model);
    TrainStep step(model, sgd, 0.0, norm.lipschitz());
    CifarSplit data = random_split(32, 9);
    std::vector<int64_t> all(32);
    for (int i = 0; i < 32; ++i) all[static_cast<size_t>(i)] = i;
    Tensor images = pixel_batch(data, all);
    for (int64_t i = 0; i < images.numel(); ++i)
      images.data()[i] = (images.data()[i] - norm.mean[static_cast<size_t>(i / 1024 % 3)]) /
                         norm.std[static_cast<size_t>(i / 1024 % 3)];
    std::vector<int32_t> labels(32);
    for (int i = 0; i < 32; ++i) labels[static_cast<size_t>(i)] = i % 10;
    for (int s = 0; s < 3; ++s) REQUIRE(std::isfinite(step.run(images, labels, 0.05f, 0.9f, 5e-4f).loss_sum));
  }
  // The same parameters in a model that never heard of bf16 (as `orthoconv certify` loads a checkpoint).
  model.set_training(false);
  Checkpoint saved;
  write_model_state(model, norm, saved);
  LipConvnet fresh(config);
  read_model_state(saved, "bf16-trained", fresh);

  CifarSplit split = random_split(8, 10);
  std::vector<int64_t> indices(8);
  for (int i = 0; i < 8; ++i) indices[static_cast<size_t>(i)] = i;
  auto logits = logits_of(model, norm, split, indices);
  for (int i = 0; i < 8; ++i) {
    const float* f = &logits[static_cast<size_t>(i * 10)];
    split.fine_labels[static_cast<size_t>(i)] = static_cast<int32_t>(std::max_element(f, f + 10) - f);
  }
  const NetworkBound bound = verify_network(model, 12, Precision::float64, norm);
  const NetworkBound fresh_bound = verify_network(fresh, 12, Precision::float64, norm);
  CHECK(bound.lipschitz == fresh_bound.lipschitz);
  const auto eval = evaluate_verified(model, bound, split, indices, norm, {36});
  const auto fresh_eval = evaluate_verified(fresh, fresh_bound, split, indices, norm, {36});
  double largest = 0.0;
  for (size_t i = 0; i < indices.size(); ++i) {
    INFO("image " << i);
    CHECK(eval.nominal_images[i].radius == fresh_eval.nominal_images[i].radius);    // float32 pass
    CHECK(eval.verified_images[i].radius == fresh_eval.verified_images[i].radius);  // float64 pass
    largest = std::max(largest, eval.verified_images[i].radius);
  }
  REQUIRE(largest > 0.0);
  // Attack at half the largest certified radius: every image certified there survives PGD, and DDN's smallest
  // adversarial perturbation is longer than each image's certified radius.
  AttackOptions options;
  options.steps = 12;
  options.restarts = 2;
  options.initial_radius = 0.5;
  const double eps = largest / 2;
  const AttackResult attacked = attack_model(model, norm, split, indices, eps, options);
  int certified = 0;
  for (size_t i = 0; i < indices.size(); ++i) {
    INFO("image " << i << ": certified radius " << eval.verified_images[i].radius << ", DDN " << attacked.min_norm[i]);
    CHECK(attacked.min_norm[i] > eval.verified_images[i].radius);
    if (eval.verified_images[i].radius >= eps) {
      ++certified;
      CHECK_FALSE(attacked.pgd_success[i]);
    }
  }
  CHECK(certified > 0);
}
