// The output directory of a training run: created, writable, locked by one trainer, cleaned of the temporaries an
// interrupted save left, and never holding another run. Internal to the library; see include/orthoconv/trainer.hpp.
#pragma once

#include <cstdio>
#include <string>

namespace orthoconv {

// Prepares `out_dir` for a run (resume_from: the checkpoint the run continues, "" for a new run) and returns the
// descriptor of <out_dir>/train.lock, flock'ed (closing it releases the lock). IoError when the directory cannot be
// created or written, another trainer holds it, or it holds a run (last.safetensors) other than resume_from.
// Each stale temporary removed is reported on `log` (null: silent).
int open_run_directory(const std::string& out_dir, const std::string& resume_from, std::FILE* log);

}  // namespace orthoconv
