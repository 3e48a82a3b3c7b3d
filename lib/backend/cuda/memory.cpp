// The CUDA backend's device, stream and caching arena (see memory.hpp), the CudaMemoryHooks through which
// Tensor(shape, Device::cuda) allocates, and the error reporting of cuda_check.hpp.
#include "backend/cuda/memory.hpp"

#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

#include "backend/cuda/cuda_check.hpp"
#include "core/device_memory.hpp"
#include "orthoconv/cuda_options.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv::cuda {

namespace {

// "lib/backend/cuda/conv.cpp" rather than the absolute path of the build machine.
const char* short_path(const char* file) {
  const char* lib = std::strstr(file, "lib/backend/");
  return lib != nullptr ? lib : file;
}

}  // namespace

void throw_cuda_error(cudaError_t error, const char* call, const char* file, int line) {
  (void)cudaGetLastError();  // clear a non-sticky error so that later calls report their own
  throw BackendError(detail::concat("CUDA error at ", short_path(file), ":", line, " in ", call, ": ",
                                    cudaGetErrorString(error), " (", cudaGetErrorName(error), ")"));
}

void throw_cudnn_error(cudnnStatus_t status, const char* call, const char* file, int line) {
  char detail_message[512] = {0};
  cudnnGetLastErrorString(detail_message, sizeof(detail_message));
  throw BackendError(detail::concat("cuDNN error at ", short_path(file), ":", line, " in ", call, ": ",
                                    cudnnGetErrorString(status), detail_message[0] != '\0' ? " - " : "",
                                    detail_message));
}

void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line) {
  throw BackendError(detail::concat("cuBLAS error at ", short_path(file), ":", line, " in ", call, ": ",
                                    cublasGetStatusName(status), " (", cublasGetStatusString(status), ")"));
}

bool device_present(std::string* why) {
  static std::string reason;
  static const bool present = [] {
    int count = 0;
    cudaError_t error = cudaGetDeviceCount(&count);
    if (error != cudaSuccess) {
      (void)cudaGetLastError();
      reason =
          detail::concat("cudaGetDeviceCount failed: ", cudaGetErrorString(error), " (", cudaGetErrorName(error), ")");
      return false;
    }
    if (count <= 0) {
      reason = "no CUDA device is visible";
      return false;
    }
    return true;
  }();
  if (!present && why != nullptr) *why = reason;
  return present;
}

namespace {

struct Context {
  int device = 0;
  cudaStream_t stream = nullptr;
};

Context& context() {
  // Never destroyed: work may be enqueued from static destructors of user objects.
  static Context* instance = [] {
    std::string why;
    if (!device_present(&why)) throw BackendError("the CUDA backend needs a GPU: " + why);
    auto* c = new Context;
    ORTHOCONV_CUDA_CHECK(cudaGetDevice(&c->device));
    // A blocking stream: work a user enqueues on the legacy default stream (a plain cudaMemcpy into a
    // Tensor's memory, say) stays ordered with orthoconv's.
    ORTHOCONV_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamDefault));
    return c;
  }();
  return *instance;
}

size_t rounded_size(size_t bytes) {
  constexpr size_t small_step = 512, large_step = size_t{1} << 20;
  if (bytes == 0) bytes = 1;
  if (bytes < large_step) return (bytes + small_step - 1) / small_step * small_step;
  return (bytes + large_step - 1) / large_step * large_step;
}

class Arena {
 public:
  void* allocate(size_t bytes) {
    const size_t size = rounded_size(bytes);
    cudaStream_t s = stream();  // creates the context (and throws without a device) before locking
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first <= 2 * size) {
      void* block = it->second;
      free_.erase(it);
      take(block_size_.at(block));
      return block;
    }
    void* block = nullptr;
    cudaError_t error = cudaMalloc(&block, size);
    if (error == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      release_cache(s);
      error = cudaMalloc(&block, size);
    }
    if (error != cudaSuccess) {
      (void)cudaGetLastError();
      throw BackendError(detail::concat("cudaMalloc of ", size >> 20, " MiB failed: ", cudaGetErrorString(error), " (",
                                        in_use_ >> 20, " MiB in use, ", reserved_ >> 20,
                                        " MiB reserved by orthoconv)"));
    }
    ++allocations_;
    reserved_ += size;
    block_size_[block] = size;
    take(size);
    return block;
  }

  void release(void* block) noexcept {
    if (block == nullptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = block_size_.find(block);
    if (it == block_size_.end()) return;  // not ours: nothing to do
    in_use_ -= it->second;
    free_.emplace(it->second, block);
  }

  CudaMemoryStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    CudaMemoryStats out;
    out.in_use_bytes = static_cast<int64_t>(in_use_);
    out.peak_bytes = static_cast<int64_t>(peak_);
    out.reserved_bytes = static_cast<int64_t>(reserved_);
    out.allocations = allocations_;
    return out;
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    peak_ = in_use_;
  }

 private:
  void take(size_t size) {
    in_use_ += size;
    if (in_use_ > peak_) peak_ = in_use_;
  }
  // Called with the lock held, after an allocation failed: waits for queued work, then frees every cached block.
  void release_cache(cudaStream_t s) {
    (void)cudaStreamSynchronize(s);
    for (auto& [size, block] : free_) {
      (void)cudaFree(block);
      block_size_.erase(block);
      reserved_ -= size;
    }
    free_.clear();
    (void)cudaGetLastError();
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;             // cached blocks by size
  std::unordered_map<void*, size_t> block_size_;  // every block from cudaMalloc, in use or cached
  size_t in_use_ = 0, peak_ = 0, reserved_ = 0;
  int64_t allocations_ = 0;
};

Arena& arena() {
  static Arena* instance = new Arena;  // never destroyed, see memory.hpp
  return *instance;
}

// ---- Tensor storage on Device::cuda (core/device_memory.hpp) ----
std::shared_ptr<float> allocate_tensor(int64_t count) {
  void* block = arena().allocate(static_cast<size_t>(count > 0 ? count : 1) * sizeof(float));
  return std::shared_ptr<float>(static_cast<float*>(block), [](float* p) { arena().release(p); });
}

void zero_tensor(float* data, int64_t count) {
  ORTHOCONV_CUDA_CHECK(cudaMemsetAsync(data, 0, static_cast<size_t>(count) * sizeof(float), stream()));
}

void tensor_to_host(const float* src, float* host_dst, int64_t count) {
  ORTHOCONV_CUDA_CHECK(
      cudaMemcpyAsync(host_dst, src, static_cast<size_t>(count) * sizeof(float), cudaMemcpyDeviceToHost, stream()));
  ORTHOCONV_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

// Registered when the library is loaded: Tensor(shape, Device::cuda) works before cuda_backend() is called
// (and throws BackendError "the CUDA backend needs a GPU: ..." on a machine without one).
[[maybe_unused]] const bool hooks_registered = [] {
  auto& hooks = detail::cuda_memory_hooks();
  hooks.allocate = &allocate_tensor;
  hooks.zero = &zero_tensor;
  hooks.to_host = &tensor_to_host;
  return true;
}();

}  // namespace

cudaStream_t stream() { return context().stream; }

void expect_device_pointer(const void* pointer, const char* what) {
  if (pointer == nullptr) return;
  cudaPointerAttributes attributes{};
  const cudaError_t error = cudaPointerGetAttributes(&attributes, pointer);
  if (error != cudaSuccess) (void)cudaGetLastError();
  if (error != cudaSuccess || (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged))
    throw BackendError(detail::concat("CUDA backend, ", what, ": argument ", pointer,
                                      " is not GPU memory (a Tensor on Device::cpu handed to the CUDA backend?)"));
}

void* device_allocate(size_t bytes) { return arena().allocate(bytes); }

void device_release(void* pointer) noexcept { arena().release(pointer); }

}  // namespace orthoconv::cuda

namespace orthoconv {

CudaMemoryStats cuda_memory_stats() { return cuda::arena().stats(); }
void reset_cuda_peak_memory() { cuda::arena().reset_peak(); }

}  // namespace orthoconv
