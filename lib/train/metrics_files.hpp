// The run's metrics logs, metrics.jsonl and metrics.csv: one line per completed epoch. Internal to the library.
#pragma once

#include <string>
#include <vector>

#include "orthoconv/trainer.hpp"

namespace orthoconv {

// Rewrites <out_dir>/metrics.jsonl and <out_dir>/metrics.csv atomically from `history` (the CSV has one certified
// accuracy column per eps numerator, in the order of `eps`).
void write_metrics_files(const std::string& out_dir, const std::vector<EpochMetrics>& history,
                         const std::vector<int>& eps);

}  // namespace orthoconv
