// `orthoconv bench train`: images/s of full LipConvnet training steps (forward, cross-entropy, backward, SGD
// update) on random batches, and the process's peak resident memory (getrusage). No dataset needed.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "bench_train.hpp"
#include "commands.hpp"
#include "orthoconv/model.hpp"
#include "orthoconv/runtime.hpp"
#include "orthoconv/trainer.hpp"

namespace orthoconv::apps {

ModelConfig bench_model_config(const TrainBenchOptions& o) {
  require(o.conv == "soc" || o.conv == "gs-soc", "--conv must be soc or gs-soc, got '", o.conv, "'");
  ModelConfig config;
  config.conv = o.conv;
  config.depth = o.depth;
  if (o.conv == "soc") {
    // The shared default "4,1" is for gs-soc; plain SOC unless a single count is given.
    GroupPair g = parse_groups(o.groups == "4,1" ? std::string("1") : o.groups);
    require(!g.has_second, "--conv soc takes one group count, got '", o.groups, "'");
    config.groups_first = g.first;
    config.groups_second.reset();
  } else {
    GroupPair g = parse_groups(o.groups);
    config.groups_first = g.first;
    if (g.has_second)
      config.groups_second = g.second;
    else
      config.groups_second.reset();
  }
  config.validate();
  return config;
}

int run_train_benchmark(const TrainBenchOptions& o) {
  require(o.batch > 0, "--batch must be positive, got ", o.batch);
  require(o.steps > 0 && o.warmup >= 0, "--steps must be positive and --warmup >= 0, got ", o.steps, " and ",
          o.warmup);
  require(o.device == "cpu" || o.device == "cuda", "--device must be cpu or cuda, got '", o.device, "'");
  const ModelConfig config = bench_model_config(o);
  const Device device = o.device == "cuda" ? Device::cuda : Device::cpu;
  LipConvnet model(config, backend_for(device));
  Sgd sgd(model);
  Normalization norm;
  TrainStep step(model, sgd, 0.0, norm.lipschitz());

  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int32_t> label(0, static_cast<int32_t>(config.classes - 1));
  std::vector<float> host(static_cast<size_t>(o.batch * 3 * 32 * 32));
  for (float& x : host) x = normal(rng);
  Tensor images = Tensor::from_vector(host, Shape{o.batch, 3, 32, 32});
  std::vector<int32_t> labels(static_cast<size_t>(o.batch));
  for (int32_t& y : labels) y = label(rng);

  using Clock = std::chrono::steady_clock;
  // CPU time of the whole process (all threads): on a shared machine wall time measures the neighbours too.
  auto cpu_seconds = [] {
    struct rusage usage {};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
           1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
  };
  for (int i = 0; i < o.warmup; ++i) step.run(images, labels, 0.01f, 0.9f, 5e-4f);
  model.backend().synchronize();
  std::vector<double> times;
  const double cpu_start = cpu_seconds();
  for (int i = 0; i < o.steps; ++i) {
    const auto start = Clock::now();
    step.run(images, labels, 0.01f, 0.9f, 5e-4f);
    model.backend().synchronize();
    times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  const double cpu_per_step = (cpu_seconds() - cpu_start) / static_cast<double>(o.steps);
  double total = 0.0;
  for (double t : times) total += t;
  const double per_step = total / static_cast<double>(times.size());
  const double ips = static_cast<double>(o.batch) / per_step;
  const double rss_mb = static_cast<double>(peak_rss_bytes()) / (1024.0 * 1024.0);
  if (o.json) {
    nlohmann::ordered_json out{{"benchmark", "train"},
                               {"model", "LipConvnet-" + std::to_string(config.depth)},
                               {"conv", config.conv_label()},
                               {"device", o.device},
                               {"threads", thread_count()},
                               {"batch", o.batch},
                               {"steps", o.steps},
                               {"warmup", o.warmup},
                               {"parameters", model.parameter_count()},
                               {"seconds_per_step", per_step},
                               {"images_per_second", ips},
                               {"cpu_seconds_per_step", cpu_per_step},
                               {"peak_rss_mb", rss_mb}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("LipConvnet-%lld %s, batch %lld, %s, %d threads\n", static_cast<long long>(config.depth),
                config.conv_label().c_str(), static_cast<long long>(o.batch), o.device.c_str(), thread_count());
    std::printf("  %.3f s/step  %.1f images/s  (mean of %d steps after %d warmup)\n", per_step, ips, o.steps,
                o.warmup);
    std::printf("  %.3f CPU s/step (all threads)\n", cpu_per_step);
    std::printf("  peak RSS %.0f MiB\n", rss_mb);
  }
  return 0;
}

}  // namespace orthoconv::apps
