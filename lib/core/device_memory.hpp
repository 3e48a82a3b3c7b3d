// Device memory for Tensor: 64-byte aligned host memory on the CPU, the CUDA arena on GPUs.
#pragma once

#include <cstdint>
#include <memory>

#include "orthoconv/tensor.hpp"

namespace orthoconv::detail {

std::shared_ptr<float> allocate_floats(Device device, int64_t count);
void zero_floats(Device device, float* data, int64_t count);
void copy_to_host(Device device, const float* src, float* host_dst, int64_t count);

// Set by the CUDA backend when it is built in (lib/backend/cuda); null otherwise.
struct CudaMemoryHooks {
  std::shared_ptr<float> (*allocate)(int64_t count) = nullptr;
  void (*zero)(float* data, int64_t count) = nullptr;
  void (*to_host)(const float* src, float* host_dst, int64_t count) = nullptr;
};
CudaMemoryHooks& cuda_memory_hooks();

}  // namespace orthoconv::detail
