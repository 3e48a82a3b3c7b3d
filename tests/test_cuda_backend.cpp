// The CUDA backend's GPU-only concerns: availability and the device memory arena, CudaOptions (TF32 math,
// pointer checks), cuDNN's choice of reduced precision and its packed bf16 layout, a reduction that must stay exact
// in double over long groups, every layer's forward and backward against the CPU, orthogonality of SOC and GS-SOC
// on the GPU, and one training step of LipConvnet-15. Each Backend op against the double reference is
// tests/test_backend_ops.cpp's table, which runs on the GPU too (its test case "... on the GPU ...").
//
// All test cases carry the hidden tag [.gpu]: `orthoconv_tests` alone never runs them; `orthoconv_tests "[gpu]"`
// does (scripts/gpu-check.sh, and the ctest entries "gpu: ..." in builds with the CUDA backend). On a machine
// without a usable GPU each case returns at once after a warning containing ORTHOCONV_GPU_SKIPPED, which the
// ctest registration can turn into "skipped" (SKIP_REGULAR_EXPRESSION) instead of a vacuous pass.
// Pointer checking (CudaOptions::check_pointers) is on for all of them: a buffer left on the host fails loudly.
//
// Tolerances (relative, in the 2-norm, ||gpu - cpu|| / ||cpu||), from float32 arithmetic (eps = 6e-8):
//   convolutions: 1e-5, the bound (sums of up to C k^2 = 576 products: ~sqrt(576) * 6e-8 = 1.5e-6),
//   cuDNN running in plain FMA math (no TF32, CudaOptions::allow_tf32 off);
//   layers: forward and input gradient 2e-5 (K <= 12 convolutions in series, each within ~1.5e-6, plus sigma
//   from 50 power iterations on each side); parameter gradients 1e-4 (sums over batch x plane x terms and the
//   sigma correction, a difference of two terms of similar size);
//   LipConvnet-15 (15 layers in series): loss 1e-4, every parameter gradient 2e-3.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "orthoconv/cuda_options.hpp"
#include "orthoconv/jacobian.hpp"
#include "orthoconv/model.hpp"
#include "reference.hpp"

namespace ref = orthoconv::reference;
using namespace orthoconv;

namespace {

constexpr double kConvTolerance = 1e-5;
constexpr double kLayerTolerance = 2e-5;
constexpr double kParameterGradTolerance = 1e-4;

// True when the GPU tests can run; otherwise warns with the skip marker (see the file comment).
bool gpu_ready() {
  if (!cuda_available()) {
    WARN("ORTHOCONV_GPU_SKIPPED: no usable CUDA device, GPU test not run");
    return false;
  }
  CudaOptions options = cuda_options();
  options.check_pointers = true;
  options.allow_tf32 = false;
  set_cuda_options(options);
  return true;
}

// The CPU backend, or null in builds without oneDNN (then comparisons with it are skipped with a warning).
std::shared_ptr<Backend> cpu_or_null() {
  try {
    return cpu_backend();
  } catch (const Error&) {
    return nullptr;
  }
}

#define REQUIRE_CPU_BACKEND(name)                                                    \
  auto name = cpu_or_null();                                                         \
  if (!name) {                                                                       \
    WARN("this build has no CPU backend (oneDNN): comparison with the CPU not run"); \
    return;                                                                          \
  }

std::vector<float> random_floats(size_t count, uint64_t seed, double stddev = 1.0) {
  return ref::to_float(ref::random_normal(count, seed, stddev));
}

// A GPU tensor holding `host`.
Tensor upload(const std::vector<float>& host, const Shape& shape) {
  REQUIRE(static_cast<int64_t>(host.size()) == shape.numel());
  Tensor t(shape, Device::cuda);
  cuda_backend()->from_host(host.data(), t.data(), t.numel());
  return t;
}
Tensor upload(const std::vector<float>& host) { return upload(host, Shape{static_cast<int64_t>(host.size())}); }

Tensor host_tensor(const std::vector<float>& host, const Shape& shape) { return Tensor::from_vector(host, shape); }

std::vector<float> download(const Tensor& t) { return t.to_vector(); }

double rel_error(const std::vector<float>& actual, const std::vector<float>& expected) {
  REQUIRE(actual.size() == expected.size());
  return ref::norm_relative_error(ref::to_double(actual), ref::to_double(expected));
}

// An empty tensor on the GPU for layer outputs (layers resize their outputs on the tensor's own device).
Tensor gpu_output() { return Tensor(Shape{0}, Device::cuda); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("cuda_available() says whether a GPU is usable and never throws, cuda_backend() agrees", "[.gpu][cuda]") {
  bool available = false;
  REQUIRE_NOTHROW(available = cuda_available());
  if (!available) {
    REQUIRE_THROWS_AS(cuda_backend(), BackendError);
    REQUIRE_THROWS_AS(Tensor(Shape{4}, Device::cuda), BackendError);
    WARN("ORTHOCONV_GPU_SKIPPED: no usable CUDA device, GPU test not run");
    return;
  }
  auto gpu = cuda_backend();
  CHECK(gpu->device() == Device::cuda);
  CHECK(gpu->name().rfind("cuda", 0) == 0);
  CHECK(backend_for(Device::cuda) == gpu);
}

TEST_CASE("GPU tensors round-trip through the host, start zeroed, and a repeated step allocates nothing",
          "[.gpu][cuda][memory]") {
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  Tensor zero(Shape{3, 5, 7}, Device::cuda);
  CHECK(download(zero) == std::vector<float>(105, 0.0f));
  auto values = random_floats(1000, 1);
  Tensor t = upload(values);
  CHECK(download(t) == values);

  // The same sequence of allocations twice: the second time the arena serves everything from its cache.
  auto step = [&] {
    Tensor a(Shape{128, 64, 16, 16}, Device::cuda), b(Shape{128, 64, 16, 16}, Device::cuda);
    gpu->axpby(2.0f, a.data(), 1.0f, b.data(), a.numel());
    gpu->synchronize();
  };
  step();
  const int64_t before = cuda_memory_stats().allocations;
  for (int i = 0; i < 3; ++i) step();
  CHECK(cuda_memory_stats().allocations == before);
  CHECK(cuda_memory_stats().peak_bytes >= 2 * 128 * 64 * 16 * 16 * 4);

  // A host pointer is refused (check_pointers is on in these tests) with an orthoconv::BackendError.
  std::vector<float> host(16);
  CHECK_THROWS_AS(gpu->fill(host.data(), 16, 1.0f), BackendError);
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("CudaOptions::allow_tf32 switches cuDNN's math and back, off again, float32 accuracy returns",
          "[.gpu][cuda][conv]") {
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  ConvShape s;
  s.batch = 8;
  s.in_channels = s.out_channels = 64;
  s.height = s.width = 16;
  s.kernel = 3;
  ref::ConvDims d{s.batch, s.in_channels, s.out_channels, s.height, s.width, s.kernel, s.groups};
  auto x = random_floats(static_cast<size_t>(d.input_size()), 701);
  auto w = random_floats(static_cast<size_t>(d.weight_size()), 702, 1.0 / 24.0);
  const auto expected = ref::conv_forward(d, ref::to_double(x), ref::to_double(w));
  Tensor gx = upload(x), gw = upload(w), gy(Shape{d.output_size()}, Device::cuda);
  auto run = [&](bool tf32) {
    CudaOptions options = cuda_options();
    options.allow_tf32 = tf32;
    set_cuda_options(options);
    gpu->conv_forward(s, gx.data(), gw.data(), gy.data(), false);
    return ref::norm_relative_error(ref::to_double(download(gy)), expected);
  };
  // TF32 keeps 10 mantissa bits: ~5e-4 per product, ~1e-3 for these sums at worst.
  CHECK(run(true) < 5e-3);
  CHECK(run(false) < kConvTolerance);
  CHECK_FALSE(cuda_options().allow_tf32);
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("GPU group_dot is exact in double over long groups (two-stage reduction)", "[.gpu][cuda][filter]") {
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  const int64_t groups = 3, group_size = 1 << 20;
  auto a = random_floats(static_cast<size_t>(groups * group_size), 91), b = random_floats(a.size(), 92);
  Tensor ga = upload(a), gb = upload(b);
  std::vector<float> out(groups);
  gpu->group_dot(ga.data(), gb.data(), out.data(), groups, group_size);
  for (int64_t g = 0; g < groups; ++g) {
    double expected = 0.0;
    for (int64_t i = g * group_size; i < (g + 1) * group_size; ++i) expected += double(a[size_t(i)]) * b[size_t(i)];
    CHECK(out[size_t(g)] == Approx(expected).epsilon(1e-6));
  }
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("GPU softmax cross-entropy refuses a label outside 0 .. classes-1 before launching", "[.gpu][cuda][train]") {
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  std::vector<int32_t> bad{0, 100};
  Tensor two(Shape{200}, Device::cuda), d2(Shape{200}, Device::cuda);
  double loss = 0.0;
  int64_t correct = 0;
  CHECK_THROWS_AS(gpu->softmax_cross_entropy(two.data(), bad.data(), 2, 100, d2.data(), &loss, &correct), Error);
}

// ---------------------------------------------------------------------------------------------------------------
namespace {

// Runs forward and backward of the same layer on the CPU and the GPU and compares outputs and gradients.
void compare_layer(Layer& cpu_layer, Layer& gpu_layer, const Shape& input_shape, uint64_t seed) {
  auto x = random_floats(static_cast<size_t>(input_shape.numel()), seed);
  const Shape out_shape = cpu_layer.output_shape(input_shape);
  REQUIRE(gpu_layer.output_shape(input_shape) == out_shape);
  auto dy = random_floats(static_cast<size_t>(out_shape.numel()), seed + 1);
  Tensor cx = host_tensor(x, input_shape), cdy = host_tensor(dy, out_shape), cy, cdx;
  Tensor gx = upload(x, input_shape), gdy = upload(dy, out_shape), gy = gpu_output(), gdx = gpu_output();
  cpu_layer.zero_grad();
  gpu_layer.zero_grad();
  cpu_layer.forward(cx, cy);
  gpu_layer.forward(gx, gy);
  REQUIRE(gy.device() == Device::cuda);
  REQUIRE(gy.shape() == cy.shape());
  CHECK(rel_error(download(gy), cy.to_vector()) < kLayerTolerance);
  cpu_layer.backward(cdy, cdx);
  gpu_layer.backward(gdy, gdx);
  REQUIRE(gdx.shape() == cdx.shape());
  CHECK(rel_error(download(gdx), cdx.to_vector()) < kLayerTolerance);
  auto cpu_params = cpu_layer.parameters(), gpu_params = gpu_layer.parameters();
  REQUIRE(cpu_params.size() == gpu_params.size());
  for (size_t i = 0; i < cpu_params.size(); ++i) {
    INFO("parameter " << i << " (" << cpu_params[i]->name << ")");
    CHECK(rel_error(download(gpu_params[i]->grad), cpu_params[i]->grad.to_vector()) < kParameterGradTolerance);
  }
}

SocConfig soc_config(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t groups, uint64_t seed) {
  SocConfig c;
  c.in_channels = in;
  c.out_channels = out;
  c.kernel = kernel;
  c.stride = stride;
  c.groups = groups;
  c.seed = seed;
  return c;
}

}  // namespace

TEST_CASE("GPU MaxMin and ChannelShuffle layers match the CPU (forward and backward)", "[.gpu][cuda][layers]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  for (bool paired : {false, true}) {
    MaxMin c(paired, cpu), g(paired, gpu);
    compare_layer(c, g, Shape{3, 8, 5, 5}, 200);
    ChannelShuffle cs(16, 4, paired, false, cpu), gs(16, 4, paired, false, gpu);
    compare_layer(cs, gs, Shape{2, 16, 3, 3}, 210);
    ChannelShuffle ci(16, 4, paired, true, cpu), gi(16, 4, paired, true, gpu);
    compare_layer(ci, gi, Shape{2, 16, 3, 3}, 220);
  }
}

TEST_CASE(
    "GPU SocConv matches the CPU in training and evaluation mode: stride 1/2, grouped, truncating, "
    "keep per group",
    "[.gpu][cuda][layers][soc]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  struct Case {
    SocConfig config;
    Shape input;
  };
  std::vector<Case> cases = {
      {soc_config(16, 16, 3, 1, 1, 1), Shape{4, 16, 8, 8}}, {soc_config(8, 16, 3, 1, 1, 2), Shape{2, 8, 6, 6}},
      {soc_config(16, 8, 3, 1, 1, 3), Shape{2, 16, 6, 6}},  {soc_config(8, 32, 3, 2, 1, 4), Shape{2, 8, 8, 8}},
      {soc_config(16, 16, 3, 1, 4, 5), Shape{3, 16, 8, 8}}, {soc_config(32, 32, 1, 1, 1, 6), Shape{2, 32, 4, 4}},
      {soc_config(8, 16, 3, 2, 4, 7), Shape{2, 8, 8, 8}},   {soc_config(12, 12, 5, 1, 2, 8), Shape{2, 12, 7, 7}}};
  cases.back().config.keep = KeepChannels::first;
  SocConfig per_group = soc_config(16, 8, 3, 1, 4, 9);
  per_group.keep = KeepChannels::per_group;
  cases.push_back({per_group, Shape{2, 16, 6, 6}});
  for (const Case& c : cases) {
    SocConv cl(c.config, cpu), gl(c.config, gpu);
    INFO(cl.describe() << " on " << c.input.str());
    CHECK(rel_error(gl.sigma(), cl.sigma()) < 1e-5);
    for (bool training : {true, false}) {
      INFO("training " << training);
      cl.set_training(training);
      gl.set_training(training);
      compare_layer(cl, gl, c.input, 300);
    }
  }
}

TEST_CASE("GPU GsSocConv matches the CPU for (4,1), (4,-), (2,4) and paired shuffles", "[.gpu][cuda][layers][gs-soc]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  struct Case {
    int64_t a;
    std::optional<int64_t> b;
    bool paired;
    int64_t in, out, stride;
  };
  for (const Case& c : {Case{4, 1, false, 16, 16, 1}, Case{4, std::nullopt, false, 16, 16, 1},
                        Case{2, 4, false, 16, 16, 1}, Case{4, 1, true, 16, 16, 1}, Case{4, 1, false, 8, 32, 2}}) {
    GsSocConfig config;
    config.base = soc_config(c.in, c.out, 3, c.stride, 1, 11);
    config.groups = GroupCounts{c.a, c.b};
    config.paired = c.paired;
    GsSocConv cl(config, cpu), gl(config, gpu);
    INFO(cl.describe());
    for (bool training : {true, false}) {
      cl.set_training(training);
      gl.set_training(training);
      compare_layer(cl, gl, Shape{2, c.in, 8, 8}, 400);
    }
  }
}

TEST_CASE("GPU SocConv and GsSocConv on the matrix path match the CPU's matrix and series paths",
          "[.gpu][cuda][layers][matrix]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  struct Case {
    SocConfig config;
    Shape input;
  };
  for (Case c : {Case{soc_config(32, 32, 1, 1, 1, 61), Shape{4, 32, 8, 8}},
                 Case{soc_config(64, 64, 1, 1, 4, 62), Shape{2, 64, 4, 4}},
                 Case{soc_config(16, 32, 1, 2, 2, 63), Shape{2, 16, 8, 8}},
                 Case{soc_config(512, 512, 1, 1, 1, 64), Shape{128, 512, 2, 2}},
                 Case{soc_config(96, 10, 1, 1, 1, 65), Shape{8, 96, 1, 1}}}) {
    for (bool training : {true, false})
      for (SocPath variant : {SocPath::matrix_conv, SocPath::matrix_gemm}) {
        c.config.path = variant;
        SocConv cl(c.config, cpu), gl(c.config, gpu);
        INFO(gl.describe() << " on " << c.input.str() << (training ? ", training" : ", evaluation"));
        cl.set_training(training);
        gl.set_training(training);
        compare_layer(cl, gl, c.input, 700);
        CHECK(gl.last_path() == variant);
        // The GPU's matrix path against the CPU's series path (the same function).
        c.config.path = SocPath::series;
        SocConv cs(c.config, cpu);
        cs.set_training(training);
        compare_layer(cs, gl, c.input, 710);
      }
  }
  GsSocConfig config;
  config.base = soc_config(64, 64, 3, 1, 1, 66);
  config.groups = GroupCounts{4, 1};
  GsSocConv cl(config, cpu), gl(config, gpu);
  cl.second()->set_path(SocPath::matrix);
  gl.second()->set_path(SocPath::matrix);
  for (bool training : {true, false}) {
    cl.set_training(training);
    gl.set_training(training);
    compare_layer(cl, gl, Shape{8, 64, 8, 8}, 720);
    CHECK(is_matrix_path(gl.second()->last_path()));
  }
}

TEST_CASE("a steady-state GS-SOC training step on the GPU takes no new device memory", "[.gpu][cuda][memory]") {
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  GsSocConfig config;
  config.base = soc_config(32, 32, 3, 1, 1, 31);
  config.groups = GroupCounts{4, 1};
  GsSocConv layer(config, gpu);
  const Shape input{16, 32, 16, 16};
  Tensor x = upload(random_floats(static_cast<size_t>(input.numel()), 32), input);
  Tensor dy = upload(random_floats(static_cast<size_t>(input.numel()), 33), input);
  Tensor y = gpu_output(), dx = gpu_output();
  auto step = [&] {
    layer.zero_grad();
    layer.forward(x, y);
    layer.backward(dy, dx);
    gpu->synchronize();
  };
  step();
  step();
  const auto before = cuda_memory_stats();
  for (int i = 0; i < 3; ++i) step();
  const auto after = cuda_memory_stats();
  CHECK(after.allocations == before.allocations);
  CHECK(after.reserved_bytes == before.reserved_bytes);
}

// ---------------------------------------------------------------------------------------------------------------
namespace {

// The Jacobian of a GPU layer on a [1, C, H, W] input from impulse responses computed on the GPU (layer_jacobian
// runs on the CPU backend), all impulses in one batch: J e_i = f(e_i) - f(0).
DenseMatrix gpu_jacobian(Layer& layer, const Shape& input_shape) {
  const Shape out_shape = layer.output_shape(input_shape);
  const int64_t in = input_shape.numel(), out = out_shape.numel();
  std::vector<float> impulses(static_cast<size_t>((in + 1) * in), 0.0f);  // the last image is zero
  for (int64_t i = 0; i < in; ++i) impulses[static_cast<size_t>(i * in + i)] = 1.0f;
  Tensor x = upload(impulses, Shape{in + 1, input_shape[1], input_shape[2], input_shape[3]});
  Tensor y = gpu_output();
  layer.forward(x, y);
  const auto host = download(y);
  DenseMatrix jac{out, in, std::vector<double>(static_cast<size_t>(in * out))};
  for (int64_t i = 0; i < in; ++i)
    for (int64_t r = 0; r < out; ++r)
      jac.values[static_cast<size_t>(r * in + i)] =
          static_cast<double>(host[static_cast<size_t>(i * out + r)]) - host[static_cast<size_t>(in * out + r)];
  return jac;
}

// Tolerance as in test_orthogonality.cpp: series truncation < 1e-9 at 12 terms; float32 rounding ~1e-6.
void check_orthogonal(Layer& layer, const Shape& input) {
  layer.set_training(false);
  const auto sv = singular_values(gpu_jacobian(layer, input));
  INFO("largest singular value " << sv.front() << ", smallest " << sv.back());
  CHECK(std::abs(sv.front() - 1.0) < 1e-5);
  CHECK(std::abs(sv.back() - 1.0) < 1e-5);
}

}  // namespace

TEST_CASE("SocConv and GsSocConv on the GPU are orthogonal: all Jacobian singular values are 1 +- 1e-5",
          "[.gpu][cuda][orthogonality]") {
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  SocConv plain(soc_config(8, 8, 3, 1, 1, 21), gpu);
  check_orthogonal(plain, Shape{1, 8, 6, 6});
  SocConv grouped(soc_config(8, 8, 3, 1, 2, 22), gpu);
  check_orthogonal(grouped, Shape{1, 8, 6, 6});
  SocConv strided(soc_config(4, 16, 3, 2, 1, 23), gpu);  // c_out = 4 c_in: an isometry
  check_orthogonal(strided, Shape{1, 4, 8, 8});
  for (std::optional<int64_t> b : {std::optional<int64_t>{1}, std::optional<int64_t>{}}) {
    GsSocConfig config;
    config.base = soc_config(16, 16, 3, 1, 1, 24);
    config.groups = GroupCounts{4, b};
    GsSocConv gs(config, gpu);
    INFO(gs.describe());
    check_orthogonal(gs, Shape{1, 16, 4, 4});
    if (gs.second()) {  // and on the matrix path
      gs.second()->set_path(SocPath::matrix);
      check_orthogonal(gs, Shape{1, 16, 4, 4});
      CHECK(is_matrix_path(gs.second()->last_path()));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("one training step of LipConvnet-15 on the GPU gives the CPU's loss and gradients", "[.gpu][cuda][model]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  for (std::string conv : {"soc", "gs-soc"}) {
    INFO("conv " << conv);
    ModelConfig config;
    config.conv = parse_conv_kind(conv);
    config.groups = default_groups(config.conv);  // soc: (1, -); gs-soc: (4, 1)
    config.depth = 15;
    config.classes = 100;
    LipConvnet cpu_model(config, cpu), gpu_model(config, gpu);
    const int64_t batch = 4;
    const Shape image_shape{batch, 3, 32, 32};
    auto images = random_floats(static_cast<size_t>(image_shape.numel()), 600);
    std::vector<int32_t> labels{3, 14, 15, 92};

    auto step = [&](LipConvnet& model, Backend& be, const Tensor& x, double& loss, std::vector<float>& diff) {
      Tensor logits = model.backend().device() == Device::cuda ? gpu_output() : Tensor();
      model.zero_grad();
      model.forward(x, logits);
      REQUIRE(logits.numel() == batch * config.classes);
      Tensor diff_logits(logits.shape(), logits.device());
      int64_t correct = 0;
      be.softmax_cross_entropy(logits.data(), labels.data(), batch, config.classes, diff_logits.data(), &loss,
                               &correct);
      model.backward(diff_logits);
      diff = download(diff_logits);
    };
    double cpu_loss = 0.0, gpu_loss = 0.0;
    std::vector<float> cpu_diff, gpu_diff;
    step(cpu_model, *cpu, host_tensor(images, image_shape), cpu_loss, cpu_diff);
    step(gpu_model, *gpu, upload(images, image_shape), gpu_loss, gpu_diff);
    CHECK(gpu_loss == Approx(cpu_loss).epsilon(1e-4));
    CHECK(rel_error(gpu_diff, cpu_diff) < 1e-3);
    auto cpu_params = cpu_model.parameters(), gpu_params = gpu_model.parameters();
    REQUIRE(cpu_params.size() == gpu_params.size());
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      INFO(cpu_params[i].name);
      CHECK(gpu_params[i].name == cpu_params[i].name);
      CHECK(rel_error(download(gpu_params[i].parameter->grad), cpu_params[i].parameter->grad.to_vector()) < 2e-3);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Reduced precision (ConvShape::precision), on GPUs with compute capability >= 8.0 (elsewhere conv_precision says
// fp32 and check_precision refuses; both checked).
namespace {

bool gpu_has_tensor_cores() { return ref::runs_precision(*cuda_backend(), ConvPrecision::tf32); }

}  // namespace

TEST_CASE("cuDNN reduced precision: which passes run it, the refusal without tensor cores, bf16 packing bit for bit",
          "[.gpu][cuda][conv][precision]") {
  // The accuracy of the tf32 and bf16 convolutions against the double reference is tests/test_backend_ops.cpp's
  // (its bf16 and tf32 rows run on the GPU); here the CUDA backend's own choices and its packed bf16 layout.
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  ConvShape s;
  s.batch = 6;
  s.in_channels = s.out_channels = 32;
  s.height = s.width = 8;
  s.kernel = 3;
  s.groups = 2;
  const ref::ConvDims d{s.batch, 32, 32, 8, 8, 3, 2};
  const auto x = random_floats(static_cast<size_t>(d.input_size()), 801);
  if (!gpu_has_tensor_cores()) {
    s.precision = ConvPrecision::bf16;
    CHECK(gpu->conv_precision(s, ConvPass::forward) == ConvPrecision::fp32);
    REQUIRE_THROWS_WITH(gpu->check_precision(ConvPrecision::bf16), Catch::Contains("precision bf16"));
    WARN("this GPU has no bf16/TF32 tensor cores: reduced precision refused as it must be, not run");
    return;
  }
  s.precision = ConvPrecision::tf32;
  CHECK(gpu->conv_precision(s, ConvPass::forward) == ConvPrecision::tf32);
  s.precision = ConvPrecision::bf16;
  REQUIRE(gpu->conv_precision(s, ConvPass::forward) == ConvPrecision::bf16);
  REQUIRE(gpu->conv_precision(s, ConvPass::backward_weights) == ConvPrecision::bf16);
  CHECK(gpu->conv_precision(s, ConvPass::backward_data) == ConvPrecision::fp32);
  // The rounding itself, bit for bit (two bf16 values per float, NCHW).
  const ref::Vec xr = ref::round_to_bf16(ref::to_double(x));
  Tensor gx = upload(x), lx(Shape{gpu->conv_input_size(s)}, Device::cuda);
  gpu->to_conv_input(s, gx.data(), lx.data());
  const auto packed = download(lx);
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t word;
    std::memcpy(&word, &packed[i / 2], sizeof(word));
    const uint32_t bits = (i % 2 ? word >> 16 : word & 0xffffu) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    if (static_cast<double>(value) != xr[i]) {
      FAIL_CHECK("element " << i << " rounds to " << value << ", reference " << xr[i]);
      break;
    }
  }
}

TEST_CASE("bf16 and tf32 SocConv on the GPU with a zero filter: the identity path bit for bit (x0, h_1 float32)",
          "[.gpu][cuda][precision]") {
  if (!gpu_ready()) return;
  if (!gpu_has_tensor_cores()) {
    WARN("this GPU has no bf16/TF32 tensor cores: not run");
    return;
  }
  for (ConvPrecision precision : {ConvPrecision::tf32, ConvPrecision::bf16}) {
    SocConfig config;
    config.in_channels = config.out_channels = 32;
    config.kernel = 3;
    config.seed = 9;
    config.precision = precision;
    SocConv layer(config, cuda_backend());
    INFO(layer.describe());
    cuda_backend()->fill(layer.weight().value.data(), layer.weight().value.numel(), 0.0f);
    const Shape in{3, 32, 6, 6};
    const auto x = random_floats(static_cast<size_t>(in.numel()), 901), dy = random_floats(x.size(), 902);
    Tensor y = gpu_output(), dx = gpu_output();
    layer.forward(upload(x, in), y);
    layer.backward(upload(dy, in), dx);
    const auto bias = download(layer.bias().value);
    std::vector<float> want(x.size());
    for (size_t i = 0; i < x.size(); ++i) want[i] = x[i] + bias[(i / 36) % 32];
    CHECK(download(y) == want);
    CHECK(download(dx) == dy);
  }
}
