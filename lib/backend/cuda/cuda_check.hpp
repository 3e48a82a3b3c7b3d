// Checking every CUDA runtime, cuDNN and cuBLAS call of the CUDA backend.
//
// A failure becomes orthoconv::BackendError naming the call, file:line and the vendor's error string, e.g.
//   "CUDA error at lib/backend/cuda/conv.cpp:120 in cudaMemcpyAsync(...): out of memory (cudaErrorMemoryAllocation)".
// Kernel launches are followed by ORTHOCONV_CUDA_LAUNCHED("name"), which checks cudaGetLastError (bad launch
// configurations); faults inside a kernel surface at the next checked call that synchronizes.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

namespace orthoconv::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t error, const char* call, const char* file, int line);
[[noreturn]] void throw_cudnn_error(cudnnStatus_t status, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line);

inline void check(cudaError_t error, const char* call, const char* file, int line) {
  if (error != cudaSuccess) throw_cuda_error(error, call, file, line);
}
inline void check(cudnnStatus_t status, const char* call, const char* file, int line) {
  if (status != CUDNN_STATUS_SUCCESS) throw_cudnn_error(status, call, file, line);
}
inline void check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(status, call, file, line);
}

}  // namespace orthoconv::cuda

#define ORTHOCONV_CUDA_CHECK(call) ::orthoconv::cuda::check((call), #call, __FILE__, __LINE__)
#define ORTHOCONV_CUDNN_CHECK(call) ::orthoconv::cuda::check((call), #call, __FILE__, __LINE__)
#define ORTHOCONV_CUBLAS_CHECK(call) ::orthoconv::cuda::check((call), #call, __FILE__, __LINE__)
#define ORTHOCONV_CUDA_LAUNCHED(kernel_name) \
  ::orthoconv::cuda::check(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
