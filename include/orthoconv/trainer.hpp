// orthoconv/trainer.hpp: training LipConvnet on CIFAR-100 with the GS paper's recipe (Table 3).
//
// Defaults = the paper preset: SGD, momentum 0.9, lr 0.1, weight decay 5e-4 on every parameter, batch 128,
// 200 epochs, lr x0.1 at 50% and 75% of the total iterations (stepped per iteration, like PyTorch's MultiStepLR
// with milestones [T/2, 3T/4]), cross-entropy, seed 42. Optional certificate regularization (gamma > 0):
//   loss = CE - gamma * mean_n relu(r_n),  r_n = (f_y - max_{j != y} f_j) / (sqrt(2) * L_in)
// with y the true label (soc head only); its gradient flows through the top-2 margin.
//
// --precision (TrainConfig::precision): the series convolutions of the training steps run in fp32, bf16 (CPU
// with AVX512-BF16; CUDA) or tf32 (CUDA), per shape where the backend finds them faster (SocConv); everything
// else, and every evaluation, is float32. It is recorded in config.json, in every metrics line and in the
// checkpoints, and a resumed run keeps it.
//
// Each epoch: train loss/accuracy, then clean and certified accuracy on the test set (or its first
// test_subset images), printed as one line; then best.safetensors (when val_split > 0 picks a new best on the
// held-out training images) and last.safetensors are written atomically, and only then metrics.jsonl /
// metrics.csv (rewritten atomically from the history that last.safetensors holds): the logs never report an epoch
// that has no checkpoint, and a resume rewrites them from the checkpoint.
//
// The output directory belongs to one trainer at a time: prepare() takes an exclusive flock on <out>/train.lock
// (held until the trainer is destroyed) and refuses a second writer; it then removes the temporary files that
// saves interrupted by a crash left there (<file>.tmp-<pid>).
//
// A stop request (set_stop_request: in the command line, the first SIGINT / SIGTERM) is polled after every
// training step and every evaluation batch: the trainer then writes last.safetensors at that step, with the
// position in the epoch, and run() returns with interrupted() true. Resuming from last.safetensors, after an epoch
// or in the middle of one, continues bit for bit on the CPU with the same thread count: the checkpoint holds every
// parameter, power-iteration vector and step counter, the momentum buffers, epoch/step and the steps done in the
// epoch in progress with their loss and accuracy sums, the loader's RNG state (seed; batches are a pure function
// of (seed, epoch)) and the metrics history.
//
// Data-parallel jobs (a Communicator of N > 1 ranks, communicator.hpp; docs/distributed.md): every rank holds the
// whole model and the same (seed, epoch)-determined order; each global batch (batch_size, 128 by default) is cut
// into N contiguous parts (batch_part), rank r trains on part r, and the gradient of the global batch is the sum
// of the parts' gradients, each part's loss scaled by (part images / batch images): one all-reduce of one flat
// gradient buffer per step (plus one of the step's three statistics, which also makes a non-finite loss every
// rank's decision). The run is the single-process run with the gradient sum split in N parts: equal up to the
// order of the float32 summation (tests/test_distributed.cpp derives the tolerance). The weights stay identical on
// every rank: a checksum of every parameter and buffer is compared after loading and after every epoch (Error
// naming the ranks when they differ). Evaluation runs whole evaluation batches on each rank (batch_range) and
// gathers per-image results, so its metrics are those of one process, bit for bit. Rank 0 alone takes the lock
// and writes config.json, the checkpoints, the metrics and the log (the other ranks are silent); a checkpoint
// holds global-batch positions only, so a run may be resumed with another number of ranks. Every part must hold
// an image: the batch, and the last batch of an epoch, must have at least N images (ConfigError otherwise). Stop
// requests are not polled with more than one rank (under mpirun, the launcher delivers the signals).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/communicator.hpp"
#include "orthoconv/certify.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

struct TrainConfig {
  ModelConfig model;
  Normalization normalization;
  std::string data_dir;
  std::string out_dir = "runs/lipconvnet";
  Device device = Device::cpu;
  ConvPrecision precision = ConvPrecision::fp32;  // series convolutions of the training steps
  int64_t epochs = 200;
  int64_t batch_size = 128;
  double lr = 0.1;
  double momentum = 0.9;
  double weight_decay = 5e-4;
  double lr_decay = 0.1;                      // factor at each milestone
  std::vector<double> milestones{0.5, 0.75};  // fractions of the total iterations
  double gamma = 0.0;                         // certificate regularization
  int64_t train_subset = 0;                   // 0: every training image (minus val_split)
  int64_t val_split = 0;                      // training images held out to choose best.safetensors
  int64_t test_subset = 0;                    // 0: the whole test set
  int64_t eval_every = 1;                     // epochs between test evaluations (the last always runs)
  int64_t eval_batch = 256;
  std::vector<int> eps{36};  // numerators over 255; the first is the headline
  uint64_t seed = 42;
  int threads = 0;  // 0: leave OpenMP's default (at most max_thread_count())

  void validate() const;                                  // SettingError naming the setting (its config.json key)
  std::string to_json() const;                            // config.json (pretty, stable key order)
  static TrainConfig from_json(const std::string& text);  // ConfigError on bad JSON / values
};

// Learning rate of iteration `step` (0-based) of `total` (at most kMaxTrainingSteps): lr * decay^(number of
// milestones m <= step), with the milestones floor(total * fraction) (50%: total / 2, 75%: 3 * total / 4, as the
// reference).
double scheduled_lr(const TrainConfig& config, int64_t step, int64_t total);

// SGD with momentum over every model parameter, on the model's backend (PyTorch semantics).
class Sgd {
 public:
  explicit Sgd(LipConvnet& model);
  void step(float lr, float momentum, float weight_decay);
  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps) { steps_ = steps; }
  // "optimizer.momentum.<parameter name>" tensors.
  void save(Checkpoint& out);
  void load(const Checkpoint& in, const std::string& file);

 private:
  LipConvnet& model_;
  std::vector<NamedParameter> params_;
  std::vector<Tensor> momentum_;
  int64_t steps_ = 0;
};

struct StepStats {
  double loss_sum = 0.0;  // cross-entropy summed over the batch (without the regularizer)
  int64_t correct = 0;
  int64_t images = 0;
};

// One full training step: forward, loss (+ certificate regularization), zero_grad, backward, SGD update.
// The buffers are kept between calls (no allocation in the steady state).
// With a communicator of N > 1 ranks (null: one process), `images` is this rank's part of a global batch of
// `batch_images` (every rank's part non-empty): the loss gradient is scaled by part / batch images, the statistics
// are summed over the ranks (an all-reduce of 3 doubles) and so is the gradient (one all-reduce of the flat
// gradient buffer, on the model's device) before every rank takes the same SGD step. The returned statistics are
// then the global batch's.
class TrainStep {
 public:
  TrainStep(LipConvnet& model, Sgd& optimizer, double gamma, double input_lipschitz,
            std::shared_ptr<Communicator> communicator = nullptr);
  // batch_images: the global batch (0: images.dim(0), a single process).
  StepStats run(const Tensor& images, const std::vector<int32_t>& labels, float lr, float momentum, float weight_decay,
                int64_t batch_images = 0);
  // Wall time spent in the all-reduces of the steps so far (the gradient's packing into its flat buffer included;
  // on CUDA the stream is drained before and after): 0 for one process.
  double allreduce_seconds() const { return allreduce_seconds_; }
  // Floats of the flat gradient buffer all-reduced every step (the parameter count).
  int64_t allreduce_floats() const;

 private:
  LipConvnet& model_;
  Sgd& optimizer_;
  double gamma_, lipschitz_;
  Tensor device_images_, logits_, diff_logits_, regularizer_;
  std::vector<float> host_logits_, host_regularizer_;
  std::shared_ptr<Communicator> communicator_;
  std::vector<NamedParameter> params_;
  Tensor flat_gradient_;  // every parameter's gradient back to back (N > 1 ranks)
  double allreduce_seconds_ = 0.0;

  void allreduce_gradients();
};

struct EpochMetrics {
  int64_t epoch = 0;               // 1-based, completed epochs
  std::string precision = "fp32";  // of the epoch's training steps (conv_precision_name)
  int64_t step = 0;                // iterations done
  double lr = 0.0;                 // lr of the last iteration
  double seconds = 0.0;
  double images_per_second = 0.0;
  double train_loss = 0.0, train_accuracy = 0.0;
  bool evaluated = false;
  double test_loss = 0.0, test_accuracy = 0.0, mean_radius = 0.0;
  int64_t test_images = 0;
  std::map<int, double> certified;  // eps numerator -> test certified accuracy
  bool validated = false;
  double val_accuracy = 0.0, val_certified = 0.0;
  int ranks = 1;                   // of the job that trained the epoch (its last session)
  double allreduce_seconds = 0.0;  // in the steps' all-reduces (N > 1; reported, not compared)
  std::string json() const;        // one JSON line (only seconds and images_per_second depend on wall time)
  static EpochMetrics from_json(const std::string& line);  // ConfigError on bad JSON / values
};

// The epoch in progress: training steps done in it and their sums (so that a resume in the middle of an epoch
// reports the same train loss and accuracy as an uninterrupted run).
struct EpochProgress {
  int64_t steps = 0;
  double loss_sum = 0.0;
  int64_t correct = 0, images = 0;
  double seconds = 0.0;            // wall time spent on those steps (reported, not compared)
  double allreduce_seconds = 0.0;  // of that, in the all-reduces (N > 1 ranks; not saved: see Trainer::save)
};

// Where a run stands, as a checkpoint's train.* metadata records it.
struct TrainingState {
  TrainConfig config;                 // train.config
  int64_t epochs_done = 0;            // train.epoch: completed epochs
  int64_t step = 0;                   // train.step: iterations done
  EpochProgress progress;             // train.epoch_progress (absent: none, the checkpoint is at an epoch's end)
  double best_metric = -1.0;          // train.best_metric
  int64_t best_epoch = 0;             // train.best_epoch
  std::vector<EpochMetrics> history;  // train.history: one line per completed epoch
};
// Reads and checks the train.* metadata: IoError naming the file and the key on anything missing or malformed, and
// on a state that cannot be (a history that is not epochs 1..epochs_done, a best epoch after the last, sums that
// do not fit their counts). The step counts against steps per epoch are checked by Trainer::prepare.
TrainingState read_training_state(const Checkpoint& checkpoint, const std::string& file);
// Writes `state` as the train.* metadata that read_training_state reads (train.epoch_progress only when steps of an
// epoch are done; train.precision and train.rng beside the configuration).
void write_training_state(const TrainingState& state, Checkpoint& out);

// Training errors that leave the last checkpoint in place (non-finite loss). The message advises a smaller
// learning rate, naming the setting "lr" (NamesSettings).
class TrainingDiverged : public NamingSettings<Error> {
 public:
  using NamingSettings::NamingSettings;
};

class TrainingConsole;  // lib/train/training_console.hpp

class Trainer {
 public:
  // The splits must outlive the trainer. `log` receives the human-readable output (null: silent; ranks other than 0
  // are always silent). communicator: the data-parallel job (null: one process; see the top of this file).
  Trainer(const TrainConfig& config, const CifarSplit& train, const CifarSplit& test, std::FILE* log = stdout,
          std::shared_ptr<Communicator> communicator = nullptr);
  ~Trainer();

  // Prepares out_dir: created, writable, locked (IoError when another trainer holds it), stale temporaries removed;
  // it must not hold a run (last.safetensors) unless resume_from is that run's last.safetensors. Then writes
  // config.json. With resume_from, loads the checkpoint (architecture, seed, batch and subsets must match; its state
  // must be consistent with them) and continues where it stopped, after an epoch or inside one.
  void prepare(const std::string& resume_from = "");
  // Runs the remaining epochs, or stops after epoch `stop_after` (1-based; 0: run to the end) as if interrupted
  // there, or earlier on a stop request. Throws TrainingDiverged on a non-finite loss.
  void run(int64_t stop_after = 0);
  // Polled after every training step and every evaluation batch (see the top of this file). `requested` must be
  // cheap; the command line's reads an atomic flag that its signal handler sets.
  void set_stop_request(std::function<bool()> requested) { stop_requested_ = std::move(requested); }
  bool interrupted() const { return interrupted_; }

  LipConvnet& model() { return *model_; }
  const std::vector<EpochMetrics>& history() const { return history_; }
  int64_t epochs_done() const { return epochs_done_; }
  int64_t global_step() const { return global_step_; }
  const EpochProgress& progress() const { return progress_; }  // of the epoch in progress
  int64_t steps_per_epoch() const;
  std::string configuration_table() const;

 private:
  void select_images();  // train_indices_, val_indices_, test_indices_ (constructor)
  void save(const std::string& path);
  void load(const std::string& path);
  TrainingState training_state() const;  // where the run stands, as save() records it
  bool stop_requested() const { return communicator_->size() == 1 && stop_requested_ && stop_requested_(); }
  // Evaluation of split[indices], sharded over the ranks; the metrics of one process.
  CertifyReport evaluate(const CifarSplit& split, const std::vector<int64_t>& indices);
  // Error unless every rank holds the same parameters and buffers (a checksum of their bits), `when` in the message.
  void check_ranks_agree(const std::string& when);
  // Writes last.safetensors at the current step after a stop request and logs where the run stopped.
  void save_interrupted(const std::string& last_path);
  [[noreturn]] void diverged(const std::string& what) const;

  // The pieces of run(), in the order it calls them (trainer.cpp).
  std::string last_path() const;
  int64_t total_steps() const;
  bool train_epoch(BatchLoader& loader, int64_t epoch, TrainingConsole& console);
  StepStats train_step(const Batch& batch, double lr);
  void count_step(const StepStats& stats);
  bool finish_epoch(int64_t epoch, TrainingConsole& console);
  EpochMetrics training_metrics(int64_t epoch) const;
  bool evaluate_epoch(EpochMetrics& m);
  void commit_epoch(const EpochMetrics& m, bool new_best);

  TrainConfig config_;
  const CifarSplit& train_;
  const CifarSplit& test_;
  std::FILE* log_;
  std::shared_ptr<Communicator> communicator_;
  std::unique_ptr<LipConvnet> model_;
  std::unique_ptr<Sgd> sgd_;
  std::unique_ptr<TrainStep> step_;
  std::vector<int64_t> train_indices_, val_indices_, test_indices_;
  std::vector<EpochMetrics> history_;
  int64_t epochs_done_ = 0;
  int64_t global_step_ = 0;
  EpochProgress progress_;
  double best_metric_ = -1.0;
  int64_t best_epoch_ = 0;
  std::function<bool()> stop_requested_;
  bool interrupted_ = false;
  std::string last_good_checkpoint_;  // the newest checkpoint of this run known to be valid (loaded or written)
  int64_t last_good_step_ = 0;        // the step it holds
  int lock_fd_ = -1;                  // <out_dir>/train.lock, flock'ed from prepare() to destruction
  Batch batch_;                       // the training batch, its buffers kept from step to step
  std::chrono::steady_clock::time_point epoch_start_;  // of the epoch in progress (less an earlier session's time)
};

}  // namespace orthoconv
