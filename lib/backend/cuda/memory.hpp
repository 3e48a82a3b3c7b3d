// Device, stream and memory of the CUDA backend.
//
// Every CUDA operation of orthoconv runs on ONE stream of one device (the device current when the backend is
// first used; a blocking stream, so ordered with the legacy default stream too), so work is ordered without
// events: a buffer released by the host can be handed out again at
// once, because whatever the next owner enqueues runs after what the last owner enqueued.
//
// Memory: a caching arena over plain cudaMalloc (never managed memory). Released blocks are kept, by size, and
// handed out again for requests up to half their size, so a training loop that asks for the same buffers every
// step reaches a steady state with no cudaMalloc at all. When cudaMalloc fails the cache is freed and the call
// retried once; then BackendError. The arena is never destroyed (tensors may outlive static destructors), and
// releasing a block never calls CUDA, so freeing at process exit is safe.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace orthoconv::cuda {

// cudaGetDeviceCount succeeded with at least one device; never throws. `why` gets the reason when not.
bool device_present(std::string* why = nullptr);
// The stream all work runs on (created on first use; throws BackendError without a device).
cudaStream_t stream();

// Throws BackendError unless `pointer` (non-null) is device (or managed) memory; `what` names the operation.
void expect_device_pointer(const void* pointer, const char* what);

void* device_allocate(size_t bytes);
void device_release(void* pointer) noexcept;

// A backend-owned device buffer that only grows (no allocation once it is large enough).
class DeviceScratch {
 public:
  DeviceScratch() = default;
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() { device_release(data_); }
  void* reserve(size_t bytes) {
    if (bytes > size_) {
      device_release(data_);
      data_ = nullptr;
      data_ = device_allocate(bytes);
      size_ = bytes;
    }
    return data_;
  }
  template <typename T>
  T* as(int64_t count) {
    return static_cast<T*>(reserve(static_cast<size_t>(count > 0 ? count : 1) * sizeof(T)));
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace orthoconv::cuda
