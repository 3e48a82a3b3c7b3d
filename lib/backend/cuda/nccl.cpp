// NCCL all-reduce of device memory for data-parallel training. See nccl.hpp.
#ifdef ORTHOCONV_WITH_NCCL

#include "backend/cuda/nccl.hpp"

#include <nccl.h>

#include <cstring>
#include <string>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/memory.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv::cuda {

namespace {

static_assert(NCCL_UNIQUE_ID_BYTES == kNcclIdBytes, "nccl.hpp's id size must be NCCL's");

void check_nccl(ncclResult_t result, const char* call) {
  if (result != ncclSuccess)
    throw BackendError(
        detail::concat("NCCL error in ", call, ": ", ncclGetErrorString(result), " (", static_cast<int>(result), ")"));
}

}  // namespace

std::vector<unsigned char> nccl_unique_id() {
  ncclUniqueId id;
  check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  std::vector<unsigned char> out(kNcclIdBytes);
  std::memcpy(out.data(), id.internal, kNcclIdBytes);
  return out;
}

const char* nccl_version() {
  static const std::string text = [] {
    int code = 0;
    if (ncclGetVersion(&code) != ncclSuccess) return std::string("?");
    // NCCL >= 2.9: major * 10000 + minor * 100 + patch.
    return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
  }();
  return text.c_str();
}

NcclCommunicator::NcclCommunicator(const std::vector<unsigned char>& id, int ranks, int rank) {
  require<BackendError>(id.size() == kNcclIdBytes, "NCCL unique id of ", id.size(), " bytes, expected ", kNcclIdBytes);
  (void)stream();  // the backend's device and stream first (throws without a device)
  ncclUniqueId unique;
  std::memcpy(unique.internal, id.data(), kNcclIdBytes);
  ncclComm_t comm = nullptr;
  check_nccl(ncclCommInitRank(&comm, ranks, unique, rank), "ncclCommInitRank");
  comm_ = comm;
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_) ncclCommDestroy(static_cast<ncclComm_t>(comm_));
}

void NcclCommunicator::allreduce_sum(float* data, int64_t count) {
  if (count <= 0) return;
  check_nccl(ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat, ncclSum, static_cast<ncclComm_t>(comm_),
                           stream()),
             "ncclAllReduce");
}

void select_device(int local_rank) {
  std::string why;
  require<BackendError>(device_present(&why), "no CUDA device for rank ", local_rank, " of this machine: ", why);
  int count = 0;
  ORTHOCONV_CUDA_CHECK(cudaGetDeviceCount(&count));
  ORTHOCONV_CUDA_CHECK(cudaSetDevice(local_rank % count));
}

}  // namespace orthoconv::cuda

#endif  // ORTHOCONV_WITH_NCCL
