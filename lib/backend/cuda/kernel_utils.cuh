// Launch shapes and block reductions shared by the CUDA backend's kernels (included by the .cu files only).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace orthoconv::cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `count` elements: enough to fill the GPU, never more than needed.
inline unsigned grid_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 32768));
}

#define ORTHOCONV_GRID_STRIDE_LOOP(index, count)                                                     \
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < (count); \
       index += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0. Ends with a
// barrier, so it may be called again in the same kernel.
__device__ inline double block_sum(double value) {
  __shared__ double warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  return value;
}

}  // namespace orthoconv::cuda
