// The matrix path of 1x1 SocConvs (lib/layers/soc_matrix.cpp) and the Backend::matmul it runs on: the op against
// the double reference, the layer against the series path and the double reference at LipConvnet's channel
// counts, and the cost model's choices. (Gradients against finite differences: test_gradients.cpp; Jacobian
// singular values: test_orthogonality.cpp; a checkpoint from before the matrix path: test_soc_matrix_checkpoint.)
//
// Tolerances, from float32 arithmetic (6e-8 per operation, growing like sqrt(terms) in these random-sign sums):
//  - matmul 1e-6 of the largest |entry|: dot products of at most 96 terms, one rounding for alpha and the shift.
//  - layer forward 1e-5 of the largest |output| (test_gradients.cpp's bound): the series path's K convolutions
//    of C products, or the matrix path's K-1 products of C terms then one convolution of C: both ~1e-6 at
//    C = 512 with ||A_n|| ~ 1.
//  - layer backward, matrix against series, 1e-4 of the largest |gradient|: dL/dA_n sums N H W K products per
//    entry on one side and (K-1) C + N H W on the other, and the sigma path subtracts two terms of similar size
//    (test_cuda_backend.cpp's bound for parameter gradients computed in different orders). A wrong term (a
//    missing H_K, a transpose the wrong way) is an O(1) relative error.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.hpp"
#include "cli_helpers.hpp"
#include "orthoconv/model.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/network_bound.hpp"
#include "orthoconv/runtime.hpp"
#include "reference.hpp"

using namespace orthoconv;
namespace ref = orthoconv::reference;
using ref::Vec;

namespace {

constexpr double kMatmulTolerance = 1e-6;
constexpr double kForwardTolerance = 1e-5;
constexpr double kGradientTolerance = 1e-4;

Vec quantized(size_t count, uint64_t seed, double stddev = 1.0) {
  return ref::to_double(ref::to_float(ref::random_normal(count, seed, stddev)));
}

}  // namespace

TEST_CASE("Backend::matmul matches the double reference: transposes, batch strides, B = I, beta, shift",
          "[backend][matmul]") {
  auto backend = cpu_backend();
  struct Case {
    int64_t batch, rows, cols, inner;
    bool ta, tb, no_b;
    int64_t stride_a, stride_b, stride_c;  // 0: packed (rows*inner etc.); -1: stride 0 (A: broadcast; C: summed)
    float alpha, beta, shift;
  };
  const Case cases[] = {
      {1, 5, 5, 5, false, false, false, 0, 0, 0, 1.0f, 0.0f, 0.0f},
      {3, 7, 7, 7, true, false, false, 0, 0, 0, 0.5f, 0.0f, 1.0f},   // a Horner step of the matrix path
      {2, 6, 6, 6, true, true, false, 0, 0, 0, 0.25f, 0.0f, 0.0f},   // H_K = A^T H'^T / K
      {2, 6, 6, 18, true, false, false, 0, 0, 0, 1.0f, 1.0f, 0.0f},  // the stacked product (inner 3C)
      {4, 8, 8, 8, false, false, false, 0, 0, 0, 1.0f / 3, 0.0f, 0.0f},
      {2, 3, 5, 4, false, true, false, 0, 0, 0, -2.0f, 0.5f, 0.0f},  // rectangular
      {2, 4, 3, 5, true, true, false, 0, 0, 0, 1.0f, 0.0f, 0.0f},
      {3, 5, 5, 5, false, false, false, -1, 0, 40, 1.0f, 0.0f, -1.5f},  // A broadcast, C strided with gaps
      {2, 6, 6, 6, true, false, true, 0, 0, 0, 0.2f, 0.0f, 1.0f},       // B = I: T_K = I + A^T / K
      {2, 4, 4, 4, false, false, true, 0, 0, 0, -1.0f, 2.0f, 0.0f},
      {1, 96, 96, 96, false, false, false, 0, 0, 0, 1.0f, 1.0f, 1.0f},
      {6, 4, 9, 4, false, false, false, -1, 40, 45, 1.0f, 0.0f, 0.0f},  // the 1x1 conv on NCHW: Y_n = P X_n
      {5, 4, 4, 9, false, true, false, 40, 45, -1, 1.0f, 0.0f, 0.0f},   // summed: dP^T = sum_n X_n dY_n^T
      {3, 5, 5, 7, true, false, false, 0, 0, -1, 0.5f, 1.5f, 1.0f},     // summed, with beta and shift
      {37, 6, 6, 5, false, true, false, 0, 0, -1, -1.0f, 0.0f, 0.0f},   // summed over more matrices than threads
      {4, 3, 3, 3, false, false, true, 0, 0, -1, 2.0f, 0.0f, 0.0f}};    // summed, B = I
  uint64_t seed = 300;
  for (const Case& c : cases) {
    const ref::MatmulDims d{c.batch,
                            c.rows,
                            c.cols,
                            c.inner,
                            c.ta,
                            c.tb,
                            c.stride_a < 0   ? 0
                            : c.stride_a > 0 ? c.stride_a
                                             : c.rows * c.inner,
                            c.stride_b > 0 ? c.stride_b : c.inner * c.cols,
                            c.stride_c < 0   ? 0
                            : c.stride_c > 0 ? c.stride_c
                                             : c.rows * c.cols};
    const MatmulShape s = d.shape();
    INFO("matmul " << s.str() << (c.no_b ? ", B = I" : "") << ", alpha " << c.alpha << ", beta " << c.beta << ", shift "
                   << c.shift);
    const Vec a = quantized(static_cast<size_t>(s.stride_a * (c.batch - 1) + c.rows * c.inner), ++seed);
    const Vec b =
        c.no_b ? Vec{} : quantized(static_cast<size_t>(s.stride_b * (c.batch - 1) + c.inner * c.cols), ++seed);
    Vec expected = quantized(static_cast<size_t>(s.stride_c * (c.batch - 1) + c.rows * c.cols), ++seed);
    std::vector<float> out = ref::to_float(expected);
    // beta == 0 must not read C: NaN there stays out of the result (the gaps between strided C matrices keep it).
    if (c.beta == 0.0f) std::fill(out.begin(), out.end(), std::numeric_limits<float>::quiet_NaN());
    const std::vector<float> untouched = out;
    ref::matmul(d, c.alpha, a, b, c.beta, c.shift, expected);
    const std::vector<float> af = ref::to_float(a), bf = ref::to_float(b);
    backend->matmul(s, c.alpha, af.data(), c.no_b ? nullptr : bf.data(), c.beta, c.shift, out.data());
    double worst = 0.0, scale = 0.0;
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t i = 0; i < s.rows * s.cols; ++i) {
        const size_t at = static_cast<size_t>(n * s.stride_c + i);
        worst = std::max(worst, std::abs(static_cast<double>(out[at]) - expected[at]));
        scale = std::max(scale, std::abs(expected[at]));
      }
    CHECK(worst <= kMatmulTolerance * scale);  // also false for NaN
    // Entries between the strided C matrices are not C's: left alone.
    for (int64_t n = 0; n + 1 < s.batch; ++n)
      for (int64_t i = s.rows * s.cols; i < s.stride_c; ++i) {
        const size_t at = static_cast<size_t>(n * s.stride_c + i);
        CHECK(std::isnan(out[at]) == std::isnan(untouched[at]));
      }
  }
}

TEST_CASE(
    "the CPU matmul runs long summed NT products as one oneDNN matmul primitive, the same bits on 1 and 2 threads",
    "[backend][matmul]") {
  // The choice is by shape alone: dL/dP^T at 32 channels on 32x32 planes (inner 1024 = 32 x 32), not at 64
  // channels on 16x16 (inner 256 < 16 x 64), never for other products.
  MatmulShape dp;
  dp.batch = 128;
  dp.rows = dp.cols = 32;
  dp.inner = 1024;
  dp.transpose_b = true;
  dp.stride_a = dp.stride_b = 32 * 1024;
  const float any_value = 0.0f;
  const float* some_b = &any_value;  // summed_by_primitive only compares b with null
  CHECK(cpu::CpuBackend::summed_by_primitive(dp, some_b));
  CHECK_FALSE(cpu::CpuBackend::summed_by_primitive(dp, nullptr));
  MatmulShape wide = dp;
  wide.rows = wide.cols = 64;
  wide.inner = 256;
  wide.stride_a = wide.stride_b = 64 * 256;
  CHECK_FALSE(cpu::CpuBackend::summed_by_primitive(wide, some_b));
  MatmulShape batched = dp;
  batched.stride_c = 32 * 32;
  CHECK_FALSE(cpu::CpuBackend::summed_by_primitive(batched, some_b));

  // The sum over the batch runs in batch order: the result does not depend on the number of threads (float32
  // training resumes bit for bit on another thread count only if it does not). Against the double reference too.
  auto backend = cpu_backend();
  const ref::MatmulDims d{9, 16, 16, 320, false, true, 16 * 320 + 7, 16 * 320 + 3, 0};
  const MatmulShape s = d.shape();
  REQUIRE(cpu::CpuBackend::summed_by_primitive(s, some_b));
  const Vec a = quantized(static_cast<size_t>(s.stride_a * 8 + 16 * 320), 401);
  const Vec b = quantized(static_cast<size_t>(s.stride_b * 8 + 16 * 320), 402);
  Vec expected(16 * 16, 0.0);
  ref::matmul(d, 0.75f, a, b, 0.0f, 0.0f, expected);
  const std::vector<float> af = ref::to_float(a), bf = ref::to_float(b);
  const int threads = thread_count();
  std::vector<float> one(16 * 16), two(16 * 16);
  set_thread_count(1);
  backend->matmul(s, 0.75f, af.data(), bf.data(), 0.0f, 0.0f, one.data());
  set_thread_count(2);
  backend->matmul(s, 0.75f, af.data(), bf.data(), 0.0f, 0.0f, two.data());
  set_thread_count(threads);
  CHECK(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)) == 0);
  // Each entry sums 9 x 320 products of unit normals (|entry| ~ 54): float32 leaves ~1e-5 relative at worst.
  double worst = 0.0, scale = 0.0;
  for (size_t i = 0; i < one.size(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(one[i]) - expected[i]));
    scale = std::max(scale, std::abs(expected[i]));
  }
  CHECK(worst <= 2880 * 6e-8 * scale);
}

TEST_CASE("Backend::matmul refuses shapes it cannot run, naming the shape", "[backend][matmul][errors]") {
  auto backend = cpu_backend();
  std::vector<float> a(64, 1.0f), b(64, 1.0f), c(64, 0.0f);
  MatmulShape s;
  s.rows = 4;
  s.cols = 2;
  s.inner = 4;
  CHECK_THROWS_AS(backend->matmul(s, 1.0f, a.data(), b.data(), 0.0f, 1.0f, c.data()), ConfigError);  // shift: square
  CHECK_THROWS_AS(backend->matmul(s, 1.0f, a.data(), nullptr, 0.0f, 0.0f, c.data()), ConfigError);   // B = I: inner
  s.batch = 2;
  s.stride_c = 4;  // overlapping C
  CHECK_THROWS_WITH(backend->matmul(s, 1.0f, a.data(), b.data(), 0.0f, 0.0f, c.data()),
                    Catch::Contains("overlap") && Catch::Contains("[batch 2, 4x4 * 4x2"));
}

namespace {

SocConfig soc_1x1(int64_t c_in, int64_t c_out, int64_t groups, int64_t stride, uint64_t seed) {
  SocConfig c;
  c.in_channels = c_in;
  c.out_channels = c_out;
  c.kernel = 1;
  c.groups = groups;
  c.stride = stride;
  c.seed = seed;
  return c;
}

struct PassResult {
  Vec y, dx, dm, db;
};

PassResult run(SocConv& layer, const Shape& in, const Vec& x, const Vec& w) {
  Tensor xt = ref::to_tensor(x, in), y, dx;
  layer.zero_grad();
  layer.forward(xt, y);
  layer.backward(ref::to_tensor(w, y.shape()), dx);
  return {ref::to_double(y), ref::to_double(dx), ref::to_double(layer.weight().grad),
          ref::to_double(layer.bias().grad)};
}

}  // namespace

TEST_CASE(
    "the matrix path equals the series path and the double reference: groups 1/2/4, 4 to 512 channels, "
    "stride 1 and 2, training and evaluation terms",
    "[soc][matrix]") {
  struct Case {
    int64_t c_in, c_out, groups, stride, batch, side;
    KeepChannels keep;
  };
  const Case cases[] = {
      {4, 4, 1, 1, 2, 5, KeepChannels::first},
      {8, 8, 2, 1, 2, 4, KeepChannels::first},
      {16, 16, 4, 1, 2, 3, KeepChannels::first},
      {32, 32, 1, 1, 2, 4, KeepChannels::first},
      {64, 64, 2, 1, 2, 3, KeepChannels::first},
      {128, 128, 4, 1, 1, 3, KeepChannels::first},
      {256, 256, 1, 1, 1, 2, KeepChannels::first},
      {512, 512, 1, 1, 2, 2, KeepChannels::first},
      {512, 512, 4, 1, 1, 2, KeepChannels::first},
      // stride 2 (the 1x1 stride-2 layer: c_out = 2 c_in keeps half of the 4 c_in unshuffled channels)
      {2, 8, 1, 2, 2, 4, KeepChannels::first},
      {8, 32, 2, 2, 1, 4, KeepChannels::first},
      {32, 64, 4, 2, 1, 4, KeepChannels::first},
      {32, 64, 4, 2, 1, 4, KeepChannels::per_group},
      {128, 256, 1, 2, 1, 2, KeepChannels::first},
      // channels appended (c_out > c_in) and dropped (the head: c_out < c_in)
      {6, 8, 2, 1, 2, 3, KeepChannels::first},
      {96, 10, 1, 1, 3, 1, KeepChannels::first}};
  uint64_t seed = 500;
  for (const Case& c : cases)
    for (bool training : {true, false})
      for (SocPath variant : {SocPath::matrix_conv, SocPath::matrix_gemm}) {
        SocConfig config = soc_1x1(c.c_in, c.c_out, c.groups, c.stride, ++seed);
        config.keep = c.keep;
        config.path = SocPath::series;
        SocConv series(config);
        config.path = variant;
        SocConv matrix(config);  // the same seed: the same M, bias, u, v
        series.set_training(training);
        matrix.set_training(training);
        INFO(matrix.describe() << (training ? ", training" : ", evaluation") << ", batch " << c.batch << ", side "
                               << c.side);
        const Shape in{c.batch, c.c_in, c.side, c.side};
        const Vec x = quantized(static_cast<size_t>(in.numel()), seed + 1000);
        const Vec w = quantized(static_cast<size_t>(series.output_shape(in).numel()), seed + 2000);
        const PassResult s = run(series, in, x, w), m = run(matrix, in, x, w);
        REQUIRE(series.last_path() == SocPath::series);
        REQUIRE(matrix.last_path() == variant);

        const ref::SocParams p = ref::soc_params(matrix);
        const Vec expected = ref::soc_forward(p, x, c.batch, c.side, c.side);
        CHECK(ref::max_relative_error(m.y, expected) < kForwardTolerance);
        CHECK(ref::max_relative_error(s.y, expected) < kForwardTolerance);
        CHECK(ref::max_relative_error(m.dx, s.dx) < kGradientTolerance);
        CHECK(ref::max_relative_error(m.dm, s.dm) < kGradientTolerance);
        CHECK(ref::max_relative_error(m.db, s.db) < kGradientTolerance);
        // Not vacuous: the gradients are not zero.
        CHECK(ref::norm(s.dm) > 1e-3);
        CHECK(ref::norm(s.dx) > 1e-3);
      }
}

TEST_CASE("the matrix path runs any number of terms: K = 1, 2, 3 (the edge cases of the Horner stacks)",
          "[soc][matrix]") {
  for (int terms : {1, 2, 3})
    for (SocPath variant : {SocPath::matrix_conv, SocPath::matrix_gemm}) {
      SocConfig config = soc_1x1(12, 12, 2, 1, 40 + static_cast<uint64_t>(terms));
      config.train_terms = terms;
      config.path = SocPath::series;
      SocConv series(config);
      config.path = variant;
      SocConv matrix(config);
      INFO("terms " << terms << ", " << soc_path_name(variant));
      const Shape in{2, 12, 3, 3};
      const Vec x = quantized(static_cast<size_t>(in.numel()), 41), w = quantized(static_cast<size_t>(in.numel()), 42);
      const PassResult s = run(series, in, x, w), m = run(matrix, in, x, w);
      CHECK(ref::max_relative_error(m.y, ref::soc_forward(ref::soc_params(matrix), x, 2, 3, 3)) < kForwardTolerance);
      CHECK(ref::max_relative_error(m.dx, s.dx) < kGradientTolerance);
      CHECK(ref::max_relative_error(m.dm, s.dm) < kGradientTolerance);
    }
}

TEST_CASE(
    "SocConv path setting: matrix needs kernel 1, names parse and print, a backward follows its forward's "
    "path",
    "[soc][matrix]") {
  SocConfig config = soc_1x1(8, 8, 1, 1, 7);
  config.kernel = 3;
  config.path = SocPath::matrix;
  CHECK_THROWS_WITH(SocConv(config), Catch::Contains("path=matrix needs kernel 1"));
  config.path = SocPath::matrix_gemm;
  CHECK_THROWS_WITH(SocConv(config), Catch::Contains("path=matrix-gemm needs kernel 1"));
  config.path = SocPath::automatic;
  SocConv k3(config);
  CHECK_THROWS_AS(k3.set_path(SocPath::matrix), ConfigError);
  CHECK(k3.config().path == SocPath::automatic);
  CHECK(k3.path_for(Shape{128, 8, 32, 32}) == SocPath::series);

  for (SocPath path :
       {SocPath::automatic, SocPath::series, SocPath::matrix, SocPath::matrix_conv, SocPath::matrix_gemm})
    CHECK(parse_soc_path(soc_path_name(path)) == path);
  CHECK_THROWS_WITH(parse_soc_path("fast"), Catch::Contains("'fast'"));

  // The path may change between steps; each backward uses what its forward stored.
  SocConv layer(soc_1x1(8, 8, 1, 1, 8));
  const Shape in{2, 8, 4, 4};
  const Vec x = quantized(static_cast<size_t>(in.numel()), 9), w = quantized(static_cast<size_t>(in.numel()), 10);
  layer.set_path(SocPath::matrix);
  const PassResult first = run(layer, in, x, w);
  layer.set_path(SocPath::series);
  const PassResult second = run(layer, in, x, w);
  CHECK(layer.last_path() == SocPath::series);
  CHECK(layer.describe().find("path series") != std::string::npos);
  CHECK(ref::max_relative_error(first.dm, second.dm) < kGradientTolerance);
  CHECK(ref::max_relative_error(first.y, second.y) < kForwardTolerance);
}

TEST_CASE(
    "the matrix path applies P by GEMMs on NCHW where the image is at least as large as P, else by the 1x1 "
    "convolution",
    "[soc][matrix][cost]") {
  CHECK(soc_matrix_variant(32, 1024) == SocPath::matrix_gemm);
  CHECK(soc_matrix_variant(128, 32) == SocPath::matrix_gemm);
  CHECK(soc_matrix_variant(129, 32) == SocPath::matrix_conv);
  CHECK(soc_matrix_variant(512, 4) == SocPath::matrix_conv);
  // path_for resolves matrix (and auto, where the matrix path is cheaper) by C per group and the output plane.
  SocConv layer(soc_1x1(64, 64, 2, 1, 3));  // C = 32 per group
  layer.set_path(SocPath::matrix);
  CHECK(layer.path_for(Shape{8, 64, 4, 4}) == SocPath::matrix_gemm);
  CHECK(layer.path_for(Shape{8, 64, 2, 2}) == SocPath::matrix_conv);
  layer.set_path(SocPath::automatic);
  CHECK(layer.path_for(Shape{128, 64, 4, 4}) == SocPath::matrix_gemm);
  CHECK(layer.path_for(Shape{128, 64, 2, 2}) == SocPath::matrix_conv);
  layer.set_path(SocPath::matrix_conv);
  CHECK(layer.path_for(Shape{8, 64, 4, 4}) == SocPath::matrix_conv);
  layer.set_path(SocPath::matrix_gemm);
  CHECK(layer.path_for(Shape{8, 64, 2, 2}) == SocPath::matrix_gemm);
  SocConv down(soc_1x1(16, 32, 1, 2, 4));  // C = 64 after the unshuffle; the plane is the output's
  down.set_path(SocPath::matrix);
  CHECK(down.path_for(Shape{2, 16, 8, 8}) == SocPath::matrix_gemm);
  CHECK(down.path_for(Shape{2, 16, 4, 4}) == SocPath::matrix_conv);
}

TEST_CASE("cost model: multiply-adds cross at N*H*W = C, the bytes favour the matrix path at the tie",
          "[soc][matrix][cost]") {
  for (int64_t c : {32, 128, 512, 2048})
    for (bool training : {true, false}) {
      const int terms = training ? 5 : 12;
      INFO("C " << c << (training ? ", training" : ", evaluation"));
      const SocPathCost tie = soc_path_cost(1, c, c, terms, training);
      CHECK(tie.matrix_macs == Approx(tie.series_macs).epsilon(1e-12));
      CHECK(tie.matrix_bytes < tie.series_bytes);
      CHECK(tie.cheaper() == SocPath::matrix);
      const SocPathCost more = soc_path_cost(1, c, 2 * c, terms, training);
      CHECK(more.matrix_macs < more.series_macs);
      CHECK(more.cheaper() == SocPath::matrix);
      const SocPathCost fewer = soc_path_cost(1, c, c / 2, terms, training);
      CHECK(fewer.matrix_macs > fewer.series_macs);
      CHECK(fewer.cheaper() == SocPath::series);
    }
  // One term: one convolution either way, but the series' adds x0 as a third activation stream; P = I + A_n has
  // it folded in.
  const SocPathCost one = soc_path_cost(1, 64, 1 << 20, 1, false);
  CHECK(one.matrix_macs == one.series_macs);
  CHECK(one.cheaper() == SocPath::matrix);
}

TEST_CASE(
    "cost model picks the matrix path for LipConvnet-15's GS-SOC second stage at every width and the series "
    "path for the 2048-channel layer and the head, at batch 128",
    "[soc][matrix][cost]") {
  const int64_t batch = 128;
  for (std::string conv : {"gs-soc", "soc"}) {
    ModelConfig config;
    config.conv = parse_conv_kind(conv);
    config.groups = default_groups(config.conv);
    config.init_iterations = 0;  // shapes only
    LipConvnet model(config);
    // Each SocConv on its step's input shape (model.steps()).
    int matrix_layers = 0;
    for (bool training : {true, false}) {
      model.set_training(training);
      for (const NetworkStep& step : model.steps()) {
        if (step.kind != StepKind::soc) continue;
        const Shape in{batch, step.input[1], step.input[2], step.input[3]};
        const SocConfig& c = step.soc->config();
        const SocPath path = step.soc->path_for(in);
        // Inside a GS-SOC block (the block's layer is not this SocConv), the 1x1 stride-1 stage is the second one.
        const bool second = step.block_layer != step.soc && c.kernel == 1 && c.stride == 1;
        INFO(step.name << " " << step.soc->describe() << " on " << in.str() << (training ? ", training" : ""));
        const bool wide = c.group_channels() * c.groups >= 1024;  // the 2048-channel layer and the head
        if (c.kernel != 1 || wide) {
          CHECK(path == SocPath::series);
        } else {
          CHECK(second);  // the only other 1x1 layers: the GS-SOC second stages, widths 32..512
          CHECK(is_matrix_path(path));
          ++matrix_layers;
        }
      }
    }
    // LipConvnet-15 GS-SOC (4,1): 14 second stages below 1024 channels, in both modes.
    CHECK(matrix_layers == (conv == "gs-soc" ? 28 : 0));
  }
}

TEST_CASE("a checkpoint trained before the matrix path certifies to the same numbers on every path (real CIFAR-100)",
          "[soc][matrix][checkpoint]") {
  // tests/data/pre-matrix-path: a LipConvnet-5 GS-SOC (4,1) trained and certified by the code before the matrix
  // path (commit 128c48e; how, in its README). Certified here again, as `orthoconv certify` does, with the 1x1
  // layers on the cost model's choice, all on the series and all on the matrix path.
  const std::string dir = orthoconv::testing::real_data_dir();
  if (dir.empty()) {
    WARN("real CIFAR-100 not found (set ORTHOCONV_DATA): skipped");
    return;
  }
  const std::string fixture = std::string(ORTHOCONV_SOURCE_DIR) + "/tests/data/pre-matrix-path/";
  const std::string file = fixture + "last.safetensors";
  std::ifstream json_file(fixture + "certify.json");
  REQUIRE(json_file.good());
  const nlohmann::json before = nlohmann::json::parse(json_file);
  const Checkpoint checkpoint = load_checkpoint(file);
  ModelConfig config = model_config_from_checkpoint(checkpoint, file);
  const Normalization norm = normalization_from_checkpoint(checkpoint, file);
  config.init_iterations = 0;
  LipConvnet model(config);
  read_model_state(checkpoint, file, model);
  model.set_training(false);
  REQUIRE(config.architecture() == before["architecture"].get<std::string>());

  const CifarSplit test = load_cifar100(dir, "test");
  const int64_t count = before["images"].get<int64_t>();
  std::vector<int64_t> indices(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) indices[static_cast<size_t>(i)] = i;
  const std::vector<int> eps{36, 72, 108};
  const NetworkBound bound = verify_network(model, config.eval_terms, Precision::float64, norm);
  REQUIRE(bound.lipschitz == before["verified"]["lipschitz"].get<double>());

  for (SocPath path : {SocPath::automatic, SocPath::series, SocPath::matrix_conv, SocPath::matrix_gemm}) {
    INFO("1x1 path " << soc_path_name(path));
    int one_by_one = 0, on_matrix = 0;
    for (NamedSoc& s : model.soc_layers())
      if (s.soc->config().kernel == 1) s.soc->set_path(path);
    // Batches of 100, as certify.json was made: under auto the 128-channel layers (the last second stage and the
    // head, 100 pixels) then take the series path, the other second stages and the stride-2 1x1 layer's 64-channel
    // groups the matrix path.
    const VerifiedEvaluation v = evaluate_verified(model, bound, test, indices, norm, eps, 100);
    for (NamedSoc& s : model.soc_layers())
      if (s.soc->config().kernel == 1) {
        ++one_by_one;
        on_matrix += is_matrix_path(s.soc->last_path());
        if (is_matrix_path(path)) CHECK(s.soc->last_path() == path);
      }
    if (path == SocPath::automatic) CHECK((on_matrix > 0 && on_matrix < one_by_one));  // both paths in one model
    if (is_matrix_path(path)) CHECK(on_matrix == one_by_one);
    if (path == SocPath::series) CHECK(on_matrix == 0);

    // Counts: exactly as before (the fractions are count / images, computed the same way).
    CHECK(v.nominal.clean_accuracy() == before["clean_accuracy"].get<double>());
    CHECK(v.verified.clean_accuracy() == before["verified"]["clean_accuracy"].get<double>());
    for (int e : eps) {
      const std::string key = std::to_string(e);
      CHECK(v.nominal.certified_accuracy(e) == before["certified_accuracy"][key].get<double>());
      CHECK(v.lipschitz.certified_accuracy(e) ==
            before["verified"]["certified_accuracy_lipschitz_only"][key].get<double>());
      CHECK(v.verified.certified_accuracy(e) == before["verified"]["certified_accuracy"][key].get<double>());
    }
    // Radii: the float64 pass does not depend on the path (bit for bit). The float32 logits of either run are
    // within its largest |float32 - float64| deviation d of the same float64 logits, so a margin moves by at most
    // 2 (d_before + d_now) and a radius by that over sqrt(2) L_in (L L_in for the verified-L column).
    CHECK(v.verified.mean_radius() == before["verified"]["mean_radius"].get<double>());
    double deviation = 0.0;
    for (double d : v.logit_deviation) deviation = std::max(deviation, d);
    const double margin_shift = 2.0 * (deviation + before["verified"]["max_float32_logit_deviation"].get<double>());
    INFO("largest float32 logit deviation now " << deviation << ", margin shift allowed " << margin_shift);
    CHECK(deviation < 1e-4);
    const double l_in = norm.lipschitz();
    CHECK(std::abs(v.nominal.mean_radius() - before["mean_radius"].get<double>()) <=
          margin_shift / (std::sqrt(2.0) * l_in));
    CHECK(std::abs(v.lipschitz.mean_radius() - before["verified"]["mean_radius_lipschitz_only"].get<double>()) <=
          margin_shift / (std::sqrt(2.0) * l_in * bound.lipschitz));
  }
}
