// `orthoconv bench train`: images/s of full LipConvnet training steps (forward, backward, SGD update) and peak
// memory. Declared here so that apps/bench.cpp can dispatch to it; implemented in apps/bench_train.cpp.
#pragma once

#include <cstdint>
#include <string>

namespace orthoconv::apps {

struct TrainBenchOptions {
  std::string conv = "gs-soc";     // soc | gs-soc
  std::string groups = "4,1";      // for gs-soc
  int64_t depth = 15;
  int64_t batch = 128;
  int steps = 5;                   // timed steps
  int warmup = 1;                  // untimed steps first
  std::string device = "cpu";
  bool json = false;
};

int run_train_benchmark(const TrainBenchOptions& options);

}  // namespace orthoconv::apps
