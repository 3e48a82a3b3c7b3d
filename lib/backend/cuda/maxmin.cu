// MaxMin on the GPU, forward and backward side by side; the twin of the CPU loops in backend/cpu/elementwise.cpp.
// Plain: channel c pairs with c + n/2; paired: 2i with 2i + 1. The first of a pair receives the min, the second
// the max; ties (a == b) route the min's gradient to the first and the max's to the second, as on the CPU.
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernel_utils.cuh"

namespace orthoconv::cuda {

namespace {

// Element [b, pair, i] of the batch x (channels/2) x plane pairs: the offsets of its two channels.
__device__ inline void pair_offsets(int64_t index, int64_t half, int64_t channels, int64_t plane, bool paired,
                                    int64_t& first, int64_t& second) {
  const int64_t i = index % plane, c = (index / plane) % half, b = index / (plane * half);
  const int64_t ca = paired ? 2 * c : c, cb = paired ? 2 * c + 1 : c + half;
  first = (b * channels + ca) * plane + i;
  second = (b * channels + cb) * plane + i;
}

__global__ void maxmin_forward_kernel(const float* src, float* dst, int64_t batch, int64_t channels, int64_t plane,
                                      bool paired) {
  const int64_t half = channels / 2, count = batch * half * plane;
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) {
    int64_t a, b;
    pair_offsets(index, half, channels, plane, paired, a, b);
    const float x = src[a], y = src[b];
    dst[a] = y < x ? y : x;  // std::min / std::max, so NaN and signed zeros behave as on the CPU
    dst[b] = x < y ? y : x;
  }
}

__global__ void maxmin_backward_kernel(const float* src, const float* diff_dst, float* diff_src, int64_t batch,
                                       int64_t channels, int64_t plane, bool paired) {
  const int64_t half = channels / 2, count = batch * half * plane;
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) {
    int64_t a, b;
    pair_offsets(index, half, channels, plane, paired, a, b);
    const bool a_is_min = src[a] <= src[b];
    const float g_min = diff_dst[a], g_max = diff_dst[b];
    diff_src[a] = a_is_min ? g_min : g_max;
    diff_src[b] = a_is_min ? g_max : g_min;
  }
}

}  // namespace

void CudaBackend::maxmin_forward(const float* src, float* dst, int64_t batch, int64_t channels, int64_t plane,
                                 bool paired) {
  require<ShapeError>(channels % 2 == 0, "MaxMin needs an even channel count, got ", channels);
  const int64_t count = batch * (channels / 2) * plane;
  if (count <= 0) return;
  expect_device("maxmin_forward", src, dst);
  maxmin_forward_kernel<<<grid_for(count), kThreads, 0, stream()>>>(src, dst, batch, channels, plane, paired);
  ORTHOCONV_CUDA_LAUNCHED("maxmin_forward_kernel");
}

void CudaBackend::maxmin_backward(const float* src, const float* diff_dst, float* diff_src, int64_t batch,
                                  int64_t channels, int64_t plane, bool paired) {
  require<ShapeError>(channels % 2 == 0, "MaxMin needs an even channel count, got ", channels);
  const int64_t count = batch * (channels / 2) * plane;
  if (count <= 0) return;
  expect_device("maxmin_backward", src, diff_dst, diff_src);
  maxmin_backward_kernel<<<grid_for(count), kThreads, 0, stream()>>>(src, diff_dst, diff_src, batch, channels, plane,
                                                                     paired);
  ORTHOCONV_CUDA_LAUNCHED("maxmin_backward_kernel");
}

}  // namespace orthoconv::cuda
