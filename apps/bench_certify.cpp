// `orthoconv bench certify`: images/s of the float32 evaluation pass (LipConvnet::forward in evaluation mode,
// the backend's convolutions) and of the float64 certifying pass (Float64Network, Eigen GEMMs), on the same
// random images in one run, with the float64 pass's GFLOP/s. No dataset needed.
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "bench_train.hpp"
#include "commands.hpp"
#include "orthoconv/certifying_pass.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/runtime.hpp"

namespace orthoconv::apps {

int run_certify_benchmark(const TrainBenchOptions& o) {
  require(o.batch > 0, "--batch must be positive, got ", o.batch);
  require(o.steps > 0 && o.warmup >= 0, "--steps must be positive and --warmup >= 0, got ", o.steps, " and ", o.warmup);
  const Device device = parse_device(o.device);
  const ModelConfig config = bench_model_config(o);
  LipConvnet model(config, backend_for(device));
  model.set_training(false);
  const Normalization norm;
  const Float64Network pass(model, norm);

  std::mt19937_64 rng(42);
  std::vector<uint8_t> pixels(static_cast<size_t>(o.batch * pass.image_bytes()));
  for (uint8_t& p : pixels) p = static_cast<uint8_t>(rng() & 0xff);
  const NormalizationTable table = normalization_table(norm);
  std::vector<float> host(pixels.size());
  const int64_t plane = pass.image_bytes() / 3;
  for (size_t i = 0; i < pixels.size(); ++i) host[i] = table[(static_cast<int64_t>(i) / plane) % 3][pixels[i]];
  const int64_t side = config.input_side;
  Tensor images = Tensor::from_vector(host, Shape{o.batch, 3, side, side});
  Tensor device_images(images.shape(), model.backend().device()), logits(Shape{1}, model.backend().device());
  model.backend().from_host(images.data(), device_images.data(), images.numel());
  std::vector<double> logits64(static_cast<size_t>(o.batch * config.classes));

  using Clock = std::chrono::steady_clock;
  auto time = [&](auto&& run) {
    for (int i = 0; i < o.warmup; ++i) run();
    const auto start = Clock::now();
    for (int i = 0; i < o.steps; ++i) run();
    return std::chrono::duration<double>(Clock::now() - start).count() / o.steps;
  };
  const double float32 = time([&] {
    model.forward(device_images, logits);
    model.backend().synchronize();
  });
  const double float64 = time([&] { pass.forward(pixels.data(), o.batch, logits64.data()); });
  const double images32 = static_cast<double>(o.batch) / float32, images64 = static_cast<double>(o.batch) / float64;
  const double gflops64 = pass.flops_per_image() * images64 * 1e-9;
  if (o.json) {
    nlohmann::ordered_json out{{"benchmark", "certify"},
                               {"model", "LipConvnet-" + std::to_string(config.depth)},
                               {"conv", config.conv_label()},
                               {"device", o.device},
                               {"threads", thread_count()},
                               {"batch", o.batch},
                               {"steps", o.steps},
                               {"eval_terms", config.eval_terms},
                               {"flops_per_image", pass.flops_per_image()},
                               {"float32_images_per_second", images32},
                               {"float64_images_per_second", images64},
                               {"float64_gflops", gflops64},
                               {"float64_over_float32_time", float64 / float32}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("LipConvnet-%lld %s, %lld images, %d series terms, %d threads\n", static_cast<long long>(config.depth),
                config.conv_label().c_str(), static_cast<long long>(o.batch), config.eval_terms, thread_count());
    std::printf("  float32 evaluation (%s)  %8.1f images/s\n", o.device.c_str(), images32);
    std::printf("  float64 certifying pass    %8.1f images/s  (%.2f GFLOP/image, %.1f GFLOP/s)\n", images64,
                pass.flops_per_image() * 1e-9, gflops64);
    std::printf("  float64 / float32 time     %8.2f\n", float64 / float32);
  }
  return 0;
}

}  // namespace orthoconv::apps
