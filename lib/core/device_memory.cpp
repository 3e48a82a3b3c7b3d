#include "core/device_memory.hpp"

#include <cstdlib>
#include <cstring>

namespace orthoconv::detail {

CudaMemoryHooks& cuda_memory_hooks() {
  static CudaMemoryHooks hooks;
  return hooks;
}

std::shared_ptr<float> allocate_floats(Device device, int64_t count) {
  require<ShapeError>(count >= 0, "negative allocation of ", count, " floats");
  if (device == Device::cuda) {
    auto& hooks = cuda_memory_hooks();
    require<BackendError>(hooks.allocate != nullptr, "this build of orthoconv has no CUDA backend");
    return hooks.allocate(count);
  }
  size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(float);
  bytes = (bytes + 63) / 64 * 64;
  void* data = std::aligned_alloc(64, bytes);
  if (data == nullptr) throw Error(detail::concat("out of host memory allocating ", bytes, " bytes"));
  return std::shared_ptr<float>(static_cast<float*>(data), [](float* p) { std::free(p); });
}

void zero_floats(Device device, float* data, int64_t count) {
  if (count <= 0) return;
  if (device == Device::cuda) {
    cuda_memory_hooks().zero(data, count);
    return;
  }
  std::memset(data, 0, static_cast<size_t>(count) * sizeof(float));
}

void copy_to_host(Device device, const float* src, float* host_dst, int64_t count) {
  if (count <= 0) return;
  if (device == Device::cuda) {
    cuda_memory_hooks().to_host(src, host_dst, count);
    return;
  }
  std::memcpy(host_dst, src, static_cast<size_t>(count) * sizeof(float));
}

}  // namespace orthoconv::detail
