// What a training run prints for a person (llm.c's habit: a configuration table at the start, one fixed-width line
// per epoch; a progress bar redrawn in place only when the output is a terminal). Internal to the library; the
// machine-readable logs are metrics_files.hpp's.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "orthoconv/trainer.hpp"

namespace orthoconv {

// "1h05m" or "3m07s" ("?" for a negative or non-finite duration).
std::string format_duration(double seconds);

// The console of one Trainer::run: every call prints nothing when `log` is null.
class TrainingConsole {
 public:
  // total_steps: the run's iterations (for the ETA); the bar is drawn when `log` is a terminal's stdout.
  TrainingConsole(std::FILE* log, int64_t epochs, int64_t steps_per_epoch, int64_t total_steps);
  // The column titles of the epoch lines; `headline`: the eps numerator of the certified column.
  void print_header(int headline);
  void start_epoch();
  // After every training step of this session: a progress line (on a terminal the bar, redrawn at most every
  // 0.2 s; otherwise a line every 30 s, at every tenth of the epoch and at its end), with the ETA from this session's
  // steps per second.
  void show_step(int64_t epoch, const EpochProgress& progress, int64_t global_step, double lr);
  // Clears the bar (before an epoch line or a stop message), or ends its line (before an error): no-ops off a
  // terminal.
  void clear_bar();
  void end_bar();
  // One line per epoch: train, test (or dashes when not evaluated), time; the validation and a best mark.
  void print_epoch(const EpochMetrics& m, int headline, bool new_best);

 private:
  using Clock = std::chrono::steady_clock;
  std::FILE* log_;
  bool tty_;
  int64_t epochs_, steps_per_epoch_, total_steps_;
  Clock::time_point run_start_, last_print_;
  int64_t run_steps_ = 0;  // steps of this session
};

}  // namespace orthoconv
