// A run's position as a checkpoint's train.* metadata records it: written, read back and checked.
// See include/orthoconv/trainer.hpp.
#include "train/training_state.hpp"

#include <charconv>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"
#include "train/json_fields.hpp"

namespace orthoconv {

using nlohmann::json;

void write_training_state(const TrainingState& state, Checkpoint& out) {
  out.metadata["train.epoch"] = std::to_string(state.epochs_done);
  out.metadata["train.step"] = std::to_string(state.step);
  // Only a single-process run stops inside an epoch (stop requests are not polled with more ranks): the epoch's
  // all-reduce time is 0 there and is not recorded.
  const EpochProgress& progress = state.progress;
  if (progress.steps > 0)
    out.metadata["train.epoch_progress"] = json{
        {"steps", progress.steps},
        {"loss_sum", progress.loss_sum},
        {"correct", progress.correct},
        {"images", progress.images},
        {"seconds", progress.seconds}}.dump();
  out.metadata["train.config"] = state.config.to_json();
  out.metadata["train.precision"] = conv_precision_name(state.config.precision);
  json rng{{"generator", "BatchLoader(seed, epoch)"}, {"seed", state.config.seed}, {"next_epoch", state.epochs_done}};
  out.metadata["train.rng"] = rng.dump();
  char best[64];
  std::snprintf(best, sizeof(best), "%.17g", state.best_metric);
  out.metadata["train.best_metric"] = best;
  out.metadata["train.best_epoch"] = std::to_string(state.best_epoch);
  std::string history;
  for (const EpochMetrics& m : state.history) history += m.json() + "\n";
  out.metadata["train.history"] = history;
}

namespace {

// train.epoch_progress: the steps done in the epoch in progress and their sums (ConfigError or a JSON exception).
EpochProgress epoch_progress_from_json(const std::string& text) {
  const json j = json::parse(text);
  EpochProgress p;
  p.steps = json_int(j, "steps", 1, kMaxTrainingSteps);
  p.images = json_int(j, "images", 1, kLargestInt64);
  p.correct = json_int(j, "correct", 0, p.images);
  p.loss_sum = json_number(j, "loss_sum");
  p.seconds = json_number(j, "seconds");
  require(p.loss_sum >= 0.0 && p.seconds >= 0.0, "negative loss or seconds");
  return p;
}

}  // namespace

TrainingState read_training_state(const Checkpoint& c, const std::string& file) {
  auto meta = [&](const std::string& key) -> const std::string& {
    auto it = c.metadata.find(key);
    if (it == c.metadata.end()) throw IoError("checkpoint " + file + ": missing metadata '" + key + "'");
    return it->second;
  };
  auto invalid = [&](const std::string& key, const std::string& problem) {
    return IoError("checkpoint " + file + ": metadata '" + key + "': " + problem);
  };
  TrainingState state;
  try {
    state.config = TrainConfig::from_json(meta("train.config"));
    state.config.validate();
  } catch (const IoError&) {
    throw;
  } catch (const Error& e) {
    throw invalid("train.config", e.what());
  }
  state.epochs_done = metadata_int(c, "train.epoch", file, 0, kMaxTrainingSteps);
  state.step = metadata_int(c, "train.step", file, 0, kMaxTrainingSteps);
  state.best_epoch = metadata_int(c, "train.best_epoch", file, 0, state.epochs_done);
  const std::string& best = meta("train.best_metric");
  const auto [best_end, best_error] = std::from_chars(best.data(), best.data() + best.size(), state.best_metric);
  if (best.empty() || best_error != std::errc() || best_end != best.data() + best.size() ||
      !(state.best_metric == -1.0 || (state.best_metric >= 0.0 && state.best_metric <= 1.0)))
    throw invalid("train.best_metric", "'" + best.substr(0, 40) + "' is not -1 or an accuracy in [0, 1]");
  try {
    std::stringstream lines(meta("train.history"));
    std::string line;
    while (std::getline(lines, line))
      if (!line.empty()) state.history.push_back(EpochMetrics::from_json(line));
  } catch (const Error& e) {
    throw invalid("train.history", e.what());
  }
  if (static_cast<int64_t>(state.history.size()) != state.epochs_done)
    throw invalid("train.history", "holds " + std::to_string(state.history.size()) + " epochs, but train.epoch is " +
                                       std::to_string(state.epochs_done));
  for (size_t i = 0; i < state.history.size(); ++i) {
    const EpochMetrics& m = state.history[i];
    if (m.epoch != static_cast<int64_t>(i) + 1 || m.step > state.step || (i > 0 && m.step <= state.history[i - 1].step))
      throw invalid("train.history", "line " + std::to_string(i + 1) + " is epoch " + std::to_string(m.epoch) +
                                         " at step " + std::to_string(m.step) + ", out of order (the run is at step " +
                                         std::to_string(state.step) + ")");
  }
  if (auto it = c.metadata.find("train.epoch_progress"); it != c.metadata.end()) {
    try {
      state.progress = epoch_progress_from_json(it->second);
    } catch (const Error& e) {
      throw invalid("train.epoch_progress", e.what());
    } catch (const std::exception& e) {
      throw invalid("train.epoch_progress", e.what());
    }
  }
  return state;
}

void check_training_state(const TrainingState& state, int64_t per_epoch, int64_t batch_size, const std::string& path) {
  auto inconsistent = [&](const std::string& problem) {
    return IoError("checkpoint " + path + ": inconsistent training state: " + problem + " (" +
                   std::to_string(per_epoch) + " steps per epoch)");
  };
  if (state.progress.steps > per_epoch)
    throw inconsistent(std::to_string(state.progress.steps) + " steps done in the epoch in progress");
  if (state.step != state.epochs_done * per_epoch + state.progress.steps)
    throw inconsistent("step " + std::to_string(state.step) + " after " + std::to_string(state.epochs_done) +
                       " epochs and " + std::to_string(state.progress.steps) + " steps");
  for (const EpochMetrics& m : state.history)
    if (m.step != m.epoch * per_epoch)
      throw inconsistent("history epoch " + std::to_string(m.epoch) + " ends at step " + std::to_string(m.step));
  if (state.progress.images > state.progress.steps * batch_size)
    throw inconsistent(std::to_string(state.progress.images) + " images in " + std::to_string(state.progress.steps) +
                       " steps");
}

}  // namespace orthoconv
