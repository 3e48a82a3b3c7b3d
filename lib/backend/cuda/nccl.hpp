// NCCL for the data-parallel all-reduce of CUDA device memory (orthoconv/communicator.hpp), built with the CUDA
// backend when the toolkit has NCCL (ORTHOCONV_WITH_NCCL). No CUDA or NCCL types in this interface: the MPI
// communicator (lib/distributed) includes it without the toolkit's headers.
//
// Set-up, as llm.c does it: rank 0 makes a unique id (nccl_unique_id), MPI broadcasts it, every rank then joins
// with NcclCommunicator(id, ranks, rank) (a collective: every rank constructs it at the same point). Reductions run
// on the CUDA backend's stream (memory.hpp), so they are ordered with the backend's own work without any wait.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace orthoconv::cuda {

constexpr size_t kNcclIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES

// ncclGetUniqueId: kNcclIdBytes opaque bytes. BackendError on failure.
std::vector<unsigned char> nccl_unique_id();
// NCCL's version, "2.27.7".
const char* nccl_version();

class NcclCommunicator {
 public:
  // ncclCommInitRank on the current device. BackendError on failure.
  NcclCommunicator(const std::vector<unsigned char>& id, int ranks, int rank);
  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  // In place, on the backend's stream: data[i] = sum over the ranks (device memory).
  void allreduce_sum(float* data, int64_t count);

 private:
  void* comm_ = nullptr;  // ncclComm_t
};

// Makes GPU local_rank % (device count) current for this process, before the CUDA backend's first use (it keeps
// the device current then). BackendError without a device.
void select_device(int local_rank);

}  // namespace orthoconv::cuda
