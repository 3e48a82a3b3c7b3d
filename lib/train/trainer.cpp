// The trainer: prepares a run (its directory, the model, a resume), then runs epochs of training steps, each
// followed by its evaluation, checkpoints and logs. The other rooms of lib/train: the configuration
// (train_config.cpp), the schedule and SGD (sgd.cpp), one step (train_step.cpp), the checkpoints and resume
// (trainer_checkpoint.cpp, training_state.cpp), the metrics logs (metrics_files.cpp), the output directory
// (run_directory.cpp) and the console (training_console.cpp). See include/orthoconv/trainer.hpp.
#include "orthoconv/trainer.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>

#include "orthoconv/certify.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/runtime.hpp"
#include "train/metrics_files.hpp"
#include "train/run_directory.hpp"
#include "train/training_console.hpp"

namespace orthoconv {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

// A deterministic permutation of 0..n-1 (Fisher-Yates on a fixed generator: the same on every platform).
std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = i;
  std::mt19937_64 rng(seed ^ 0x5eed5eed5eed5eedULL);
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(out[static_cast<size_t>(i)], out[static_cast<size_t>(j)]);
  }
  return out;
}

bool parameters_finite(LipConvnet& model) {
  std::vector<float> host;
  for (NamedParameter& p : model.parameters()) {
    host.resize(static_cast<size_t>(p.parameter->value.numel()));
    model.backend().to_host(p.parameter->value.data(), host.data(), p.parameter->value.numel());
    for (float x : host)
      if (!std::isfinite(x)) return false;
  }
  return true;
}

// FNV-1a (64-bit) over the bits of every parameter and buffer: equal on two ranks iff (but for a 2^-64 chance) their
// weights are.
uint64_t weights_checksum(LipConvnet& model) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  std::vector<float> host;
  auto add = [&](Tensor& t) {
    host.resize(static_cast<size_t>(t.numel()));
    model.backend().to_host(t.data(), host.data(), t.numel());
    const auto* bytes = reinterpret_cast<const unsigned char*>(host.data());
    for (size_t i = 0; i < host.size() * sizeof(float); ++i) hash = (hash ^ bytes[i]) * 0x100000001b3ULL;
  };
  for (NamedParameter& p : model.parameters()) add(p.parameter->value);
  for (auto& b : model.buffers()) add(*b.tensor);
  return hash;
}

}  // namespace

// ---------------------------------------------------------------- preparing a run

Trainer::Trainer(const TrainConfig& config, const CifarSplit& train, const CifarSplit& test, std::FILE* log,
                 std::shared_ptr<Communicator> communicator)
    : config_(config),
      train_(train),
      test_(test),
      log_(log),
      communicator_(communicator ? std::move(communicator) : single_process_communicator()) {
  if (!communicator_->root()) log_ = nullptr;  // rank 0 speaks for the job
  config_.model.seed = config_.seed;
  config_.validate();
  select_images();
  const int64_t per_epoch = steps_per_epoch();
  const int64_t ranks = communicator_->size(), images = static_cast<int64_t>(train_indices_.size());
  const int64_t last_batch = images - (per_epoch - 1) * config_.batch_size;
  require_setting(std::min(config_.batch_size, last_batch) >= ranks, {"batch", "train_subset"},
                  "data-parallel training on ", ranks,
                  " ranks needs at least one image per rank in every batch: "
                  "{0} ",
                  config_.batch_size, " over ", images, " training images leaves a last batch of ", last_batch,
                  " (choose {0} or {1} so that it holds at least ", ranks, ")");
  require_setting(config_.epochs <= kMaxTrainingSteps / per_epoch, {"epochs"}, "{0} ", config_.epochs, " at ",
                  per_epoch, " steps per epoch makes more than the ", kMaxTrainingSteps,
                  " (2^53) training steps the schedule counts");
  // What surely gets allocated: weights, their gradients and momentum buffers, and the block outputs of the
  // largest batch (training or evaluation).
  const ModelConfig::Sizes sizes = config_.model.sizes();
  const double batch = static_cast<double>(
      std::max(std::min<int64_t>(config_.batch_size, static_cast<int64_t>(train_indices_.size())),
               std::min<int64_t>(config_.eval_batch, std::max(test_indices_.size(), val_indices_.size()))));
  try {
    require_memory(4.0 * (3.0 * sizes.weights + batch * sizes.activations),
                   "training " + config_.model.conv_label() + " LipConvnet-" + std::to_string(config_.model.depth) +
                       " of width " + std::to_string(config_.model.init_channels) + " on batches of " +
                       std::to_string(static_cast<int64_t>(batch)) + " ({0} " + std::to_string(config_.batch_size) +
                       ")");
  } catch (const ConfigError& e) {
    throw SettingError({"batch"}, e.what());
  }
}

// The training, validation and test images: a seeded permutation holds val_split images out, and train_subset
// (0: all the rest) trains; the test set's first test_subset images (0: all) are evaluated.
void Trainer::select_images() {
  const int64_t available = train_.size();
  require_setting(config_.val_split < available, {"val_split"}, "{0} (", config_.val_split,
                  ") must be smaller than the ", available, " training images");
  require_setting(config_.train_subset <= available - config_.val_split, {"train_subset", "val_split"}, "{0} (",
                  config_.train_subset, ") exceeds the ", available - config_.val_split,
                  " training images left after {1}");
  if (config_.train_subset > 0 || config_.val_split > 0) {
    auto order = permutation(available, config_.seed);
    val_indices_.assign(order.begin(), order.begin() + config_.val_split);
    const int64_t count = config_.train_subset > 0 ? config_.train_subset : available - config_.val_split;
    train_indices_.assign(order.begin() + config_.val_split, order.begin() + config_.val_split + count);
  } else {
    for (int64_t i = 0; i < available; ++i) train_indices_.push_back(i);
  }
  const int64_t tests = config_.test_subset > 0 ? std::min(config_.test_subset, test_.size()) : test_.size();
  for (int64_t i = 0; i < tests; ++i) test_indices_.push_back(i);
  require_setting(!train_indices_.empty(), {"val_split"}, "no training images left (", available, " in the split, {0} ",
                  config_.val_split, ")");
}

Trainer::~Trainer() {
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

int64_t Trainer::steps_per_epoch() const {
  const int64_t images = static_cast<int64_t>(train_indices_.size());
  return images / config_.batch_size + (images % config_.batch_size != 0);  // the last batch may be smaller
}

void Trainer::prepare(const std::string& resume_from) {
  require(model_ == nullptr, "Trainer::prepare called twice");
  set_thread_count(config_.threads);
  if (communicator_->root()) lock_fd_ = open_run_directory(config_.out_dir, resume_from, log_);

  model_ = std::make_unique<LipConvnet>(config_.model, backend_for(config_.device));
  model_->set_precision(config_.precision);
  sgd_ = std::make_unique<Sgd>(*model_);
  step_ = std::make_unique<TrainStep>(*model_, *sgd_, config_.gamma, config_.normalization.lipschitz(), communicator_);
  if (!resume_from.empty()) load(resume_from);
  check_ranks_agree(resume_from.empty() ? "after initialization" : "after loading " + resume_from);
  if (!communicator_->root()) return;
  write_file_atomically((fs::path(config_.out_dir) / "config.json").string(), config_.to_json());
  // The logs follow the checkpoint (a crash may have come in between).
  if (!resume_from.empty()) write_metrics_files(config_.out_dir, history_, config_.eps);
  if (log_) {
    std::fprintf(log_, "%s", configuration_table().c_str());
    if (!resume_from.empty()) {
      std::fprintf(log_, "resumed from %s after epoch %lld", resume_from.c_str(), static_cast<long long>(epochs_done_));
      if (progress_.steps > 0)
        std::fprintf(log_, " and %lld of %lld steps of epoch %lld", static_cast<long long>(progress_.steps),
                     static_cast<long long>(steps_per_epoch()), static_cast<long long>(epochs_done_) + 1);
      std::fprintf(log_, " (step %lld)\n", static_cast<long long>(global_step_));
    }
    std::fflush(log_);
  }
}

void Trainer::check_ranks_agree(const std::string& when) {
  if (communicator_->size() == 1) return;
  const std::vector<uint64_t> sums = communicator_->allgather(weights_checksum(*model_));
  for (size_t r = 1; r < sums.size(); ++r)
    if (sums[r] != sums[0]) {
      char text[64];
      std::snprintf(text, sizeof text, "%016llx and %016llx", static_cast<unsigned long long>(sums[0]),
                    static_cast<unsigned long long>(sums[r]));
      throw Error("the weights of rank 0 and rank " + std::to_string(r) + " differ " + when + " (checksums " + text +
                  "): the ranks no longer train one model; check that every rank runs the same orthoconv build on "
                  "the same data and checkpoint");
    }
}

CertifyReport Trainer::evaluate(const CifarSplit& split, const std::vector<int64_t>& indices) {
  return evaluate_model(
      *model_, split, indices, config_.normalization, config_.eps, config_.eval_batch,
      [this] { return stop_requested(); }, *communicator_);
}

void Trainer::diverged(const std::string& what) const {
  throw TrainingDiverged(
      {"lr"}, what + "; stopped. " +
                  (last_good_checkpoint_.empty() ? std::string("No checkpoint had been written yet.")
                                                 : "The last good checkpoint is kept: " + last_good_checkpoint_ +
                                                       " (step " + std::to_string(last_good_step_) + ").") +
                  " Try a smaller {0}.");
}

void Trainer::save_interrupted(const std::string& last_path) {
  // A step that overflowed the parameters must not become the checkpoint to resume from.
  if (!parameters_finite(*model_))
    diverged("non-finite parameters at step " + std::to_string(global_step_) + " (interrupted)");
  save(last_path);
  interrupted_ = true;
  if (log_) {
    std::fprintf(log_, "stopped on request at step %lld: epoch %lld, %lld of %lld steps done%s; checkpoint %s\n",
                 static_cast<long long>(global_step_), static_cast<long long>(epochs_done_) + 1,
                 static_cast<long long>(progress_.steps), static_cast<long long>(steps_per_epoch()),
                 progress_.steps == steps_per_epoch() ? " (its evaluation runs on resume)" : "", last_path.c_str());
    std::fflush(log_);
  }
}

// ---------------------------------------------------------------- running it

std::string Trainer::last_path() const { return (fs::path(config_.out_dir) / "last.safetensors").string(); }

int64_t Trainer::total_steps() const { return steps_per_epoch() * config_.epochs; }

// The main loop, as llm.c's: each epoch is its training steps, then its evaluation, checkpoints and logs.
void Trainer::run(int64_t stop_after) {
  require(model_ != nullptr, "Trainer::run called before prepare");
  interrupted_ = false;
  if (epochs_done_ >= config_.epochs) {
    if (log_)
      std::fprintf(log_, "nothing to do: %lld of %lld epochs already done\n", static_cast<long long>(epochs_done_),
                   static_cast<long long>(config_.epochs));
    return;
  }
  BatchLoader::Options options;
  options.batch_size = config_.batch_size;
  options.shuffle = true;
  options.augment = true;
  options.drop_last = false;
  options.seed = config_.seed;
  options.part = communicator_->rank();
  options.parts = communicator_->size();
  BatchLoader loader(train_, train_indices_, config_.normalization, options);
  TrainingConsole console(log_, config_.epochs, loader.batches_per_epoch(), total_steps());
  console.print_header(config_.eps.front());
  model_->set_training(true);
  const int64_t end = stop_after > 0 ? std::min(stop_after, config_.epochs) : config_.epochs;
  for (int64_t epoch = epochs_done_; epoch < end; ++epoch) {
    if (!train_epoch(loader, epoch, console)) return;  // stopped on request: last.safetensors holds the step
    if (!finish_epoch(epoch, console)) return;
  }
}

// The epoch's remaining training steps; false when a stop request ended them (the checkpoint is written).
bool Trainer::train_epoch(BatchLoader& loader, int64_t epoch, TrainingConsole& console) {
  // progress_ holds what an interrupted earlier session did of this epoch (nothing at an epoch's start).
  epoch_start_ =
      Clock::now() - std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(progress_.seconds));
  console.start_epoch();
  loader.start_epoch(epoch, progress_.steps);
  const int64_t total = total_steps();
  while (loader.next(batch_)) {
    const double lr = scheduled_lr(config_, global_step_, total);
    const StepStats stats = train_step(batch_, lr);
    if (!std::isfinite(stats.loss_sum)) {
      console.end_bar();
      diverged("non-finite training loss at epoch " + std::to_string(epoch + 1) + ", step " +
               std::to_string(global_step_ + 1) + " (lr " + std::to_string(lr) + ")");
    }
    count_step(stats);
    console.show_step(epoch, progress_, global_step_, lr);
    if (stop_requested()) {
      console.clear_bar();
      save_interrupted(last_path());
      return false;
    }
  }
  console.clear_bar();
  return true;
}

// One SGD step on this rank's part of the global batch (the whole batch in one process), its all-reduce time
// added to the epoch's.
StepStats Trainer::train_step(const Batch& batch, double lr) {
  const int64_t train_images = static_cast<int64_t>(train_indices_.size());
  const int64_t batch_images = std::min(config_.batch_size, train_images - progress_.steps * config_.batch_size);
  const double allreduce_before = step_->allreduce_seconds();
  const StepStats stats =
      step_->run(batch.images, batch.labels, static_cast<float>(lr), static_cast<float>(config_.momentum),
                 static_cast<float>(config_.weight_decay), batch_images);
  progress_.allreduce_seconds += step_->allreduce_seconds() - allreduce_before;
  return stats;
}

void Trainer::count_step(const StepStats& stats) {
  ++global_step_;
  progress_.steps += 1;
  progress_.loss_sum += stats.loss_sum;
  progress_.correct += stats.correct;
  progress_.images += stats.images;
  progress_.seconds = std::chrono::duration<double>(Clock::now() - epoch_start_).count();
}

// After the epoch's steps: the weights checked, the evaluation, the checkpoints and logs, the epoch's line. False
// when a stop request ended the run (last.safetensors written).
bool Trainer::finish_epoch(int64_t epoch, TrainingConsole& console) {
  // A finite loss with overflowed parameters would save a broken checkpoint: check them before anything.
  if (!parameters_finite(*model_))
    diverged("non-finite parameters after epoch " + std::to_string(epoch + 1) + " (step " +
             std::to_string(global_step_) + ")");
  check_ranks_agree("after epoch " + std::to_string(epoch + 1));
  // The epoch's steps are done; a stop request from here on abandons its evaluation, which a resume reruns.
  if (stop_requested()) {
    save_interrupted(last_path());
    return false;
  }
  EpochMetrics m = training_metrics(epoch);
  bool new_best = false;
  try {
    new_best = evaluate_epoch(m);
  } catch (const Interrupted&) {
    model_->set_training(true);
    save_interrupted(last_path());
    return false;
  }
  model_->set_training(true);
  m.seconds = std::chrono::duration<double>(Clock::now() - epoch_start_).count();
  commit_epoch(m, new_best);
  console.print_epoch(m, config_.eps.front(), new_best);
  if (stop_requested()) {  // came during the saves: they are done, and so is the epoch
    interrupted_ = true;
    if (log_)
      std::fprintf(log_, "stopped on request after epoch %lld; checkpoint %s\n", static_cast<long long>(epochs_done_),
                   last_path().c_str());
    return false;
  }
  return true;
}

// The epoch's training figures (seconds are set once its evaluation is done).
EpochMetrics Trainer::training_metrics(int64_t epoch) const {
  EpochMetrics m;
  m.epoch = epoch + 1;
  m.step = global_step_;
  m.precision = conv_precision_name(config_.precision);
  m.lr = scheduled_lr(config_, global_step_ - 1, total_steps());  // the lr of the epoch's last step
  m.train_loss = progress_.images ? progress_.loss_sum / static_cast<double>(progress_.images) : 0.0;
  m.train_accuracy =
      progress_.images ? static_cast<double>(progress_.correct) / static_cast<double>(progress_.images) : 0.0;
  m.images_per_second = static_cast<double>(progress_.images) / std::max(progress_.seconds, 1e-9);
  m.ranks = communicator_->size();
  m.allreduce_seconds = progress_.allreduce_seconds;
  return m;
}

// The test evaluation (every eval_every epochs and after the last) and the validation into m; true when the
// validation picks a new best. Interrupted on a stop request.
bool Trainer::evaluate_epoch(EpochMetrics& m) {
  if ((m.epoch % config_.eval_every == 0 || m.epoch == config_.epochs) && !test_indices_.empty()) {
    CertifyReport r = evaluate(test_, test_indices_);
    m.evaluated = true;
    m.test_loss = r.mean_loss();
    m.test_accuracy = r.clean_accuracy();
    m.mean_radius = r.mean_radius();
    m.test_images = r.images;
    for (int e : config_.eps) m.certified[e] = r.certified_accuracy(e);
  }
  if (val_indices_.empty()) return false;
  CertifyReport r = evaluate(train_, val_indices_);
  m.validated = true;
  m.val_accuracy = r.clean_accuracy();
  m.val_certified = r.certified_accuracy(config_.eps.front());
  return m.val_certified >= best_metric_;
}

// The epoch joins the history; best first, then last (the commit), then the logs derived from last's history.
// Rank 0 writes for the job.
void Trainer::commit_epoch(const EpochMetrics& m, bool new_best) {
  history_.push_back(m);
  epochs_done_ = m.epoch;
  progress_ = EpochProgress{};
  if (new_best) {
    best_metric_ = m.val_certified;
    best_epoch_ = epochs_done_;
  }
  if (communicator_->root()) {
    if (new_best) save((fs::path(config_.out_dir) / "best.safetensors").string());
    save(last_path());
    write_metrics_files(config_.out_dir, history_, config_.eps);
  }
  last_good_checkpoint_ = last_path();
  last_good_step_ = global_step_;
}

}  // namespace orthoconv
