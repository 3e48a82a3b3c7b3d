// Elementwise, channel and reduction primitives of the CUDA backend: fill, axpby, weighted sums, channel copy and
// permutation, pixel-unshuffle, bias and its gradient. One grid-stride kernel each; the twin of
// backend/cpu/elementwise.cpp.
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernel_utils.cuh"

namespace orthoconv::cuda {

namespace {

__global__ void fill_kernel(float* dst, int64_t count, float value) {
  ORTHOCONV_GRID_STRIDE_LOOP(i, count) dst[i] = value;
}

// beta == 0 never reads y (it may hold NaN or garbage), as on the CPU.
__global__ void axpby_kernel(float alpha, const float* x, float beta, float* y, int64_t count) {
  if (beta == 0.0f) {
    ORTHOCONV_GRID_STRIDE_LOOP(i, count) y[i] = alpha * x[i];
  } else if (beta == 1.0f) {
    ORTHOCONV_GRID_STRIDE_LOOP(i, count) y[i] += alpha * x[i];
  } else {
    ORTHOCONV_GRID_STRIDE_LOOP(i, count) y[i] = alpha * x[i] + beta * y[i];
  }
}

// dst = (accumulate ? dst : 0) + sum_s scale[s] * source[s], in the order of the sources (as the CPU's passes).
constexpr int kSumInputs = 16;
struct SumInputs {
  const float* source[kSumInputs];
  float scale[kSumInputs];
};

__global__ void weighted_sum_kernel(SumInputs inputs, int count_inputs, bool accumulate, float* dst, int64_t count) {
  ORTHOCONV_GRID_STRIDE_LOOP(i, count) {
    float sum = accumulate ? dst[i] : inputs.scale[0] * inputs.source[0][i];
    for (int s = accumulate ? 0 : 1; s < count_inputs; ++s) sum += inputs.scale[s] * inputs.source[s][i];
    dst[i] = sum;
  }
}

// Over dst elements [b, c, i]: c < common copies (or adds) src[b, c, i]; beyond, zero unless accumulating.
__global__ void copy_channels_kernel(const float* src, int64_t src_channels, float* dst, int64_t dst_channels,
                                     int64_t batch, int64_t plane, bool accumulate) {
  const int64_t common = src_channels < dst_channels ? src_channels : dst_channels;
  const int64_t count = batch * dst_channels * plane;
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) {
    const int64_t i = index % plane, c = (index / plane) % dst_channels, b = index / (plane * dst_channels);
    if (c < common) {
      const float value = src[(b * src_channels + c) * plane + i];
      if (accumulate)
        dst[index] += value;
      else
        dst[index] = value;
    } else if (!accumulate) {
      dst[index] = 0.0f;
    }
  }
}

// The permutation travels as a kernel parameter, kPermutationChunk channels per launch.
constexpr int kPermutationChunk = 512;
struct PermutationChunk {
  int32_t destination[kPermutationChunk];
};

// Over src elements [b, first + c, i] for c < chunk_channels: dst[b, destination[c], i] = src[b, first + c, i].
__global__ void permute_channels_kernel(const float* src, float* dst, PermutationChunk chunk, int64_t first,
                                        int64_t chunk_channels, int64_t batch, int64_t channels, int64_t plane) {
  const int64_t count = batch * chunk_channels * plane;
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) {
    const int64_t i = index % plane, c = (index / plane) % chunk_channels, b = index / (plane * chunk_channels);
    dst[(b * channels + chunk.destination[c]) * plane + i] = src[(b * channels + first + c) * plane + i];
  }
}

// Over the small side [b, c*s*s + s*p + q, i, j] <-> big side [b, c, s*i + p, s*j + q].
__global__ void pixel_unshuffle_kernel(const float* src, float* dst, int64_t batch, int64_t channels, int64_t height,
                                       int64_t width, int64_t stride, bool inverse) {
  const int64_t oh = height / stride, ow = width / stride, oc_count = channels * stride * stride;
  const int64_t count = batch * oc_count * oh * ow;
  ORTHOCONV_GRID_STRIDE_LOOP(small, count) {
    const int64_t j = small % ow, i = (small / ow) % oh, oc = (small / (ow * oh)) % oc_count,
                  b = small / (ow * oh * oc_count);
    const int64_t c = oc / (stride * stride), p = (oc / stride) % stride, q = oc % stride;
    const int64_t big = ((b * channels + c) * height + stride * i + p) * width + stride * j + q;
    if (inverse)
      dst[big] = src[small];
    else
      dst[small] = src[big];
  }
}

__global__ void add_bias_kernel(float* dst, const float* bias, int64_t batch, int64_t channels, int64_t plane) {
  const int64_t count = batch * channels * plane;
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) dst[index] += bias[(index / plane) % channels];
}

// One block per channel, summing batch x plane in double (deterministic: no atomics).
__global__ void bias_backward_kernel(const float* diff_dst, float* diff_bias, int64_t batch, int64_t channels,
                                     int64_t plane) {
  const int64_t c = blockIdx.x;
  double sum = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    const float* d = diff_dst + (b * channels + c) * plane;
    for (int64_t i = threadIdx.x; i < plane; i += blockDim.x) sum += d[i];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) diff_bias[c] += static_cast<float>(sum);
}

}  // namespace

void CudaBackend::fill(float* dst, int64_t count, float value) {
  if (count <= 0) return;
  expect_device("fill", dst);
  fill_kernel<<<grid_for(count), kThreads, 0, stream()>>>(dst, count, value);
  ORTHOCONV_CUDA_LAUNCHED("fill_kernel");
}

void CudaBackend::axpby(float alpha, const float* x, float beta, float* y, int64_t count) {
  if (count <= 0) return;
  expect_device("axpby", x, y);
  axpby_kernel<<<grid_for(count), kThreads, 0, stream()>>>(alpha, x, beta, y, count);
  ORTHOCONV_CUDA_LAUNCHED("axpby_kernel");
}

void CudaBackend::weighted_sum(const float* const* sources, const float* scales, int inputs, float* dst,
                               int64_t count) {
  require(inputs >= 1, "weighted_sum needs at least one source, got ", inputs);
  if (count <= 0) return;
  for (int first = 0; first < inputs; first += kSumInputs) {
    const int n = std::min(kSumInputs, inputs - first);
    SumInputs chunk{};
    for (int s = 0; s < n; ++s) {
      require<ShapeError>(sources[first + s] != dst, "weighted_sum: dst must alias no source");
      expect_device("weighted_sum", sources[first + s]);
      chunk.source[s] = sources[first + s];
      chunk.scale[s] = scales[first + s];
    }
    expect_device("weighted_sum", dst);
    weighted_sum_kernel<<<grid_for(count), kThreads, 0, stream()>>>(chunk, n, first > 0, dst, count);
    ORTHOCONV_CUDA_LAUNCHED("weighted_sum_kernel");
  }
}

void CudaBackend::copy_channels(const float* src, int64_t src_channels, float* dst, int64_t dst_channels, int64_t batch,
                                int64_t plane, bool accumulate) {
  const int64_t count = batch * dst_channels * plane;
  if (count <= 0) return;
  expect_device("copy_channels", src, dst);
  copy_channels_kernel<<<grid_for(count), kThreads, 0, stream()>>>(src, src_channels, dst, dst_channels, batch, plane,
                                                                   accumulate);
  ORTHOCONV_CUDA_LAUNCHED("copy_channels_kernel");
}

void CudaBackend::permute_channels(const float* src, float* dst, const int32_t* destination, int64_t batch,
                                   int64_t channels, int64_t plane) {
  require<ShapeError>(src != dst, "permute_channels cannot run in place");
  expect_device("permute_channels", src, dst);
  for (int64_t first = 0; first < channels; first += kPermutationChunk) {
    const int64_t chunk_channels = std::min<int64_t>(kPermutationChunk, channels - first);
    PermutationChunk chunk{};
    for (int64_t c = 0; c < chunk_channels; ++c) {
      const int32_t to = destination[first + c];
      require<ShapeError>(to >= 0 && to < channels, "permute_channels: destination ", to, " of channel ", first + c,
                          " is outside [0, ", channels, ")");
      chunk.destination[c] = to;
    }
    const int64_t count = batch * chunk_channels * plane;
    if (count <= 0) continue;
    permute_channels_kernel<<<grid_for(count), kThreads, 0, stream()>>>(src, dst, chunk, first, chunk_channels, batch,
                                                                        channels, plane);
    ORTHOCONV_CUDA_LAUNCHED("permute_channels_kernel");
  }
}

void CudaBackend::pixel_unshuffle(const float* src, float* dst, int64_t batch, int64_t channels, int64_t height,
                                  int64_t width, int64_t stride, bool inverse) {
  require<ShapeError>(stride > 0 && height % stride == 0 && width % stride == 0, "pixel_unshuffle: stride ", stride,
                      " must divide ", height, "x", width);
  const int64_t count = batch * channels * height * width;
  if (count <= 0) return;
  expect_device("pixel_unshuffle", src, dst);
  pixel_unshuffle_kernel<<<grid_for(count), kThreads, 0, stream()>>>(src, dst, batch, channels, height, width, stride,
                                                                     inverse);
  ORTHOCONV_CUDA_LAUNCHED("pixel_unshuffle_kernel");
}

void CudaBackend::add_bias(float* dst, const float* bias, int64_t batch, int64_t channels, int64_t plane) {
  const int64_t count = batch * channels * plane;
  if (count <= 0) return;
  expect_device("add_bias", dst, bias);
  add_bias_kernel<<<grid_for(count), kThreads, 0, stream()>>>(dst, bias, batch, channels, plane);
  ORTHOCONV_CUDA_LAUNCHED("add_bias_kernel");
}

void CudaBackend::bias_backward(const float* diff_dst, float* diff_bias, int64_t batch, int64_t channels,
                                int64_t plane) {
  if (channels <= 0) return;
  expect_device("bias_backward", diff_dst, diff_bias);
  require<ShapeError>(channels <= INT32_MAX, "bias_backward: ", channels, " channels is too many");
  bias_backward_kernel<<<static_cast<unsigned>(channels), kThreads, 0, stream()>>>(diff_dst, diff_bias, batch, channels,
                                                                                   plane);
  ORTHOCONV_CUDA_LAUNCHED("bias_backward_kernel");
}

}  // namespace orthoconv::cuda
