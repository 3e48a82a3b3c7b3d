// Checks of a checkpoint's training state against the run that resumes it. Internal to the library.
#pragma once

#include <cstdint>
#include <string>

#include "orthoconv/trainer.hpp"

namespace orthoconv {

// IoError naming `file` unless every count of `state` follows from `steps_per_epoch` and `batch_size` (a state
// that disagrees was not written by this run): the steps in the epoch in progress, the step after the epochs done,
// every history line's step, the images of the epoch in progress.
void check_training_state(const TrainingState& state, int64_t steps_per_epoch, int64_t batch_size,
                          const std::string& file);

}  // namespace orthoconv
