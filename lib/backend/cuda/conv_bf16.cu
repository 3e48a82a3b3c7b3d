// The bf16 side of the CUDA convolutions (conv.cpp): float32 -> bf16 rounding of conv inputs and weights (round to
// nearest even, as the CPU's to_conv_input), exact widening of bf16 backward-weights inputs, and the float32
// epilogue of a bf16 forward result. Elementwise grid-stride kernels on the backend's stream.
#include <cuda_bf16.h>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernel_utils.cuh"

namespace orthoconv::cuda {

namespace {

__global__ void round_kernel(const float* src, __nv_bfloat16* dst, int64_t count) {
  ORTHOCONV_GRID_STRIDE_LOOP(i, count) dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void widen_kernel(const __nv_bfloat16* src, float* dst, int64_t count) {
  ORTHOCONV_GRID_STRIDE_LOOP(i, count) dst[i] = __bfloat162float(src[i]);
}

// dst = alpha * result + (addend ? addend : 0), or dst += result when accumulating; float32 arithmetic.
__global__ void epilogue_kernel(const __nv_bfloat16* result, float alpha, const float* addend, bool accumulate,
                                float* dst, int64_t count) {
  ORTHOCONV_GRID_STRIDE_LOOP(i, count) {
    const float r = alpha * __bfloat162float(result[i]);
    dst[i] = accumulate ? dst[i] + r : addend ? addend[i] + r : r;
  }
}

}  // namespace

void CudaBackend::round_to_bf16(const float* src, void* dst, int64_t count) {
  if (count <= 0) return;
  round_kernel<<<grid_for(count), kThreads, 0, stream()>>>(src, static_cast<__nv_bfloat16*>(dst), count);
  ORTHOCONV_CUDA_LAUNCHED("round_kernel");
}

void CudaBackend::widen_bf16(const void* src, float* dst, int64_t count) {
  if (count <= 0) return;
  widen_kernel<<<grid_for(count), kThreads, 0, stream()>>>(static_cast<const __nv_bfloat16*>(src), dst, count);
  ORTHOCONV_CUDA_LAUNCHED("widen_kernel");
}

void CudaBackend::bf16_epilogue(const void* result, float alpha, const float* addend, bool accumulate, float* dst,
                                int64_t count) {
  if (count <= 0) return;
  epilogue_kernel<<<grid_for(count), kThreads, 0, stream()>>>(static_cast<const __nv_bfloat16*>(result), alpha, addend,
                                                              accumulate, dst, count);
  ORTHOCONV_CUDA_LAUNCHED("epilogue_kernel");
}

}  // namespace orthoconv::cuda
