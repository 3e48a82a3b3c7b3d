// LipConvnet-N: the layer table of the issue, the GS paper's parameter counts, stable names, whole-model
// gradients against finite differences, the lln head's gradient (through the row normalization), and the
// 1-Lipschitz property of the whole network.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <set>

#include "orthoconv/model.hpp"

using namespace orthoconv;

namespace {

ModelConfig shapes_only(const std::string& conv, int64_t a, std::optional<int64_t> b) {
  ModelConfig c;
  c.conv = parse_conv_kind(conv);
  c.groups = GroupCounts{a, b};
  c.init_iterations = 0;  // shapes and counts only
  return c;
}

ModelConfig tiny(const std::string& conv, int64_t a, std::optional<int64_t> b, const std::string& head) {
  ModelConfig c;
  c.conv = parse_conv_kind(conv);
  c.groups = GroupCounts{a, b};
  c.depth = 5;
  c.init_channels = 4;
  c.classes = 10;
  c.head = parse_head(head);
  c.seed = 7;
  return c;
}

Tensor random_tensor(const Shape& shape, std::mt19937_64& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (float& x : v) x = normal(rng);
  return Tensor::from_vector(v, shape);
}

// <R, f(x)> accumulated in double.
double functional(LipConvnet& model, const Tensor& images, const Tensor& r) {
  Tensor logits;
  model.forward(images, logits);
  double sum = 0.0;
  for (int64_t i = 0; i < logits.numel(); ++i) sum += static_cast<double>(logits.at(i)) * r.at(i);
  return sum;
}

}  // namespace

TEST_CASE("LipConvnet-15 follows the issue's stages, strides, kernels and widths", "[model]") {
  LipConvnet model(shapes_only("gs-soc", 4, 1));
  auto rows = model.layer_table();
  REQUIRE(rows.size() == 16);
  // (in channels, out channels, input side) per block, and which blocks are stride 2 / 1x1.
  const int64_t expected[15][3] = {{3, 32, 32},   {32, 32, 32},  {32, 64, 32},  {64, 64, 16},  {64, 64, 16},
                                   {64, 128, 16}, {128, 128, 8}, {128, 128, 8}, {128, 256, 8}, {256, 256, 4},
                                   {256, 256, 4}, {256, 512, 4}, {512, 512, 2}, {512, 512, 2}, {512, 1024, 2}};
  for (int i = 0; i < 15; ++i) {
    INFO("block " << i << ": " << rows[i].name << " " << rows[i].description);
    CHECK(rows[i].input == Shape({1, expected[i][0], expected[i][2], expected[i][2]}));
    const int64_t stride = i % 3 == 2 ? 2 : 1;
    CHECK(rows[i].output == Shape({1, expected[i][1], expected[i][2] / stride, expected[i][2] / stride}));
    const bool one_by_one = i == 14;
    CHECK(rows[i].description.find(one_by_one ? " k1 s2 g4" : " k3 s" + std::to_string(stride) + " g4") !=
          std::string::npos);
  }
  CHECK(rows[0].name == "stage1.block0");
  CHECK(rows[14].name == "stage5.block2");
  CHECK(rows[15].name == "head");
  CHECK(rows[15].input == Shape({1, 1024, 1, 1}));
  CHECK(rows[15].output == Shape({1, 100, 1, 1}));
  CHECK(model.features() == 1024);
}

TEST_CASE("LipConvnet-15 parameter counts match the GS paper within 0.5%", "[model]") {
  struct Case {
    std::string conv;
    int64_t a;
    std::optional<int64_t> b;
    double paper;  // millions
  };
  const Case cases[] = {{"soc", 1, std::nullopt, 24.07},
                        {"gs-soc", 4, std::nullopt, 6.81},
                        {"gs-soc", 4, 1, 8.91},
                        {"gs-soc", 4, 2, 7.86},
                        {"gs-soc", 4, 4, 7.33}};
  for (const Case& c : cases) {
    LipConvnet model(shapes_only(c.conv, c.a, c.b));
    const double millions = static_cast<double>(model.parameter_count()) / 1e6;
    INFO(model.config().conv_label() << ": " << millions << "M vs the paper's " << c.paper << "M");
    CHECK(std::abs(millions - c.paper) <= 0.005 * c.paper);
  }
}

TEST_CASE("LipConvnet names every parameter and buffer uniquely, M stored as [g, C, C, k, k]", "[model]") {
  LipConvnet model(shapes_only("gs-soc", 4, 1));
  std::set<std::string> names;
  int64_t counted = 0;
  for (auto& p : model.parameters()) {
    CHECK(names.insert(p.name).second);
    counted += p.parameter->value.numel();
    CHECK(p.parameter->grad.shape() == p.parameter->value.shape());
  }
  for (auto& b : model.buffers()) CHECK(names.insert(b.name).second);
  CHECK(counted == model.parameter_count());
  CHECK(names.count("stage1.block0.conv.first.weight") == 1);
  CHECK(names.count("stage5.block2.conv.second.bias") == 1);
  CHECK(names.count("stage3.block1.conv.first.u4") == 1);
  CHECK(names.count("head.weight") == 1);
  auto params = model.parameters();
  // stage1.block2: 32 -> 64, stride 2: series on 128 channels, 4 groups of 32, 3x3.
  for (auto& p : params)
    if (p.name == "stage1.block2.conv.first.weight") CHECK(p.parameter->value.shape() == Shape({4, 32, 32, 3, 3}));
  for (auto& p : params)
    if (p.name == "head.weight") CHECK(p.parameter->value.shape() == Shape({1, 1024, 1024, 1, 1}));
  CHECK(model.soc_layers().size() == 31);  // 15 blocks x 2 stages + the head
}

TEST_CASE("LipConvnet gradients match finite differences (parameters and input)", "[model][gradient]") {
  // In evaluation mode the function is fixed (no power iteration), so central differences of <R, f> (summed in
  // double) are meaningful. Directions: the normalized gradient itself (the derivative is then ||g||, the largest
  // signal) and a random unit direction. Noise: the float32 logits carry ~1e-6 relative rounding per operation
  // through ~6 series terms x 6 layers, |delta L| <~ 1e-5, i.e. ~5e-4 after dividing by 2h = 2e-2, plus O(h^2)
  // truncation and the rare MaxMin kink crossed inside [-h, h]. The bound 2e-2 * ||g|| + 5e-4 sits above that
  // and far below any real error (a dropped series term, the sigma gradient or a wrong sign are O(||g||)).
  struct Case {
    std::string conv;
    int64_t a;
    std::optional<int64_t> b;
    std::string head;
  };
  const Case cases[] = {{"soc", 1, std::nullopt, "soc"}, {"gs-soc", 2, 1, "soc"}, {"gs-soc", 4, std::nullopt, "lln"}};
  for (const Case& c : cases) {
    ModelConfig config = tiny(c.conv, c.a, c.b, c.head);
    LipConvnet model(config);
    model.set_training(false);
    model.set_terms(5, 6);
    std::mt19937_64 rng(11);
    Tensor images = random_tensor(Shape{2, 3, 32, 32}, rng);
    Tensor r = random_tensor(Shape{2, config.classes}, rng);
    Tensor logits, diff_input;
    model.forward(images, logits);
    model.zero_grad();
    model.backward(r, &diff_input);
    const double h = 1e-2;

    auto params = model.parameters();
    std::vector<std::vector<float>> saved, grads;
    for (auto& p : params) {
      saved.push_back(p.parameter->value.to_vector());
      grads.push_back(p.parameter->grad.to_vector());
    }
    double grad_norm = 0.0;
    for (auto& g : grads)
      for (float x : g) grad_norm += static_cast<double>(x) * x;
    grad_norm = std::sqrt(grad_norm);
    REQUIRE(grad_norm > 0);
    auto check_direction = [&](std::vector<std::vector<float>> direction, const char* what) {
      double norm = 0.0, analytic = 0.0;
      for (auto& d : direction)
        for (float x : d) norm += static_cast<double>(x) * x;
      norm = std::sqrt(norm);
      for (size_t i = 0; i < direction.size(); ++i)
        for (size_t j = 0; j < direction[i].size(); ++j) {
          direction[i][j] = static_cast<float>(direction[i][j] / norm);
          analytic += static_cast<double>(grads[i][j]) * direction[i][j];
        }
      auto shifted = [&](double t) {
        for (size_t i = 0; i < params.size(); ++i)
          for (size_t j = 0; j < direction[i].size(); ++j)
            params[i].parameter->value.at(static_cast<int64_t>(j)) =
                static_cast<float>(saved[i][j] + t * direction[i][j]);
        return functional(model, images, r);
      };
      const double numeric = (shifted(h) - shifted(-h)) / (2 * h);
      shifted(0.0);
      INFO(config.architecture() << ": parameters along " << what << ", analytic " << analytic << " numeric " << numeric
                                 << " (||g|| " << grad_norm << ")");
      CHECK(std::abs(analytic - numeric) <= 2e-2 * grad_norm + 5e-4);
    };
    check_direction(grads, "the gradient");
    std::vector<std::vector<float>> random_direction;
    for (auto& p : params) random_direction.push_back(random_tensor(p.parameter->value.shape(), rng).to_vector());
    check_direction(random_direction, "a random direction");

    // The input gradient, along itself.
    double dnorm = 0.0;
    for (int64_t i = 0; i < diff_input.numel(); ++i) dnorm += static_cast<double>(diff_input.at(i)) * diff_input.at(i);
    dnorm = std::sqrt(dnorm);
    auto input_shifted = [&](double t) {
      Tensor x(images.shape());
      for (int64_t i = 0; i < x.numel(); ++i) x.at(i) = static_cast<float>(images.at(i) + t * diff_input.at(i) / dnorm);
      return functional(model, x, r);
    };
    const double input_numeric = (input_shifted(h) - input_shifted(-h)) / (2 * h);
    INFO(config.architecture() << ": input along its gradient, analytic " << dnorm << " numeric " << input_numeric);
    CHECK(std::abs(dnorm - input_numeric) <= 2e-2 * dnorm + 5e-4);
    if (config.head == HeadKind::soc) {
      // Orthogonal head: the logits are 1-Lipschitz, so ||J^T R|| <= ||R||. (Not for lln: only its rows are.)
      double rnorm = 0.0;
      for (int64_t i = 0; i < r.numel(); ++i) rnorm += static_cast<double>(r.at(i)) * r.at(i);
      CHECK(dnorm <= std::sqrt(rnorm) * (1 + 1e-3));
    }
  }
}

TEST_CASE("LinearNormalized gradient includes the row normalization", "[model][gradient]") {
  // Every weight, bias and input entry against central differences. The layer accumulates in double and rounds
  // its outputs to float (relative 6e-8); with h = 1e-3 the difference quotient carries ~1e-4 absolute noise
  // for O(1) outputs, so 1e-3 absolute + 1e-3 relative is a safe, still sharp bound (dropping the projection
  // (I - q q^T) changes entries by O(0.1)).
  const int64_t features = 5, classes = 3, batch = 2;
  LinearNormalized layer(features, classes, 3);
  std::mt19937_64 rng(5);
  Tensor x = random_tensor(Shape{batch, features, 1, 1}, rng);
  Tensor r = random_tensor(Shape{batch, classes, 1, 1}, rng);
  Tensor y, dx;
  layer.forward(x, y);
  layer.zero_grad();
  layer.backward(r, dx);
  auto loss = [&]() {
    Tensor out;
    layer.forward(x, out);
    double s = 0.0;
    for (int64_t i = 0; i < out.numel(); ++i) s += static_cast<double>(out.at(i)) * r.at(i);
    return s;
  };
  const double h = 1e-3;
  auto check_entry = [&](float& value, double analytic, const char* what, int64_t index) {
    const float saved = value;
    value = static_cast<float>(saved + h);
    const double up = loss();
    const double step_up = static_cast<double>(value) - saved;
    value = static_cast<float>(saved - h);
    const double down = loss();
    const double step_down = saved - static_cast<double>(value);
    value = saved;
    const double numeric = (up - down) / (step_up + step_down);
    INFO(what << "[" << index << "]: analytic " << analytic << " numeric " << numeric);
    CHECK(std::abs(analytic - numeric) <= 1e-3 + 1e-3 * std::abs(analytic));
  };
  for (int64_t i = 0; i < classes * features; ++i)
    check_entry(layer.weight().value.at(i), layer.weight().grad.at(i), "weight", i);
  for (int64_t i = 0; i < classes; ++i) check_entry(layer.bias().value.at(i), layer.bias().grad.at(i), "bias", i);
  for (int64_t i = 0; i < x.numel(); ++i) check_entry(x.at(i), dx.at(i), "input", i);

  // Outputs are computed with unit-norm rows: scaling a row does not change the outputs.
  Tensor before;
  layer.forward(x, before);
  for (int64_t f = 0; f < features; ++f) layer.weight().value.at(f) *= 3.0f;
  Tensor after;
  layer.forward(x, after);
  for (int64_t i = 0; i < before.numel(); ++i) CHECK(after.at(i) == Approx(before.at(i)).epsilon(1e-5));
}

TEST_CASE("LipConvnet logits are 1-Lipschitz in the normalized input (each logit for the lln head)", "[model]") {
  // soc head: the whole logit vector is 1-Lipschitz. lln head: only each logit is (unit-norm rows; the matrix of
  // rows can have norm up to sqrt(classes)), which is why its certificate uses ||q_c - q_j||.
  for (const std::string head : {"soc", "lln"}) {
    LipConvnet model(tiny("gs-soc", 2, 1, head));
    model.set_training(false);
    std::mt19937_64 rng(3);
    for (int trial = 0; trial < 3; ++trial) {
      Tensor a = random_tensor(Shape{1, 3, 32, 32}, rng);
      Tensor b(a.shape());
      std::normal_distribution<float> noise(0.0f, 0.1f);
      for (int64_t i = 0; i < a.numel(); ++i) b.at(i) = a.at(i) + noise(rng);
      Tensor fa, fb;
      model.forward(a, fa);
      model.forward(b, fb);
      double in = 0.0, out = 0.0, largest = 0.0;
      for (int64_t i = 0; i < a.numel(); ++i) in += std::pow(static_cast<double>(a.at(i)) - b.at(i), 2);
      for (int64_t i = 0; i < fa.numel(); ++i) {
        const double d = static_cast<double>(fa.at(i)) - fb.at(i);
        out += d * d;
        largest = std::max(largest, std::abs(d));
      }
      INFO(head << " head: ||f(a) - f(b)|| = " << std::sqrt(out) << ", max |f_i(a) - f_i(b)| = " << largest
                << ", ||a - b|| = " << std::sqrt(in));
      // 12-term series: the exp truncation is ~ 0.7^13/13! per layer, far below the 1e-3 slack.
      if (head == "soc")
        CHECK(std::sqrt(out) <= std::sqrt(in) * (1.0 + 1e-3));
      else
        CHECK(largest <= std::sqrt(in) * (1.0 + 1e-3));
    }
  }
}

TEST_CASE("LipConvnet rejects impossible configurations with one clear message", "[model]") {
  ModelConfig c = shapes_only("gs-soc", 4, 1);
  c.depth = 12;
  CHECK_THROWS_WITH(LipConvnet(c), Catch::Contains("depth"));
  c = shapes_only("gs-soc", 3, 1);
  CHECK_THROWS_WITH(LipConvnet(c), Catch::Contains("stage1.block0"));
  c = shapes_only("gs-soc", 4, 1);
  CHECK_THROWS_WITH(parse_head("dense"), Catch::Contains("head"));
  c = shapes_only("soc", 1, 2);
  CHECK_THROWS_AS(LipConvnet(c), ConfigError);
}

namespace {

// The configurations the step list must describe: plain SOC, GS-SOC (4,1) (identity middle shuffle), (4,-),
// paired MaxMin, keep=per-group with (4,2) (a middle shuffle that moves channels), the lln head, and a
// LipConvnet-10 (stride-1 blocks, input shuffles). Width 4 and few power iterations: cheap.
struct StepVariant {
  const char* name;
  ModelConfig config;
};

std::vector<StepVariant> step_variants() {
  ModelConfig base = tiny("gs-soc", 4, 1, "soc");
  base.init_iterations = 3;
  std::vector<StepVariant> out;
  ModelConfig soc = base;
  soc.conv = ConvKind::soc;
  soc.groups = GroupCounts{1, std::nullopt};
  out.push_back({"soc", soc});
  out.push_back({"gs-soc(4,1)", base});
  ModelConfig single = base;
  single.groups = GroupCounts{4, std::nullopt};
  out.push_back({"gs-soc(4,-)", single});
  ModelConfig paired = base;
  paired.activation = ActivationKind::maxmin_paired;
  out.push_back({"gs-soc(4,1), paired MaxMin", paired});
  ModelConfig per_group = base;
  per_group.keep = KeepChannels::per_group;
  per_group.groups = GroupCounts{4, 2};
  out.push_back({"gs-soc(4,2), keep per-group", per_group});
  ModelConfig lln = soc;
  lln.groups = GroupCounts{2, std::nullopt};
  lln.head = HeadKind::lln;
  out.push_back({"soc(g2), lln head", lln});
  ModelConfig deeper = base;
  deeper.depth = 10;
  deeper.groups = GroupCounts{2, 2};
  deeper.activation = ActivationKind::maxmin_paired;
  out.push_back({"LipConvnet-10 gs-soc(2,2), paired MaxMin", deeper});
  return out;
}

// Runs model.steps() one by one through their own layers (flatten as a reshape), skipping step `skip` (-1: none).
std::vector<float> run_steps(LipConvnet& model, const Tensor& images, int64_t skip = -1) {
  const int64_t n = images.dim(0);
  Tensor x = images;
  const std::vector<NetworkStep>& steps = model.steps();
  for (size_t i = 0; i < steps.size(); ++i) {
    const NetworkStep& step = steps[i];
    if (static_cast<int64_t>(i) == skip) continue;
    if (step.kind == StepKind::flatten) {
      x = x.reshaped(Shape{n, step.output[1], 1, 1});
      continue;
    }
    Tensor y;
    step.layer->forward(x, y);
    x = y;
  }
  return x.to_vector();
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("LipConvnet's steps, run one by one through their layers, give the model's logits bit for bit",
          "[model][steps]") {
  for (const StepVariant& v : step_variants()) {
    SECTION(v.name) {
      LipConvnet model(v.config);
      model.set_training(false);
      std::mt19937_64 rng(11);
      const int64_t n = 3, side = v.config.input_side;
      const Tensor images = random_tensor(Shape{n, 3, side, side}, rng);
      Tensor logits;
      model.forward(images, logits);
      const std::vector<float> expected = logits.to_vector();

      // Each step's shapes chain, and match what its layer produces on a batch.
      const std::vector<NetworkStep>& steps = model.steps();
      REQUIRE(steps.front().input == (Shape{1, 3, side, side}));
      REQUIRE(steps.back().output == (Shape{1, v.config.classes, 1, 1}));
      for (size_t i = 0; i < steps.size(); ++i) {
        INFO(steps[i].name);
        if (i > 0) CHECK(steps[i].input == steps[i - 1].output);
        CHECK((steps[i].layer == nullptr) == (steps[i].kind == StepKind::flatten));
        if (steps[i].layer) CHECK(steps[i].layer->output_shape(steps[i].input) == steps[i].output);
      }

      const std::vector<float> stepped = run_steps(model, images);
      REQUIRE(stepped.size() == expected.size());
      CHECK(same_bits(stepped, expected));

      // The comparison can fail: leaving out a step that moves values changes the logits. The first MaxMin, the
      // first shuffle that is not the identity and the first SocConv that keeps the shape (the others cannot be
      // left out without a shape error), where the variant has them.
      std::vector<int64_t> mutations;
      bool maxmin = false, shuffle = false, soc = false;
      for (size_t i = 0; i < steps.size(); ++i) {
        const NetworkStep& s = steps[i];
        bool* first = nullptr;
        if (s.kind == StepKind::maxmin) first = &maxmin;
        if (s.kind == StepKind::shuffle && !s.shuffle->is_identity()) first = &shuffle;
        if (s.kind == StepKind::soc && s.input == s.output) first = &soc;
        if (first && !*first) {
          mutations.push_back(static_cast<int64_t>(i));
          *first = true;
        }
      }
      REQUIRE(!mutations.empty());
      for (int64_t skip : mutations) {
        INFO("without step " << steps[static_cast<size_t>(skip)].name);
        const std::vector<float> wrong = run_steps(model, images, skip);
        CHECK_FALSE(same_bits(wrong, expected));
      }
    }
  }
}

TEST_CASE("LipConvnet's step list is the configured structure: kinds, names, groups and shuffles in order",
          "[model][steps]") {
  for (const StepVariant& v : step_variants()) {
    SECTION(v.name) {
      ModelConfig config = v.config;
      config.init_iterations = 0;  // structure only
      LipConvnet model(config);
      const std::vector<NetworkStep>& steps = model.steps();
      // The expected list, from the configuration (model.hpp's builder description and gs_soc_conv.hpp).
      size_t at = 0;
      auto next = [&](StepKind kind, const std::string& name) -> const NetworkStep& {
        INFO("expected " << step_kind_name(kind) << " " << name << " at " << at);
        REQUIRE(at < steps.size());
        const NetworkStep& s = steps[at++];
        CHECK(s.kind == kind);
        CHECK(s.name == name);
        return s;
      };
      auto check_shuffle = [&](const NetworkStep& s, int64_t channels, int64_t groups) {
        REQUIRE(s.shuffle != nullptr);
        const std::vector<int32_t>& destination = s.shuffle->destination();
        REQUIRE(static_cast<int64_t>(destination.size()) == channels);
        // channel_shuffle.hpp's formula, written out again.
        for (int64_t i = 0; i < channels; ++i) {
          const int64_t expected = config.paired()
                                       ? ((i / 2) % groups) * (channels / groups) + 2 * (i / (2 * groups)) + i % 2
                                       : (i % groups) * (channels / groups) + i / groups;
          CHECK(destination[static_cast<size_t>(i)] == expected);
        }
      };
      int64_t in_planes = 3, side = config.input_side;
      for (int stage = 0; stage < 5; ++stage) {
        const int64_t planes = stage == 0 ? config.init_channels : in_planes;
        for (int64_t b = 0; b < config.block_size(); ++b) {
          const std::string block = "stage" + std::to_string(stage + 1) + ".block" + std::to_string(b);
          const bool last = b == config.block_size() - 1;
          const int64_t stride = last ? 2 : 1, kernel = last && stage == 4 ? 1 : 3, out = planes * stride;
          if (config.conv == ConvKind::soc) {
            const NetworkStep& s = next(StepKind::soc, block + ".conv");
            CHECK(s.soc->config().groups == config.group_counts().first);
            CHECK((s.soc->config().kernel == kernel && s.soc->config().stride == stride));
            CHECK(s.input == (Shape{1, in_planes, side, side}));
          } else {
            const int64_t a = config.group_counts().first;
            if (in_planes % (config.paired() ? 2 * a : a) == 0)
              check_shuffle(next(StepKind::shuffle, block + ".conv.input_shuffle"), in_planes, a);
            const NetworkStep& first = next(StepKind::soc, block + ".conv.first");
            CHECK(first.soc->config().groups == a);
            CHECK((first.soc->config().kernel == kernel && first.soc->config().stride == stride));
            CHECK(first.input == (Shape{1, in_planes, side, side}));
            CHECK(first.soc->config().keep == config.keep);
            if (const std::optional<int64_t> second_groups = config.group_counts().second) {
              check_shuffle(next(StepKind::shuffle, block + ".conv.middle_shuffle"), out, *second_groups);
              const NetworkStep& second = next(StepKind::soc, block + ".conv.second");
              CHECK(second.soc->config().groups == *second_groups);
              CHECK(second.soc->config().kernel == 1);
              CHECK(second.input == (Shape{1, out, side / stride, side / stride}));
            }
          }
          const NetworkStep& act = next(StepKind::maxmin, block + ".activation");
          CHECK(act.maxmin->paired() == config.paired());
          CHECK(act.input == (Shape{1, out, side / stride, side / stride}));
          CHECK(act.block == block);
          in_planes = out;
          side /= stride;
        }
      }
      const NetworkStep& flatten = next(StepKind::flatten, "flatten");
      CHECK(flatten.output == (Shape{1, model.features(), 1, 1}));
      const NetworkStep& head = next(config.head == HeadKind::soc ? StepKind::soc : StepKind::lln, "head");
      CHECK(head.input == (Shape{1, model.features(), 1, 1}));
      CHECK(at == steps.size());
      // The SocConvs of the list are soc_layers(), which name the parameters and buffers of checkpoints.
      std::vector<std::string> soc_names;
      for (const NetworkStep& s : steps)
        if (s.kind == StepKind::soc) soc_names.push_back(s.name);
      std::vector<std::string> layer_names;
      for (const NamedSoc& s : model.soc_layers()) layer_names.push_back(s.name);
      CHECK(soc_names == layer_names);
    }
  }
}
