// The CUDA backend against the CPU backend (oneDNN) and the double-precision reference: every primitive on
// random inputs, every layer's forward and backward, orthogonality of SOC and GS-SOC on the GPU, and one
// training step of LipConvnet-15.
//
// All test cases carry the hidden tag [.gpu]: `orthoconv_tests` alone never runs them; `orthoconv_tests "[gpu]"`
// does (scripts/gpu-check.sh, and the ctest entries "gpu: ..." in builds with the CUDA backend). On a machine
// without a usable GPU each case returns at once after a warning containing ORTHOCONV_GPU_SKIPPED, which the
// ctest registration can turn into "skipped" (SKIP_REGULAR_EXPRESSION) instead of a vacuous pass.
// Pointer checking (CudaOptions::check_pointers) is on for all of them: a buffer left on the host fails loudly.
//
// Tolerances (relative, in the 2-norm, ||gpu - cpu|| / ||cpu||), from float32 arithmetic (eps = 6e-8):
//   exact data movement (copies, permutations, unshuffle, MaxMin, skew): bitwise equal;
//   elementwise arithmetic: 1e-6 (one rounding each, possibly fused multiply-add on one side);
//   reductions accumulated in double: 1e-6;
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
constexpr double kElementwiseTolerance = 1e-6;
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

#define REQUIRE_CPU_BACKEND(name)                                                       \
  auto name = cpu_or_null();                                                            \
  if (!name) {                                                                          \
    WARN("this build has no CPU backend (oneDNN): comparison with the CPU not run");   \
    return;                                                                             \
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
TEST_CASE("cuDNN grouped convolution matches the double reference and oneDNN (forward, accumulate, scaled, "
          "backward-data, backward-weights)", "[.gpu][cuda][conv]") {
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  auto cpu = cpu_or_null();
  struct Case {
    int64_t batch, channels, height, width, kernel, groups;
  };
  const Case cases[] = {{3, 8, 5, 7, 1, 1},   {3, 8, 5, 7, 3, 1},    {2, 12, 6, 6, 3, 4}, {2, 16, 8, 8, 3, 16},
                        {2, 24, 9, 5, 5, 2},  {4, 32, 8, 8, 3, 4},   {2, 64, 4, 4, 1, 1}, {2, 64, 16, 16, 3, 1},
                        {10, 32, 8, 8, 3, 1}, {1, 128, 4, 4, 3, 4}};
  uint64_t seed = 500;
  for (const Case& c : cases) {
    ConvShape s;
    s.batch = c.batch;
    s.in_channels = s.out_channels = c.channels;
    s.height = c.height;
    s.width = c.width;
    s.kernel = c.kernel;
    s.groups = c.groups;
    INFO("convolution " << s.str());
    ref::ConvDims d{s.batch, s.in_channels, s.out_channels, s.height, s.width, s.kernel, s.groups};
    auto x = random_floats(static_cast<size_t>(d.input_size()), ++seed);
    auto w = random_floats(static_cast<size_t>(d.weight_size()), ++seed, 1.0 / std::sqrt(double(c.channels)));
    auto dy = random_floats(static_cast<size_t>(d.output_size()), ++seed);
    auto y0 = random_floats(static_cast<size_t>(d.output_size()), ++seed);

    REQUIRE(gpu->conv_buffer_size(s) == d.input_size());
    Tensor gx(Shape{gpu->conv_buffer_size(s)}, Device::cuda), gdy(Shape{gpu->conv_buffer_size(s)}, Device::cuda);
    Tensor gy(Shape{gpu->conv_buffer_size(s)}, Device::cuda), gdx(Shape{gpu->conv_buffer_size(s)}, Device::cuda);
    Tensor gw = upload(w), gwf(Shape{gpu->conv_weights_size(s, ConvPass::forward)}, Device::cuda);
    Tensor gwb(Shape{gpu->conv_weights_size(s, ConvPass::backward_data)}, Device::cuda);
    Tensor gdw(Shape{d.weight_size()}, Device::cuda);
    Tensor ux = upload(x), udy = upload(dy), uy0 = upload(y0);
    gpu->to_conv_layout(s, ux.data(), gx.data());
    gpu->to_conv_layout(s, udy.data(), gdy.data());
    gpu->weights_to_conv_layout(s, ConvPass::forward, gw.data(), gwf.data());
    gpu->weights_to_conv_layout(s, ConvPass::backward_data, gw.data(), gwb.data());

    Tensor out(Shape{d.output_size()}, Device::cuda);
    gpu->conv_forward(s, gx.data(), gwf.data(), gy.data(), false);
    gpu->from_conv_layout(s, gy.data(), out.data());
    const auto y = download(out);
    gpu->to_conv_layout(s, uy0.data(), gy.data());
    gpu->conv_forward(s, gx.data(), gwf.data(), gy.data(), true);
    gpu->from_conv_layout(s, gy.data(), out.data());
    const auto y_acc = download(out);
    // Scaled, with and without an addend (SocConv's Horner step): dst = alpha * conv + addend.
    Tensor gsc(Shape{gpu->conv_buffer_size(s)}, Device::cuda);
    gpu->to_conv_layout(s, uy0.data(), gy.data());
    gpu->conv_forward_scaled(s, gx.data(), gwf.data(), -0.25f, gy.data(), gsc.data());
    gpu->from_conv_layout(s, gsc.data(), out.data());
    const auto y_scaled_addend = download(out);
    gpu->conv_forward_scaled(s, gx.data(), gwf.data(), 0.5f, nullptr, gsc.data());
    gpu->from_conv_layout(s, gsc.data(), out.data());
    const auto y_scaled = download(out);
    gpu->conv_backward_data(s, gdy.data(), gwb.data(), gdx.data());
    gpu->from_conv_layout(s, gdx.data(), out.data());
    const auto dx = download(out);
    gpu->conv_backward_weights(s, gx.data(), gdy.data(), gdw.data());
    const auto dw = download(gdw);

    const auto ry = ref::conv_forward(d, ref::to_double(x), ref::to_double(w));
    auto ry_acc = ry;
    for (size_t i = 0; i < ry_acc.size(); ++i) ry_acc[i] += y0[i];
    CHECK(ref::norm_relative_error(ref::to_double(y), ry) < kConvTolerance);
    CHECK(ref::norm_relative_error(ref::to_double(y_acc), ry_acc) < kConvTolerance);
    auto ry_scaled = ry, ry_scaled_addend = ry;
    for (size_t i = 0; i < ry.size(); ++i) {
      ry_scaled[i] = 0.5 * ry[i];
      ry_scaled_addend[i] = -0.25 * ry[i] + y0[i];
    }
    CHECK(ref::norm_relative_error(ref::to_double(y_scaled), ry_scaled) < kConvTolerance);
    CHECK(ref::norm_relative_error(ref::to_double(y_scaled_addend), ry_scaled_addend) < kConvTolerance);
    CHECK(ref::norm_relative_error(ref::to_double(dx), ref::conv_backward_data(d, ref::to_double(dy),
                                                                               ref::to_double(w))) < kConvTolerance);
    CHECK(ref::norm_relative_error(ref::to_double(dw), ref::conv_backward_weights(d, ref::to_double(x),
                                                                                  ref::to_double(dy))) <
          kConvTolerance);

    if (cpu) {  // and oneDNN, through its own layouts
      std::vector<float> cx(static_cast<size_t>(cpu->conv_buffer_size(s))), cy(cx.size()), cdy(cx.size()),
          cdx(cx.size());
      std::vector<float> cwf(static_cast<size_t>(cpu->conv_weights_size(s, ConvPass::forward)));
      std::vector<float> cwb(static_cast<size_t>(cpu->conv_weights_size(s, ConvPass::backward_data)));
      std::vector<float> cdw(w.size()), plain(x.size());
      cpu->to_conv_layout(s, x.data(), cx.data());
      cpu->to_conv_layout(s, dy.data(), cdy.data());
      cpu->weights_to_conv_layout(s, ConvPass::forward, w.data(), cwf.data());
      cpu->weights_to_conv_layout(s, ConvPass::backward_data, w.data(), cwb.data());
      cpu->conv_forward(s, cx.data(), cwf.data(), cy.data(), false);
      cpu->from_conv_layout(s, cy.data(), plain.data());
      CHECK(rel_error(y, plain) < kConvTolerance);
      cpu->conv_backward_data(s, cdy.data(), cwb.data(), cdx.data());
      cpu->from_conv_layout(s, cdx.data(), plain.data());
      CHECK(rel_error(dx, plain) < kConvTolerance);
      cpu->conv_backward_weights(s, cx.data(), cdy.data(), cdw.data());
      CHECK(rel_error(dw, cdw) < kConvTolerance);
    }
  }
}

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

TEST_CASE("cuDNN backward-weights over a stacked batch equals the sum over its parts (SocConv's K-term call)",
          "[.gpu][cuda][conv]") {
  if (!gpu_ready()) return;
  auto gpu = cuda_backend();
  ConvShape s;
  s.batch = 4;
  s.in_channels = s.out_channels = 16;
  s.height = s.width = 8;
  s.kernel = 3;
  s.groups = 2;
  const int terms = 5;
  ConvShape stacked = s;
  stacked.batch = terms * s.batch;
  const int64_t n = gpu->conv_buffer_size(s);
  Tensor x = upload(random_floats(static_cast<size_t>(terms * n), 7));
  Tensor dy = upload(random_floats(static_cast<size_t>(terms * n), 8));
  Tensor all(Shape{s.weight_count()}, Device::cuda), part(Shape{s.weight_count()}, Device::cuda),
      sum(Shape{s.weight_count()}, Device::cuda);
  gpu->conv_backward_weights(stacked, x.data(), dy.data(), all.data());
  for (int j = 0; j < terms; ++j) {
    gpu->conv_backward_weights(s, x.data() + j * n, dy.data() + j * n, part.data());
    gpu->axpby(1.0f, part.data(), 1.0f, sum.data(), sum.numel());
  }
  CHECK(rel_error(download(all), download(sum)) < kConvTolerance);
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("GPU fill, copy, axpby and weighted_sum match the CPU backend", "[.gpu][cuda][elementwise]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  const int64_t count = 100003;  // not a multiple of any block size
  auto x = random_floats(count, 11), y = random_floats(count, 12);
  Tensor gx = upload(x), gy = upload(y);
  gpu->fill(gy.data(), count, 0.25f);
  CHECK(download(gy) == std::vector<float>(count, 0.25f));
  gpu->copy(gx.data(), gy.data(), count);
  CHECK(download(gy) == x);
  for (float beta : {0.0f, 1.0f, -0.5f}) {
    INFO("beta " << beta);
    auto expected = y;
    cpu->axpby(1.5f, x.data(), beta, expected.data(), count);
    Tensor gy2 = upload(y);
    gpu->axpby(1.5f, gx.data(), beta, gy2.data(), count);
    CHECK(rel_error(download(gy2), expected) < kElementwiseTolerance);
  }
  // weighted_sum over 1, 3 and 20 sources (20: more than one launch's worth of kernel parameters).
  for (int inputs : {1, 3, 20}) {
    INFO(inputs << " sources");
    std::vector<std::vector<float>> host;
    std::vector<Tensor> device;
    std::vector<const float*> cpu_sources, gpu_sources;
    std::vector<float> scales;
    for (int i = 0; i < inputs; ++i) {
      host.push_back(random_floats(count, 200 + i));
      scales.push_back(0.5f + 0.25f * float(i));
    }
    for (int i = 0; i < inputs; ++i) {
      device.push_back(upload(host[size_t(i)]));
      cpu_sources.push_back(host[size_t(i)].data());
      gpu_sources.push_back(device.back().data());
    }
    std::vector<float> expected(count, std::nanf(""));
    cpu->weighted_sum(cpu_sources.data(), scales.data(), inputs, expected.data(), count);
    Tensor gsum = upload(std::vector<float>(count, std::nanf("")));
    gpu->weighted_sum(gpu_sources.data(), scales.data(), inputs, gsum.data(), count);
    CHECK(rel_error(download(gsum), expected) < kElementwiseTolerance);
  }
  // beta = 0 never reads y: NaN there does not leak.
  std::vector<float> nan(count, std::nanf(""));
  Tensor gnan = upload(nan);
  gpu->axpby(2.0f, gx.data(), 0.0f, gnan.data(), count);
  auto out = download(gnan);
  CHECK(std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v); }));
}

TEST_CASE("GPU copy_channels (pad, truncate, accumulate), permute_channels and pixel_unshuffle match the CPU "
          "exactly", "[.gpu][cuda][elementwise]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  const int64_t batch = 3, plane = 35;
  for (auto [from, to] : {std::pair<int64_t, int64_t>{5, 8}, {8, 5}, {6, 6}})
    for (bool accumulate : {false, true}) {
      INFO(from << " -> " << to << " channels, accumulate " << accumulate);
      auto src = random_floats(static_cast<size_t>(batch * from * plane), 21);
      auto dst = random_floats(static_cast<size_t>(batch * to * plane), 22);
      Tensor gs = upload(src), gd = upload(dst);
      cpu->copy_channels(src.data(), from, dst.data(), to, batch, plane, accumulate);
      gpu->copy_channels(gs.data(), from, gd.data(), to, batch, plane, accumulate);
      CHECK(download(gd) == dst);
    }
  // Shuffles as ChannelShuffle builds them (host permutation), including more channels than one launch's chunk.
  for (auto [channels, groups, paired] : {std::tuple<int64_t, int64_t, bool>{16, 4, false}, {16, 4, true},
                                          {1200, 8, false}, {1200, 6, true}}) {
    INFO(channels << " channels, groups " << groups << ", paired " << paired);
    const int64_t p = 6;
    auto destination = channel_shuffle_permutation(channels, groups, paired);
    auto src = random_floats(static_cast<size_t>(2 * channels * p), 23);
    std::vector<float> expected(src.size());
    cpu->permute_channels(src.data(), expected.data(), destination.data(), 2, channels, p);
    Tensor gs = upload(src), gd(Shape{static_cast<int64_t>(src.size())}, Device::cuda);
    gpu->permute_channels(gs.data(), gd.data(), destination.data(), 2, channels, p);
    CHECK(download(gd) == expected);
  }
  for (bool inverse : {false, true}) {
    const int64_t channels = 3, height = 8, width = 6, stride = 2;
    auto src = random_floats(static_cast<size_t>(2 * channels * height * width), 24);
    std::vector<float> expected(src.size());
    cpu->pixel_unshuffle(src.data(), expected.data(), 2, channels, height, width, stride, inverse);
    Tensor gs = upload(src), gd(Shape{static_cast<int64_t>(src.size())}, Device::cuda);
    gpu->pixel_unshuffle(gs.data(), gd.data(), 2, channels, height, width, stride, inverse);
    CHECK(download(gd) == expected);
  }
}

TEST_CASE("GPU MaxMin forward and backward (plain and paired, with ties) match the CPU exactly",
          "[.gpu][cuda][maxmin]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  const int64_t batch = 4, channels = 10, plane = 33;
  auto x = random_floats(static_cast<size_t>(batch * channels * plane), 31);
  for (float& v : x) v = std::round(v * 2.0f) / 2.0f;  // many ties
  auto dy = random_floats(x.size(), 32);
  for (bool paired : {false, true}) {
    INFO("paired " << paired);
    std::vector<float> y(x.size()), dx(x.size());
    cpu->maxmin_forward(x.data(), y.data(), batch, channels, plane, paired);
    cpu->maxmin_backward(x.data(), dy.data(), dx.data(), batch, channels, plane, paired);
    Tensor gx = upload(x), gdy = upload(dy), gy(Shape{int64_t(x.size())}, Device::cuda),
           gdx(Shape{int64_t(x.size())}, Device::cuda);
    gpu->maxmin_forward(gx.data(), gy.data(), batch, channels, plane, paired);
    gpu->maxmin_backward(gx.data(), gdy.data(), gdx.data(), batch, channels, plane, paired);
    CHECK(download(gy) == y);
    CHECK(download(gdx) == dx);
  }
}

TEST_CASE("GPU add_bias and bias_backward match the CPU", "[.gpu][cuda][elementwise]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  const int64_t batch = 5, channels = 7, plane = 1025;
  auto x = random_floats(static_cast<size_t>(batch * channels * plane), 41);
  auto bias = random_floats(channels, 42), acc = random_floats(channels, 43);
  Tensor gx = upload(x), gb = upload(bias), gacc = upload(acc);
  auto y = x;
  cpu->add_bias(y.data(), bias.data(), batch, channels, plane);
  gpu->add_bias(gx.data(), gb.data(), batch, channels, plane);
  CHECK(rel_error(download(gx), y) < kElementwiseTolerance);
  auto expected = acc;
  cpu->bias_backward(x.data(), expected.data(), batch, channels, plane);
  Tensor gx2 = upload(x);
  gpu->bias_backward(gx2.data(), gacc.data(), batch, channels, plane);
  CHECK(rel_error(download(gacc), expected) < kElementwiseTolerance);
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("GPU matmul (cuBLAS) matches the CPU (oneDNN sgemm): transposes, strides, B = I, beta, shift",
          "[.gpu][cuda][matmul]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  struct Case {
    int64_t batch, rows, cols, inner;
    bool ta, tb, no_b;
    float alpha, beta, shift;
  };
  // Dot products of up to 1536 terms (the stacked product at C = 512, K = 4): ~sqrt(1536) * 6e-8 = 2.4e-6 each
  // side; the tolerance is the convolutions' (1e-5).
  for (const Case& c : {Case{1, 32, 32, 32, true, false, false, 0.25f, 0.0f, 1.0f},
                        Case{4, 48, 48, 48, true, true, false, 0.2f, 0.0f, 0.0f},
                        Case{2, 64, 64, 192, true, false, false, 1.0f, 1.0f, 0.0f},
                        Case{3, 5, 7, 6, false, true, false, -0.5f, 0.5f, 0.0f},
                        Case{2, 40, 40, 40, true, false, true, 0.5f, 0.0f, 1.0f},
                        Case{1, 512, 512, 1536, true, false, false, 1.0f, 1.0f, 0.0f}}) {
    const MatmulShape s = ref::MatmulDims{c.batch, c.rows, c.cols, c.inner, c.ta, c.tb, c.rows * c.inner,
                                          c.inner * c.cols, c.rows * c.cols}.shape();
    INFO("matmul " << s.str() << (c.no_b ? ", B = I" : ""));
    auto a = random_floats(static_cast<size_t>(c.batch * s.stride_a), 81);
    auto b = random_floats(static_cast<size_t>(c.batch * s.stride_b), 82);
    auto out = random_floats(static_cast<size_t>(c.batch * s.stride_c), 83);
    Tensor ga = upload(a), gb = upload(b), gc = upload(out);
    cpu->matmul(s, c.alpha, a.data(), c.no_b ? nullptr : b.data(), c.beta, c.shift, out.data());
    gpu->matmul(s, c.alpha, ga.data(), c.no_b ? nullptr : gb.data(), c.beta, c.shift, gc.data());
    CHECK(rel_error(download(gc), out) < kConvTolerance);
  }
  // A summed batch (stride_c == 0): dP^T = sum_n X_n dY_n^T of the matrix path on NCHW buffers; and with B = I.
  for (bool no_b : {false, true}) {
    const int64_t inner = no_b ? 16 : 64;
    const MatmulShape s = ref::MatmulDims{6, 16, 16, inner, false, !no_b, 16 * inner, 16 * inner, 0}.shape();
    INFO("matmul " << s.str() << (no_b ? ", B = I" : ""));
    auto a = random_floats(static_cast<size_t>(6 * s.stride_a), 84);
    auto b = random_floats(static_cast<size_t>(6 * s.stride_b), 85);
    auto out = random_floats(16 * 16, 86);
    Tensor ga = upload(a), gb = upload(b), gc = upload(out);
    cpu->matmul(s, 0.5f, a.data(), no_b ? nullptr : b.data(), 1.0f, 1.0f, out.data());
    gpu->matmul(s, 0.5f, ga.data(), no_b ? nullptr : gb.data(), 1.0f, 1.0f, gc.data());
    CHECK(rel_error(download(gc), out) < kConvTolerance);
  }
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("GPU SOC filter primitives match the CPU: skew, power iteration, scale, sigma gradient, group dot",
          "[.gpu][cuda][filter]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  struct Case {
    int64_t groups, channels, kernel;
  };
  // 130 groups: more than one launch's chunk of per-group parameters (128).
  for (const Case& c : {Case{1, 16, 3}, Case{4, 8, 3}, Case{2, 12, 5}, Case{3, 10, 1}, Case{130, 2, 3}}) {
    INFO(c.groups << " groups of " << c.channels << " channels, kernel " << c.kernel);
    const int64_t g = c.groups, ch = c.channels, k = c.kernel, group_size = ch * ch * k * k;
    Shape filter_shape{g, ch, ch, k, k};
    auto m = random_floats(static_cast<size_t>(filter_shape.numel()), 51, 0.3);
    std::vector<float> a(m.size());
    cpu->skew_symmetrize(m.data(), a.data(), g, ch, k);
    Tensor gm = upload(m), ga(filter_shape, Device::cuda);
    gpu->skew_symmetrize(gm.data(), ga.data(), g, ch, k);
    CHECK(download(ga) == a);

    // Power iteration from the same random unit vectors on both sides.
    PowerIterationState cpu_state, gpu_state;
    for (int w = 0; w < 4; ++w) {
      const int64_t cols = PowerIterationState::u_length(w, ch, k), rows = PowerIterationState::v_length(w, ch, k);
      auto u = random_floats(static_cast<size_t>(g * cols), 60 + w), v = random_floats(size_t(g * rows), 70 + w);
      cpu_state.u[w] = host_tensor(u, Shape{g, cols});
      cpu_state.v[w] = host_tensor(v, Shape{g, rows});
      gpu_state.u[w] = upload(u, Shape{g, cols});
      gpu_state.v[w] = upload(v, Shape{g, rows});
    }
    for (int iterations : {0, 1, 20}) {
      INFO(iterations << " power iterations");
      std::vector<float> cpu_sigma(g), gpu_sigma(g);
      std::vector<int32_t> cpu_which(g), gpu_which(g);
      cpu->power_iteration(a.data(), cpu_state, g, ch, k, iterations, cpu_sigma.data(), cpu_which.data());
      gpu->power_iteration(ga.data(), gpu_state, g, ch, k, iterations, gpu_sigma.data(), gpu_which.data());
      CHECK(rel_error(gpu_sigma, cpu_sigma) < 1e-5);
      for (int w = 0; w < 4; ++w) {
        CHECK(rel_error(download(gpu_state.u[w]), cpu_state.u[w].to_vector()) < 1e-5);
        CHECK(rel_error(download(gpu_state.v[w]), cpu_state.v[w].to_vector()) < 1e-5);
      }
      // The argmin may differ only where two estimates tie to float rounding.
      int differing = 0;
      for (int64_t i = 0; i < g; ++i) differing += cpu_which[size_t(i)] != gpu_which[size_t(i)];
      CHECK(differing == 0);
    }

    std::vector<float> scale(static_cast<size_t>(g));
    for (int64_t i = 0; i < g; ++i) scale[size_t(i)] = 0.5f + 0.01f * float(i);
    std::vector<float> scaled(a.size());
    cpu->scale_groups(a.data(), scale.data(), scaled.data(), g, group_size);
    Tensor gscaled(filter_shape, Device::cuda);
    gpu->scale_groups(ga.data(), scale.data(), gscaled.data(), g, group_size);
    CHECK(rel_error(download(gscaled), scaled) < kElementwiseTolerance);

    std::vector<int32_t> which(static_cast<size_t>(g));
    std::vector<float> coefficient(static_cast<size_t>(g));
    for (int64_t i = 0; i < g; ++i) {
      which[size_t(i)] = static_cast<int32_t>(i % 4);
      coefficient[size_t(i)] = 0.3f - 0.1f * float(i % 7);
    }
    auto diff = random_floats(a.size(), 81);
    Tensor gdiff = upload(diff, filter_shape);
    cpu->add_sigma_gradient(cpu_state, which.data(), coefficient.data(), diff.data(), g, ch, k);
    // Same vectors on both sides for this check: the GPU's state takes the CPU's values.
    for (int w = 0; w < 4; ++w) {
      gpu_state.u[w] = upload(cpu_state.u[w].to_vector(), cpu_state.u[w].shape());
      gpu_state.v[w] = upload(cpu_state.v[w].to_vector(), cpu_state.v[w].shape());
    }
    gpu->add_sigma_gradient(gpu_state, which.data(), coefficient.data(), gdiff.data(), g, ch, k);
    CHECK(rel_error(download(gdiff), diff) < kElementwiseTolerance);

    std::vector<float> cpu_dot(static_cast<size_t>(g)), gpu_dot(static_cast<size_t>(g));
    cpu->group_dot(m.data(), a.data(), cpu_dot.data(), g, group_size);
    gpu->group_dot(gm.data(), ga.data(), gpu_dot.data(), g, group_size);
    CHECK(rel_error(gpu_dot, cpu_dot) < kElementwiseTolerance);
  }
}

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
TEST_CASE("GPU softmax cross-entropy and SGD with momentum match the CPU", "[.gpu][cuda][train]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  for (int64_t batch : {int64_t{7}, int64_t{1000}}) {  // 1000 rows: two launches' chunks of labels
    const int64_t classes = 100;
    auto logits = random_floats(static_cast<size_t>(batch * classes), 101, 3.0);
    logits[5] = logits[6];  // a tie for the first arg-max
    std::vector<int32_t> labels(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) labels[size_t(b)] = static_cast<int32_t>((b * 37) % classes);
    std::vector<float> cpu_diff(logits.size());
    double cpu_loss = 0.5, gpu_loss = 0.5;
    int64_t cpu_correct = 2, gpu_correct = 2;
    cpu->softmax_cross_entropy(logits.data(), labels.data(), batch, classes, cpu_diff.data(), &cpu_loss,
                               &cpu_correct);
    Tensor gl = upload(logits), gd(Shape{int64_t(logits.size())}, Device::cuda);
    gpu->softmax_cross_entropy(gl.data(), labels.data(), batch, classes, gd.data(), &gpu_loss, &gpu_correct);
    CHECK(gpu_loss == Approx(cpu_loss).epsilon(1e-12));
    CHECK(gpu_correct == cpu_correct);
    CHECK(rel_error(download(gd), cpu_diff) < kElementwiseTolerance);
  }
  std::vector<int32_t> bad{0, 100};
  Tensor two(Shape{200}, Device::cuda), d2(Shape{200}, Device::cuda);
  double loss = 0.0;
  int64_t correct = 0;
  CHECK_THROWS_AS(gpu->softmax_cross_entropy(two.data(), bad.data(), 2, 100, d2.data(), &loss, &correct), Error);

  const int64_t count = 4099;
  auto param = random_floats(count, 111), grad = random_floats(count, 112), momentum = random_floats(count, 113);
  Tensor gp = upload(param), gg = upload(grad), gmom = upload(momentum);
  for (bool first : {true, false, false}) {
    cpu->sgd_momentum(param.data(), grad.data(), momentum.data(), count, 0.1f, 0.9f, 5e-4f, first);
    gpu->sgd_momentum(gp.data(), gg.data(), gmom.data(), count, 0.1f, 0.9f, 5e-4f, first);
  }
  CHECK(rel_error(download(gp), param) < kElementwiseTolerance);
  CHECK(rel_error(download(gmom), momentum) < kElementwiseTolerance);
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

TEST_CASE("GPU SocConv matches the CPU in training and evaluation mode: stride 1/2, grouped, truncating, "
          "keep per group", "[.gpu][cuda][layers][soc]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  struct Case {
    SocConfig config;
    Shape input;
  };
  std::vector<Case> cases = {
      {soc_config(16, 16, 3, 1, 1, 1), Shape{4, 16, 8, 8}},   {soc_config(8, 16, 3, 1, 1, 2), Shape{2, 8, 6, 6}},
      {soc_config(16, 8, 3, 1, 1, 3), Shape{2, 16, 6, 6}},    {soc_config(8, 32, 3, 2, 1, 4), Shape{2, 8, 8, 8}},
      {soc_config(16, 16, 3, 1, 4, 5), Shape{3, 16, 8, 8}},   {soc_config(32, 32, 1, 1, 1, 6), Shape{2, 32, 4, 4}},
      {soc_config(8, 16, 3, 2, 4, 7), Shape{2, 8, 8, 8}},     {soc_config(12, 12, 5, 1, 2, 8), Shape{2, 12, 7, 7}}};
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
    config.groups_first = c.a;
    config.groups_second = c.b;
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
  config.groups_first = 4;
  config.groups_second = 1;
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
  config.groups_first = 4;
  config.groups_second = 1;
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
    config.groups_first = 4;
    config.groups_second = b;
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
TEST_CASE("one training step of LipConvnet-15 on the GPU gives the CPU's loss and gradients",
          "[.gpu][cuda][model]") {
  if (!gpu_ready()) return;
  REQUIRE_CPU_BACKEND(cpu);
  auto gpu = cuda_backend();
  for (std::string conv : {"soc", "gs-soc"}) {
    INFO("conv " << conv);
    ModelConfig config;
    config.conv = conv;
    config.groups_first = conv == "soc" ? 1 : 4;
    config.groups_second = 1;
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
// fp32 and check_precision refuses; both checked). Tolerances from the rounding of the inputs:
//   tf32: cuDNN rounds each input to 10 explicit mantissa bits (relative <= 2^-10 whether it rounds or truncates),
//         so each product is off by <= 2^-9 relative and each output by <= 2^-9 (|W| * |X|) + float32's 1e-5;
//   bf16 forward: on inputs rounded to bf16 (reference::round_to_bf16) the products are exact and the float32
//         accumulator is rounded once to bf16 (cuDNN's bf16 result): |error| <= 2^-8 |y| + 1e-5 max |y|;
//   bf16 backward-weights: the bf16 inputs widened exactly, TF32 products of bf16 values exact: float32's 1e-5.
namespace {

bool gpu_has_tensor_cores() { return ref::runs_precision(*cuda_backend(), ConvPrecision::tf32); }

// max_i |actual_i - expected_i| - bound_i <= 0, reported as the worst excess over the per-element bound.
bool within(const std::vector<float>& actual, const ref::Vec& expected, const ref::Vec& bound) {
  bool ok = true;
  for (size_t i = 0; i < actual.size(); ++i)
    if (std::abs(static_cast<double>(actual[i]) - expected[i]) > bound[i]) {
      UNSCOPED_INFO("element " << i << ": " << actual[i] << " vs " << expected[i] << " (bound " << bound[i] << ")");
      ok = false;
      break;
    }
  return ok;
}

ref::Vec absolute(const ref::Vec& v) {
  ref::Vec out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = std::abs(v[i]);
  return out;
}

double largest(const ref::Vec& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

}  // namespace

TEST_CASE("cuDNN tf32 and bf16 convolutions stay within their input roundings of the double reference",
          "[.gpu][cuda][conv][precision]") {
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
  const auto w = random_floats(static_cast<size_t>(d.weight_size()), 802, 1.0 / 12.0);
  const auto dy = random_floats(static_cast<size_t>(d.output_size()), 803);
  const auto add = random_floats(static_cast<size_t>(d.output_size()), 804);
  if (!gpu_has_tensor_cores()) {
    s.precision = ConvPrecision::bf16;
    CHECK(gpu->conv_precision(s, ConvPass::forward) == ConvPrecision::fp32);
    REQUIRE_THROWS_WITH(gpu->check_precision(ConvPrecision::bf16), Catch::Contains("--precision bf16"));
    WARN("this GPU has no bf16/TF32 tensor cores: reduced precision refused as it must be, not run");
    return;
  }
  Tensor gx = upload(x), gw = upload(w), gdy = upload(dy), gadd = upload(add), gy(Shape{d.output_size()}, Device::cuda);
  {
    INFO("tf32: forward, backward-data, backward-weights");
    s.precision = ConvPrecision::tf32;
    REQUIRE(gpu->conv_precision(s, ConvPass::forward) == ConvPrecision::tf32);
    const double unit = std::ldexp(1.0, -9);
    auto bound_of = [&](const ref::Vec& magnitudes) {
      ref::Vec b(magnitudes.size());
      const double floor = kConvTolerance * largest(magnitudes);
      for (size_t i = 0; i < b.size(); ++i) b[i] = unit * magnitudes[i] + floor;
      return b;
    };
    const ref::Vec xd = ref::to_double(x), wd = ref::to_double(w), dyd = ref::to_double(dy);
    gpu->conv_forward(s, gx.data(), gw.data(), gy.data(), false);
    CHECK(within(download(gy), ref::conv_forward(d, xd, wd),
                 bound_of(ref::conv_forward(d, absolute(xd), absolute(wd)))));
    Tensor gdx(Shape{d.input_size()}, Device::cuda), gdw(Shape{d.weight_size()}, Device::cuda);
    gpu->conv_backward_data(s, gdy.data(), gw.data(), gdx.data());
    CHECK(within(download(gdx), ref::conv_backward_data(d, dyd, wd),
                 bound_of(ref::conv_backward_data(d, absolute(dyd), absolute(wd)))));
    gpu->conv_backward_weights(s, gx.data(), gdy.data(), gdw.data());
    CHECK(within(download(gdw), ref::conv_backward_weights(d, xd, dyd),
                 bound_of(ref::conv_backward_weights(d, absolute(xd), absolute(dyd)))));
  }
  {
    INFO("bf16: rounding, forward with alpha and a float32 addend, stacked backward-weights");
    s.precision = ConvPrecision::bf16;
    REQUIRE(gpu->conv_precision(s, ConvPass::forward) == ConvPrecision::bf16);
    REQUIRE(gpu->conv_precision(s, ConvPass::backward_weights) == ConvPrecision::bf16);
    CHECK(gpu->conv_precision(s, ConvPass::backward_data) == ConvPrecision::fp32);
    const ref::Vec xr = ref::round_to_bf16(ref::to_double(x)), wr = ref::round_to_bf16(ref::to_double(w)),
                   dyr = ref::round_to_bf16(ref::to_double(dy));
    Tensor lx(Shape{gpu->conv_input_size(s)}, Device::cuda), ldy(Shape{gpu->conv_input_size(s)}, Device::cuda);
    Tensor lw(Shape{gpu->conv_weights_size(s, ConvPass::forward)}, Device::cuda);
    gpu->to_conv_input(s, gx.data(), lx.data());
    gpu->to_conv_input(s, gdy.data(), ldy.data());
    gpu->weights_to_conv_layout(s, ConvPass::forward, gw.data(), lw.data());
    // The rounding itself, bit for bit (two bf16 values per float).
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
    const float alpha = -1.0f / 3.0f;
    gpu->conv_forward_scaled(s, lx.data(), lw.data(), alpha, gadd.data(), gy.data());
    const ref::Vec conv = ref::conv_forward(d, xr, wr);
    ref::Vec want(conv.size()), bound(conv.size());
    const double floor = kConvTolerance * largest(conv);
    for (size_t i = 0; i < conv.size(); ++i) {
      want[i] = double(alpha) * conv[i] + add[i];
      bound[i] = std::ldexp(1.0, -8) * std::abs(double(alpha) * conv[i]) + floor;
    }
    CHECK(within(download(gy), want, bound));
    Tensor gdw(Shape{d.weight_size()}, Device::cuda);
    gpu->conv_backward_weights(s, lx.data(), ldy.data(), gdw.data());
    CHECK(rel_error(download(gdw), ref::to_float(ref::conv_backward_weights(d, xr, dyr))) < kConvTolerance);
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
