// The trainer's checkpoints: what last.safetensors and best.safetensors hold (the model, the optimizer and the
// run's train.* state), and a resume from one, checked against this run. See include/orthoconv/trainer.hpp.
#include "orthoconv/model_state.hpp"
#include "orthoconv/trainer.hpp"
#include "train/training_state.hpp"

namespace orthoconv {

void Trainer::load(const std::string& path) {
  Checkpoint c = load_checkpoint(path);
  model_config_from_checkpoint(c, path);  // the format, and every architecture field valid and agreeing
  TrainingState state = read_training_state(c, path);
  // The data order and the schedule must be the ones the run started with.
  const TrainConfig& saved = state.config;
  auto same = [&](bool equal, const std::string& setting, const std::string& was) {
    require_setting(equal, {"resume", setting}, "{0}: {1} differs from the checkpoint's (", was,
                    "); a resumed run must keep it to continue exactly");
  };
  same(saved.seed == config_.seed, "seed", std::to_string(saved.seed));
  same(saved.batch_size == config_.batch_size, "batch", std::to_string(saved.batch_size));
  same(saved.train_subset == config_.train_subset, "train_subset", std::to_string(saved.train_subset));
  same(saved.val_split == config_.val_split, "val_split", std::to_string(saved.val_split));
  same(saved.precision == config_.precision, "precision", conv_precision_name(saved.precision));
  // Every count follows from the steps per epoch: a state that disagrees was not written by this run.
  check_training_state(state, steps_per_epoch(), config_.batch_size, path);
  read_model_state(c, path, *model_);
  sgd_->load(c, path);
  if (sgd_->steps() != state.step)
    throw IoError("checkpoint " + path + ": inconsistent training state: optimizer.steps " +
                  std::to_string(sgd_->steps()) + " but train.step " + std::to_string(state.step) + " (" +
                  std::to_string(steps_per_epoch()) + " steps per epoch)");
  epochs_done_ = state.epochs_done;
  global_step_ = state.step;
  progress_ = state.progress;
  best_metric_ = state.best_metric;
  best_epoch_ = state.best_epoch;
  history_ = std::move(state.history);
  last_good_checkpoint_ = path;
  last_good_step_ = global_step_;
}

TrainingState Trainer::training_state() const {
  TrainingState state;
  state.config = config_;
  state.epochs_done = epochs_done_;
  state.step = global_step_;
  state.progress = progress_;
  state.best_metric = best_metric_;
  state.best_epoch = best_epoch_;
  state.history = history_;
  return state;
}

void Trainer::save(const std::string& path) {
  Checkpoint c;
  write_model_state(*model_, config_.normalization, c);
  sgd_->save(c);
  write_training_state(training_state(), c);
  save_checkpoint(path, c);
  last_good_checkpoint_ = path;
  last_good_step_ = global_step_;
}

}  // namespace orthoconv
