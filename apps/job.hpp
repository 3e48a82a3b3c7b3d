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

// Joins the job (MPI starts here, before any input is read, so that a rank's failure can end the job) and, for
// --device cuda with several ranks, gives each rank of a machine its own GPU. With several ranks on one machine
// and no --threads (0), OpenMP's default would give every rank every processor: each rank then takes its share,
// processors / local ranks (at least 1), unless the launcher already bound it to fewer processors than the
// machine has (mpirun's default --bind-to core: OpenMP's default is then the binding's).
inline std::shared_ptr<Communicator> join_job(const std::string& device, int threads) {
  std::shared_ptr<Communicator> job = world_communicator();
  if (job->size() > 1 && device == "cuda") select_local_gpu(*job);
  const int machine = static_cast<int>(std::thread::hardware_concurrency());
  if (threads == 0 && std::getenv("OMP_NUM_THREADS") == nullptr && job->local_size() > 1 &&
      max_thread_count() >= machine)
    set_thread_count(std::max(1, max_thread_count() / job->local_size()));
  return job;
}

}  // namespace orthoconv::apps
