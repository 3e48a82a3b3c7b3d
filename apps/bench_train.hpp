// `orthoconv bench train`: images/s of full LipConvnet training steps (forward, backward, SGD update) and peak
// memory, for each requested pair of a path of the 1x1 SocConvs and a precision of the series convolutions, the
// steps of each taking turns on one model, so that their ratios are measured side by side. Declared here so that
// apps/bench.cpp can dispatch to it; implemented in apps/bench_train.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "orthoconv/model.hpp"

namespace orthoconv::apps {

struct TrainBenchOptions {
  std::string conv = "gs-soc";  // soc | gs-soc
  std::string groups = "4,1";   // for gs-soc
  int64_t depth = 15;
  int64_t batch = 128;
  int steps = 5;   // timed steps
  int warmup = 1;  // untimed steps first
  std::string device = "cpu";
  std::vector<std::string> paths{"series", "auto"};  // 1x1 SocConv paths, timed side by side
  std::vector<std::string> precisions{"fp32"};       // series convolutions, timed side by side
  bool json = false;
};

int run_train_benchmark(const TrainBenchOptions& options);
// `orthoconv bench certify`: images/s of the float32 evaluation pass and of the float64 certifying pass
// (apps/bench_certify.cpp), with the same model options.
int run_certify_benchmark(const TrainBenchOptions& options);
// The LipConvnet of --conv / --groups / --depth (throws ConfigError on bad values).
ModelConfig bench_model_config(const TrainBenchOptions& options);

}  // namespace orthoconv::apps
