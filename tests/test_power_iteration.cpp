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
  config.groups_first = 4;
  config.groups_second = 2;
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
