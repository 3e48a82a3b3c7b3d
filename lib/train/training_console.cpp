// The trainer's console: configuration table, progress bar and epoch lines. See training_console.hpp.
#include "train/training_console.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "orthoconv/runtime.hpp"

namespace orthoconv {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = std::llround(seconds);
  char buf[64];
  if (s >= 3600)
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(s / 3600),
                  static_cast<long long>((s / 60) % 60));
  else
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  return buf;
}

TrainingConsole::TrainingConsole(std::FILE* log, int64_t epochs, int64_t steps_per_epoch, int64_t total_steps)
    : log_(log),
      tty_(log == stdout && ::isatty(::fileno(stdout))),
      epochs_(epochs),
      steps_per_epoch_(steps_per_epoch),
      total_steps_(total_steps),
      run_start_(Clock::now()),
      last_print_(run_start_) {}

void TrainingConsole::print_header(int headline) {
  if (!log_) return;
  std::fprintf(log_, "%-9s %-9s %-8s %-9s %-9s | %-9s %-9s %-9s %-8s | %-8s %-7s\n", "epoch", "step", "lr", "loss",
               "train_acc", "test_loss", "clean", ("cert" + std::to_string(headline)).c_str(), "radius", "seconds",
               "img/s");
  std::fflush(log_);
}

void TrainingConsole::start_epoch() { last_print_ = Clock::now(); }

void TrainingConsole::show_step(int64_t epoch, const EpochProgress& progress, int64_t global_step, double lr) {
  ++run_steps_;
  if (!log_) return;
  const auto now = Clock::now();
  const double elapsed = std::chrono::duration<double>(now - run_start_).count();
  const double per_step = elapsed / static_cast<double>(run_steps_);
  const double eta = per_step * static_cast<double>(total_steps_ - global_step);
  const bool periodic = progress.steps == steps_per_epoch_ ||
                        std::chrono::duration<double>(now - last_print_).count() >= (tty_ ? 0.2 : 30.0) ||
                        (!tty_ && steps_per_epoch_ >= 10 && progress.steps % (steps_per_epoch_ / 10) == 0);
  if (!periodic) return;
  last_print_ = now;
  char line[256];
  std::snprintf(line, sizeof(line), "  epoch %lld/%lld step %lld/%lld loss %.4f lr %.5f %.1f img/s ETA %s",
                static_cast<long long>(epoch) + 1, static_cast<long long>(epochs_),
                static_cast<long long>(progress.steps), static_cast<long long>(steps_per_epoch_),
                progress.loss_sum / static_cast<double>(progress.images), lr,
                static_cast<double>(progress.images) / std::max(progress.seconds, 1e-9), format_duration(eta).c_str());
  if (tty_) {
    const int width = 20;
    const int filled = static_cast<int>(width * progress.steps / std::max<int64_t>(steps_per_epoch_, 1));
    std::fprintf(log_, "\r[%s%s]%s\033[K", std::string(static_cast<size_t>(filled), '#').c_str(),
                 std::string(static_cast<size_t>(width - filled), '.').c_str(), line);
  } else {
    std::fprintf(log_, "%s\n", line);
  }
  std::fflush(log_);
}

void TrainingConsole::clear_bar() {
  if (tty_ && log_) std::fprintf(log_, "\r\033[K");
}

void TrainingConsole::end_bar() {
  if (tty_ && log_) std::fprintf(log_, "\n");
}

void TrainingConsole::print_epoch(const EpochMetrics& m, int headline, bool new_best) {
  if (!log_) return;
  char line[320];
  if (m.evaluated)
    std::snprintf(line, sizeof(line),
                  "%4lld/%-4lld %-9lld %-8.5f %-9.4f %-9.4f | %-9.4f %-9.4f %-9.4f %-8.4f | %-8.1f %-7.1f",
                  static_cast<long long>(m.epoch), static_cast<long long>(epochs_), static_cast<long long>(m.step),
                  m.lr, m.train_loss, m.train_accuracy, m.test_loss, m.test_accuracy, m.certified.at(headline),
                  m.mean_radius, m.seconds, m.images_per_second);
  else
    std::snprintf(line, sizeof(line), "%4lld/%-4lld %-9lld %-8.5f %-9.4f %-9.4f | %-9s %-9s %-9s %-8s | %-8.1f %-7.1f",
                  static_cast<long long>(m.epoch), static_cast<long long>(epochs_), static_cast<long long>(m.step),
                  m.lr, m.train_loss, m.train_accuracy, "-", "-", "-", "-", m.seconds, m.images_per_second);
  std::fprintf(log_, "%s", line);
  if (m.validated)
    std::fprintf(log_, "  val clean %.4f cert %.4f%s", m.val_accuracy, m.val_certified, new_best ? " (best)" : "");
  std::fprintf(log_, "\n");
  std::fflush(log_);
}

std::string Trainer::configuration_table() const {
  std::ostringstream out;
  auto row = [&](const std::string& key, const std::string& value) {
    char buf[512];
    std::snprintf(buf, sizeof(buf), "| %-22s | %-52s |\n", key.c_str(), value.c_str());
    out << buf;
  };
  auto num = [](double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%g", v);
    return std::string(buf);
  };
  const std::string rule = "+" + std::string(24, '-') + "+" + std::string(54, '-') + "+\n";
  out << rule;
  row("model", "LipConvnet-" + std::to_string(config_.model.depth) + " " + config_.model.conv_label());
  row("width / classes", std::to_string(config_.model.init_channels) + " / " + std::to_string(config_.model.classes));
  row("activation / head", activation_name(config_.model.activation) + " / " + head_name(config_.model.head));
  row("downsample keep", keep_name(config_.model.keep));
  row("series terms",
      std::to_string(config_.model.train_terms) + " train, " + std::to_string(config_.model.eval_terms) + " eval");
  row("parameters", model_ ? std::to_string(model_->parameter_count()) : "?");
  row("device / threads", device_name(config_.device) + " / " + std::to_string(thread_count()) +
                              (communicator_->size() > 1 ? " per rank" : ""));
  if (communicator_->size() > 1) {
    const Range part = batch_part(config_.batch_size, 0, communicator_->size());
    row("data parallel", std::to_string(communicator_->size()) + " ranks, " + std::to_string(part.size()) +
                             (config_.batch_size % communicator_->size() ? "+" : "") + " images each per batch");
    row("communication", communicator_->description());
  }
  row("precision",
      conv_precision_name(config_.precision) +
          (config_.precision == ConvPrecision::fp32 ? std::string() : " series convolutions in training, per shape"));
  row("data", config_.data_dir);
  row("train / val / test", std::to_string(train_indices_.size()) + " / " + std::to_string(val_indices_.size()) +
                                " / " + std::to_string(test_indices_.size()) + " images");
  row("epochs / batch", std::to_string(config_.epochs) + " / " + std::to_string(config_.batch_size));
  std::string ms;
  for (double m : config_.milestones) ms += (ms.empty() ? "" : ", ") + num(m * 100) + "%";
  row("optimizer",
      "SGD lr " + num(config_.lr) + ", momentum " + num(config_.momentum) + ", wd " + num(config_.weight_decay));
  row("lr schedule", "x" + num(config_.lr_decay) + " at " + ms + " of iterations");
  row("cert. regularization", config_.gamma > 0 ? "gamma " + num(config_.gamma) : "off");
  std::string eps;
  for (int e : config_.eps) eps += (eps.empty() ? "" : ", ") + std::to_string(e) + "/255";
  row("certify eps", eps + " (every " + std::to_string(config_.eval_every) + " epoch(s))");
  const auto& nm = config_.normalization;
  row("normalization", "mean " + num(nm.mean[0]) + "," + num(nm.mean[1]) + "," + num(nm.mean[2]) + " std " +
                           num(nm.std[0]) + "," + num(nm.std[1]) + "," + num(nm.std[2]));
  row("seed", std::to_string(config_.seed));
  row("output", config_.out_dir);
  out << rule;
  return out.str();
}

}  // namespace orthoconv
