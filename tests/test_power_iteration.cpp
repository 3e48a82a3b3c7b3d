// The power-iteration schedule: in training mode a forward runs 50 iterations when the step counter is a multiple
// of 200 (steps 0, 200, 400, ...) and 1 otherwise, then the counter advances; evaluation mode runs none and
// leaves the counter, u, v and sigma alone.
#include <catch2/catch.hpp>

#include "reference.hpp"

using namespace orthoconv;

namespace {

SocConv small_layer(uint64_t seed = 3) {
  SocConfig c;
  c.in_channels = c.out_channels = 4;
  c.kernel = 3;
  c.groups = 2;
  c.seed = seed;
  return SocConv(c);
}

std::vector<std::vector<float>> snapshot(Layer& layer) {
  std::vector<std::vector<float>> out;
  for (const Buffer& b : layer.buffers()) out.push_back(b.tensor->to_vector());
  return out;
}

}  // namespace

TEST_CASE("training-mode forwards run 50 power iterations at steps 0, 200, 400 and 1 otherwise",
          "[soc][power-iteration]") {
  SocConv layer = small_layer();
  Tensor x(Shape{1, 4, 2, 2}), y;
  REQUIRE(layer.training());
  REQUIRE(layer.step() == 0);
  std::vector<int> counts;
  for (int64_t step = 0; step <= 401; ++step) {
    REQUIRE(layer.step() == step);
    layer.forward(x, y);
    counts.push_back(layer.last_power_iterations());
  }
  CHECK(layer.step() == 402);
  for (size_t step = 0; step < counts.size(); ++step) {
    INFO("step " << step);
    CHECK(counts[step] == (step % 200 == 0 ? 50 : 1));
  }
}

TEST_CASE("the schedule follows the step counter (set_step) and GsSocConv's two layers both follow it",
          "[soc][gs-soc][power-iteration]") {
  SocConv layer = small_layer();
  Tensor x(Shape{1, 4, 2, 2}), y;
  for (int64_t step : {199, 200, 201, 399, 400, 600, 1001}) {
    layer.set_step(step);
    layer.forward(x, y);
    INFO("step " << step);
    CHECK(layer.last_power_iterations() == (step % 200 == 0 ? 50 : 1));
    CHECK(layer.step() == step + 1);
  }

  GsSocConfig config;
  config.base.in_channels = config.base.out_channels = 8;
  config.groups = GroupCounts{4, 2};
  GsSocConv gs(config);
  Tensor xg(Shape{1, 8, 2, 2}), yg;
  for (int step = 0; step < 3; ++step) {
    gs.forward(xg, yg);
    CHECK(gs.first().last_power_iterations() == (step == 0 ? 50 : 1));
    CHECK(gs.second()->last_power_iterations() == (step == 0 ? 50 : 1));
  }
}

TEST_CASE("evaluation mode runs no power iterations and advances nothing", "[soc][power-iteration]") {
  SocConv layer = small_layer();
  Tensor x(Shape{1, 4, 2, 2}), y;
  layer.forward(x, y);  // one training step first: step 1
  layer.forward(x, y);  // step 2
  REQUIRE(layer.step() == 2);
  const auto before = snapshot(layer);
  const auto sigma_before = layer.sigma();

  layer.set_training(false);
  for (int i = 0; i < 3; ++i) {
    layer.forward(x, y);
    CHECK(layer.last_power_iterations() == 0);
    CHECK(layer.step() == 2);
  }
  CHECK(snapshot(layer) == before);  // u and v untouched
  CHECK(layer.sigma() == sigma_before);

  // Back in training mode the schedule resumes where it stopped (step 2: one iteration).
  layer.set_training(true);
  layer.forward(x, y);
  CHECK(layer.last_power_iterations() == 1);
  CHECK(layer.step() == 3);
}

TEST_CASE("sigma is the minimum over the four reshapes of <A, u_i (x) v_i> and A_n = 0.7 A / sigma",
          "[soc][power-iteration]") {
  SocConfig c;
  c.in_channels = c.out_channels = 6;
  c.kernel = 3;
  c.groups = 2;
  c.seed = 8;
  SocConv layer(c);
  const auto p = reference::soc_params(layer);
  const auto a = reference::skew(p.weight, p.groups, p.group_channels(), p.kernel);
  const auto sigma = reference::power_sigma(a, p.u, p.v, p.groups, p.group_channels(), p.kernel);
  // scaled_filter() recomputes sigma from the stored u, v without iterating.
  const auto scaled = reference::to_double(layer.scaled_filter());
  CHECK(reference::max_relative_error(reference::to_double(layer.sigma()), sigma) < 1e-6);
  // A_n = 0.7 A / sigma, per group.
  const int64_t group_size = p.group_channels() * p.group_channels() * 9;
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t i = 0; i < group_size; ++i)
      CHECK(scaled[g * group_size + i] == Approx(0.7 * a[g * group_size + i] / sigma[g]).epsilon(1e-6).margin(1e-7));
  // After 50 iterations at construction u, v are unit vectors.
  for (const Buffer& b : layer.buffers()) {
    const auto v = reference::to_double(*b.tensor);
    const int64_t per_group = b.tensor->numel() / p.groups;
    for (int64_t g = 0; g < p.groups; ++g) {
      double s = 0.0;
      for (int64_t i = 0; i < per_group; ++i) s += v[g * per_group + i] * v[g * per_group + i];
      INFO(b.name << " group " << g);
      CHECK(std::sqrt(s) == Approx(1.0).epsilon(1e-6));
    }
  }
}

namespace {

// Random unit vectors per group in the reference's layouts (u_length / v_length floats per group).
PowerIterationState random_state(int64_t groups, int64_t channels, int64_t kernel, uint64_t seed) {
  PowerIterationState state;
  for (int w = 0; w < 4; ++w) {
    for (int side = 0; side < 2; ++side) {
      const int64_t length = side == 0 ? PowerIterationState::u_length(w, channels, kernel)
                                       : PowerIterationState::v_length(w, channels, kernel);
      auto values = reference::random_normal(static_cast<size_t>(groups * length), seed + 10 * w + side);
      for (int64_t g = 0; g < groups; ++g) {
        double s = 0.0;
        for (int64_t i = 0; i < length; ++i) s += values[g * length + i] * values[g * length + i];
        for (int64_t i = 0; i < length; ++i) values[g * length + i] /= std::sqrt(s);
      }
      (side == 0 ? state.u[w] : state.v[w]) = reference::to_tensor(values, Shape{groups, length});
    }
  }
  return state;
}

}  // namespace

// The reference (GS-SOC skew_ortho_conv.py) updates, in every reshape, v from u and then u from v, where u4 spans
// (out, h, w) and v4 the in-channels: for the fourth reshape the in-channel vector goes first. The vectors are
// random, far from converged, so an update in the other order (or u4 and v4 swapped) moves them by O(1).
// Tolerance: a few float32 roundings per product (C*k*k <= 150 terms summed in float within a row): 1e-5.
TEST_CASE("the backend's power iteration is the reference's update rule for all four reshapes, v4 first",
          "[soc][power-iteration][reference]") {
  auto backend = cpu_backend();
  struct Case {
    int64_t groups, channels, kernel;
  };
  for (const Case& c : {Case{2, 6, 3}, Case{1, 5, 5}, Case{3, 7, 1}, Case{1, 17, 3}}) {
    const int64_t g = c.groups, ch = c.channels, k = c.kernel;
    const auto m = reference::random_normal(static_cast<size_t>(g * ch * ch * k * k), 91, 0.5);
    const auto a = reference::skew(m, g, ch, k);
    const Tensor filter = reference::to_tensor(a, Shape{g, ch, ch, k, k});
    for (int iterations : {0, 1, 2, 7}) {
      INFO(g << " groups of " << ch << " channels, kernel " << k << ", " << iterations << " iterations");
      PowerIterationState state = random_state(g, ch, k, 17);
      std::array<reference::Vec, 4> u, v;
      for (int w = 0; w < 4; ++w) {
        u[w] = reference::to_double(state.u[w]);
        v[w] = reference::to_double(state.v[w]);
      }
      reference::power_iterate(a, u, v, g, ch, k, iterations);
      std::vector<float> sigma(static_cast<size_t>(g));
      std::vector<int32_t> which(static_cast<size_t>(g));
      backend->power_iteration(filter.data(), state, g, ch, k, iterations, sigma.data(), which.data());
      for (int w = 0; w < 4; ++w) {
        INFO("u" << w + 1 << " / v" << w + 1);
        CHECK(reference::norm_relative_error(reference::to_double(state.u[w]), u[w]) < 1e-5);
        CHECK(reference::norm_relative_error(reference::to_double(state.v[w]), v[w]) < 1e-5);
      }
      CHECK(reference::max_relative_error(reference::to_double(sigma), reference::power_sigma(a, u, v, g, ch, k)) <
            1e-5);
    }
  }
}

TEST_CASE("a training step moves u, v as the reference's update_sigma does, and sigma follows the new vectors",
          "[soc][power-iteration][reference]") {
  SocConfig config;
  config.in_channels = config.out_channels = 6;
  config.kernel = 3;
  config.groups = 2;
  config.seed = 4;
  config.init_iterations = 0;  // start far from convergence
  SocConv layer(config);
  layer.set_step(1);  // one iteration
  auto before = reference::soc_params(layer);
  Tensor x(Shape{1, 6, 3, 3}), y;
  layer.forward(x, y);
  REQUIRE(layer.last_power_iterations() == 1);
  const int64_t c = before.group_channels();
  const auto a = reference::skew(before.weight, before.groups, c, before.kernel);
  reference::power_iterate(a, before.u, before.v, before.groups, c, before.kernel, 1);
  const auto after = reference::soc_params(layer);
  for (int w = 0; w < 4; ++w) {
    INFO("u" << w + 1 << " / v" << w + 1);
    CHECK(reference::norm_relative_error(after.u[w], before.u[w]) < 1e-5);
    CHECK(reference::norm_relative_error(after.v[w], before.v[w]) < 1e-5);
  }
  CHECK(reference::max_relative_error(reference::to_double(layer.sigma()),
                                      reference::power_sigma(a, before.u, before.v, before.groups, c, before.kernel)) <
        1e-5);
}
