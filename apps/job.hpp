// The data-parallel job a command runs in (include/orthoconv/communicator.hpp): `orthoconv train`, `certify` and
// `bench train` started by mpirun / srun join it; started plainly they are the single-process program.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include "orthoconv/communicator.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/runtime.hpp"

namespace orthoconv::apps {

// Joins the job: MPI starts here, before any input is read, so that a rank's failure can end the job. With several
// ranks on one machine and no --threads (0), OpenMP's default would give every rank every processor: each rank
// then takes its share, processors / local ranks (at least 1), unless the launcher already bound it to fewer
// processors than the machine has (mpirun's default --bind-to core: OpenMP's default is then the binding's) or
// OMP_NUM_THREADS is set.
inline std::shared_ptr<Communicator> join_job(int threads) {
  std::shared_ptr<Communicator> job = world_communicator();
  const int machine = static_cast<int>(std::thread::hardware_concurrency());
  if (threads == 0 && std::getenv("OMP_NUM_THREADS") == nullptr && job->local_size() > 1 &&
      max_thread_count() >= machine)
    set_thread_count(std::max(1, max_thread_count() / job->local_size()));
  return job;
}

// For --device cuda with several ranks: each rank of a machine takes its own GPU. Call it once the device is known
// (train --resume takes it from the run's config.json) and before the CUDA backend's first use.
inline void use_local_gpu(const Communicator& job, const std::string& device) {
  if (job.size() > 1 && device == "cuda") select_local_gpu(job);
}

}  // namespace orthoconv::apps
