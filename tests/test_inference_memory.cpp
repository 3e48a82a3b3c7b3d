// Evaluation-mode memory of SocConv: the forward keeps none of its K+1 series terms (x0 and two alternating terms
// live in the backend's three shared buffers, reused by every layer), computes exactly what the kept-terms path
// computes, and a backward after it (attacks, Jacobians, gradients in evaluation mode) recomputes the terms and
// gives exactly the same gradients.
#include <catch2/catch.hpp>

#include <random>

#include "orthoconv/orthoconv.hpp"

using namespace orthoconv;

namespace {

SocConfig soc_config(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t groups, KeepChannels keep,
                     int terms) {
  SocConfig c;
  c.in_channels = in;
  c.out_channels = out;
  c.kernel = kernel;
  c.stride = stride;
  c.groups = groups;
  c.keep = keep;
  c.train_terms = c.eval_terms = terms;
  c.seed = 9;
  return c;
}

Tensor random_tensor(const Shape& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (float& x : v) x = normal(rng);
  return Tensor::from_vector(v, shape);
}

struct Pass {
  std::vector<float> output, diff_input;
  std::vector<std::vector<float>> grads;
};

// Forward and backward in evaluation mode, or in training mode with u, v held (the same function, with the terms
// kept by the forward): the two must agree bit for bit.
Pass run(Layer& layer, bool evaluation, const Tensor& x, const Tensor& dy) {
  layer.set_training(!evaluation);
  Tensor y, dx;
  layer.forward(x, y);
  layer.zero_grad();
  layer.backward(dy, dx);
  Pass p{y.to_vector(), dx.to_vector(), {}};
  for (Parameter* q : layer.parameters()) p.grads.push_back(q->grad.to_vector());
  return p;
}

void check_same(const Pass& lean, const Pass& kept) {
  CHECK(lean.output == kept.output);
  CHECK(lean.diff_input == kept.diff_input);
  CHECK(lean.grads == kept.grads);
}

struct Case {
  int64_t in, out, kernel, stride, groups;
  KeepChannels keep;
};
// Square; padded (4 -> 16 after the unshuffle to 16); truncated per group after a stride-2 unshuffle; a 1x1 head.
const Case kCases[] = {{8, 8, 3, 1, 2, KeepChannels::first},
                       {4, 16, 3, 2, 1, KeepChannels::first},
                       {8, 16, 3, 2, 4, KeepChannels::per_group},
                       {24, 10, 1, 1, 1, KeepChannels::first}};

}  // namespace

TEST_CASE("an evaluation-mode SocConv forward keeps no series terms, whatever the number of terms",
          "[inference-memory][soc]") {
  auto backend = cpu_backend();
  for (const Case& c : kCases) {
    for (int terms : {4, 12, 24}) {
      SocConfig config = soc_config(c.in, c.out, c.kernel, c.stride, c.groups, c.keep, terms);
      // The series path's memory (a 1x1 layer may otherwise take the matrix path, which keeps no terms either
      // way; tests/test_soc_matrix.cpp covers it).
      config.path = SocPath::series;
      INFO("SocConv " << c.in << "->" << c.out << " k" << c.kernel << " s" << c.stride << " g" << c.groups << ", "
                      << terms << " terms");
      const Shape input{4, c.in, 16, 16};
      ConvShape shape;
      shape.batch = 4;
      shape.in_channels = shape.out_channels = config.group_channels() * c.groups;
      shape.height = shape.width = 16 / c.stride;
      shape.kernel = c.kernel;
      shape.groups = c.groups;
      const int64_t series_buffer = backend->conv_buffer_size(shape) * static_cast<int64_t>(sizeof(float));

      SocConv evaluated(config);
      evaluated.set_training(false);
      Tensor y;
      evaluated.forward(random_tensor(input, 1), y);
      // What it keeps: A, A_n and the filter copies, never a series term: less than one series buffer beyond
      // the filters (which are small here).
      const int64_t filters = 3 * evaluated.weight().value.numel() * static_cast<int64_t>(sizeof(float));
      CHECK(evaluated.retained_bytes() < series_buffer + (terms + 1) * filters);
      for (int slot = 0; slot < Backend::kSharedBuffers; ++slot)
        CHECK(backend->shared_buffer(slot).storage_floats() * static_cast<int64_t>(sizeof(float)) >= series_buffer);

      SocConv trained(config);
      trained.forward(random_tensor(input, 1), y);  // training mode: the K+1 terms stay for the backward
      CHECK(trained.retained_bytes() >= (terms + 1) * series_buffer);

      // The matrix path in training keeps C x C matrices, never K+1 terms: matrix-conv x0 and y in the conv
      // layout; matrix-gemm nothing of x0 (the input itself here) and the NCHW staging of the truncated y.
      if (c.kernel == 1)
        for (SocPath path : {SocPath::matrix_conv, SocPath::matrix_gemm}) {
          SocConfig matrix_config = config;
          matrix_config.path = path;
          SocConv matrix(matrix_config);
          matrix.forward(random_tensor(input, 1), y);
          REQUIRE(matrix.last_path() == path);
          const int64_t channels = config.group_channels();
          const int64_t matrices = (terms + 8) * c.groups * channels * channels * static_cast<int64_t>(sizeof(float));
          const int64_t buffers = path == SocPath::matrix_conv ? 2 : 0;
          CHECK(matrix.retained_bytes() >= buffers * series_buffer);
          CHECK(matrix.retained_bytes() < (buffers + 1) * series_buffer + matrices + (terms + 1) * filters);
        }
    }
  }
}

TEST_CASE("evaluation-mode forward and backward equal the kept-terms path bit for bit (SocConv, GsSocConv, model)",
          "[inference-memory][soc][gs-soc][gradient]") {
  for (const Case& c : kCases) {
    INFO("SocConv " << c.in << "->" << c.out << " k" << c.kernel << " s" << c.stride << " g" << c.groups);
    SocConfig config = soc_config(c.in, c.out, c.kernel, c.stride, c.groups, c.keep, 7);
    config.schedule = PowerSchedule::hold();  // training mode then computes the evaluation-mode function
    SocConv layer(config), twin(config);      // the same layer twice: nothing left over from one pass to the other
    const Shape input{3, c.in, 8, 8};
    const Tensor x = random_tensor(input, 2), dy = random_tensor(layer.output_shape(input), 3);
    check_same(run(twin, true, x, dy), run(layer, false, x, dy));
  }

  GsSocConfig gs;
  gs.base = soc_config(16, 32, 3, 2, 1, KeepChannels::first, 6);
  gs.base.schedule = PowerSchedule::hold();
  gs.groups = GroupCounts{4, 2};
  GsSocConv layer(gs), twin(gs);
  const Shape input{2, 16, 8, 8};
  const Tensor x = random_tensor(input, 4), dy = random_tensor(layer.output_shape(input), 5);
  check_same(run(twin, true, x, dy), run(layer, false, x, dy));

  // A whole network: layers of different widths take turns in the shared buffers.
  ModelConfig m;
  m.depth = 10;
  m.init_channels = 4;
  m.classes = 10;
  m.train_terms = m.eval_terms = 6;
  m.power_schedule = PowerSchedule::hold();
  LipConvnet model(m), model_twin(m);
  const Tensor images = random_tensor(Shape{2, 3, 32, 32}, 6), diff_logits = random_tensor(Shape{2, 10}, 7);
  auto model_pass = [&](LipConvnet& net, bool evaluation) {
    net.set_training(!evaluation);
    Tensor logits, diff_images;
    net.forward(images, logits);
    net.zero_grad();
    net.backward(diff_logits, &diff_images);
    Pass p{logits.to_vector(), diff_images.to_vector(), {}};
    for (const NamedParameter& q : net.parameters()) p.grads.push_back(q.parameter->grad.to_vector());
    return p;
  };
  check_same(model_pass(model_twin, true), model_pass(model, false));
}

TEST_CASE("without parameter gradients a backward gives the same input gradient and leaves every grad untouched",
          "[inference-memory][gradient]") {
  for (const std::string head : {"soc", "lln"}) {
    for (bool evaluation : {true, false}) {
      INFO(head << " head, " << (evaluation ? "evaluation" : "training") << " mode");
      ModelConfig m;
      m.depth = 5;
      m.init_channels = 4;
      m.classes = 10;
      m.head = parse_head(head);
      m.power_schedule = PowerSchedule::hold();
      LipConvnet full(m), input_only(m);
      input_only.set_parameter_gradients(false);
      CHECK_FALSE(input_only.parameter_gradients());
      const Tensor images = random_tensor(Shape{2, 3, 32, 32}, 8), diff_logits = random_tensor(Shape{2, 10}, 9);
      std::vector<float> diff_images[2];
      LipConvnet* models[2] = {&full, &input_only};
      for (int i = 0; i < 2; ++i) {
        models[i]->set_training(!evaluation);
        Tensor logits, dx;
        models[i]->forward(images, logits);
        for (const NamedParameter& p : models[i]->parameters()) {  // a marker a backward would have to change
          std::vector<float> marker(static_cast<size_t>(p.parameter->grad.numel()), 0.25f);
          p.parameter->grad = Tensor::from_vector(marker, p.parameter->grad.shape());
        }
        models[i]->backward(diff_logits, &dx);
        diff_images[i] = dx.to_vector();
      }
      CHECK(diff_images[1] == diff_images[0]);
      int changed = 0;
      for (const NamedParameter& p : full.parameters())
        for (float g : p.parameter->grad.to_vector()) changed += g != 0.25f;
      CHECK(changed > 0);
      for (const NamedParameter& p : input_only.parameters()) {
        INFO(p.name);
        for (float g : p.parameter->grad.to_vector()) REQUIRE(g == 0.25f);
      }
    }
  }
}
