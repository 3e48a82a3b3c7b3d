// Elementwise, channel and reduction primitives of the CPU backend: plain loops, parallel over OpenMP.
// Memory-bound passes: each is split in blocks that stay in L1/L2 and, where several inputs meet
// (weighted_sum), every input is read once.
#include <algorithm>
#include <cstring>

#include "backend/cpu/cpu_backend.hpp"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define ORTHOCONV_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ORTHOCONV_SIMD_CLONES
#endif

namespace orthoconv::cpu {

namespace {

// Below this many floats a pass runs on one thread: the work is shorter than waking the OpenMP team (and on a
// busy machine a descheduled team member can cost a whole scheduler tick).
constexpr int64_t kParallelFloats = int64_t{1} << 18;
constexpr int64_t kBlock = 8192;  // floats per block of the elementwise passes (32 KB)

ORTHOCONV_SIMD_CLONES
void scaled_block(float alpha, const float* x, float* y, int64_t n, bool accumulate) {
  if (accumulate)
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
  else
    for (int64_t i = 0; i < n; ++i) y[i] = alpha * x[i];
}

ORTHOCONV_SIMD_CLONES
float plane_sum(const float* x, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum;
}

}  // namespace

void CpuBackend::fill(float* dst, int64_t count, float value) {
#pragma omp parallel for schedule(static) if (count > kParallelFloats)
  for (int64_t i = 0; i < count; ++i) dst[i] = value;
}

void CpuBackend::copy(const float* src, float* dst, int64_t count) {
  if (src == dst || count <= 0) return;
  if (count <= kParallelFloats) {
    std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
    return;
  }
  const int64_t blocks = (count + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock, n = std::min(kBlock, count - start);
    std::memcpy(dst + start, src + start, static_cast<size_t>(n) * sizeof(float));
  }
}

void CpuBackend::weighted_sum(const float* const* sources, const float* scales, int inputs, float* dst, int64_t count) {
  require(inputs >= 1, "weighted_sum needs at least one source, got ", inputs);
  const int64_t blocks = (count + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (count > kParallelFloats)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock, n = std::min(kBlock, count - start);
    scaled_block(scales[0], sources[0] + start, dst + start, n, false);
    for (int i = 1; i < inputs; ++i) scaled_block(scales[i], sources[i] + start, dst + start, n, true);
  }
}

void CpuBackend::axpby(float alpha, const float* x, float beta, float* y, int64_t count) {
  // NOLINTNEXTLINE(bugprone-branch-clone): the three loops differ; clang-tidy 14 sees OpenMP's captured statements
  if (beta == 0.0f) {
#pragma omp parallel for schedule(static) if (count > kParallelFloats)
    for (int64_t i = 0; i < count; ++i) y[i] = alpha * x[i];
  } else if (beta == 1.0f) {
#pragma omp parallel for schedule(static) if (count > kParallelFloats)
    for (int64_t i = 0; i < count; ++i) y[i] += alpha * x[i];
  } else {
#pragma omp parallel for schedule(static) if (count > kParallelFloats)
    for (int64_t i = 0; i < count; ++i) y[i] = alpha * x[i] + beta * y[i];
  }
}

void CpuBackend::copy_channels(const float* src, int64_t src_channels, float* dst, int64_t dst_channels, int64_t batch,
                               int64_t plane, bool accumulate) {
  int64_t common = std::min(src_channels, dst_channels);
#pragma omp parallel for schedule(static) if (batch * dst_channels * plane > kParallelFloats)
  for (int64_t b = 0; b < batch; ++b) {
    const float* s = src + b * src_channels * plane;
    float* d = dst + b * dst_channels * plane;
    if (accumulate) {
      for (int64_t i = 0; i < common * plane; ++i) d[i] += s[i];
    } else {
      std::memcpy(d, s, static_cast<size_t>(common * plane) * sizeof(float));
      std::memset(d + common * plane, 0, static_cast<size_t>((dst_channels - common) * plane) * sizeof(float));
    }
  }
}

void CpuBackend::permute_channels(const float* src, float* dst, const int32_t* destination, int64_t batch,
                                  int64_t channels, int64_t plane) {
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * plane > kParallelFloats)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      std::memcpy(dst + (b * channels + destination[c]) * plane, src + (b * channels + c) * plane,
                  static_cast<size_t>(plane) * sizeof(float));
}

void CpuBackend::pixel_unshuffle(const float* src, float* dst, int64_t batch, int64_t channels, int64_t height,
                                 int64_t width, int64_t stride, bool inverse) {
  int64_t oh = height / stride, ow = width / stride;
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * height * width > kParallelFloats)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t p = 0; p < stride; ++p)
        for (int64_t q = 0; q < stride; ++q) {
          int64_t oc = c * stride * stride + p * stride + q;
          for (int64_t i = 0; i < oh; ++i)
            for (int64_t j = 0; j < ow; ++j) {
              int64_t big = ((b * channels + c) * height + stride * i + p) * width + stride * j + q;
              int64_t small = ((b * channels * stride * stride + oc) * oh + i) * ow + j;
              if (inverse)
                dst[big] = src[small];
              else
                dst[small] = src[big];
            }
        }
}

void CpuBackend::maxmin_forward(const float* src, float* dst, int64_t batch, int64_t channels, int64_t plane,
                                bool paired) {
  int64_t half = channels / 2;
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * plane > kParallelFloats)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < half; ++c) {
      int64_t ca = paired ? 2 * c : c, cb = paired ? 2 * c + 1 : c + half;
      const float* a = src + (b * channels + ca) * plane;
      const float* bb = src + (b * channels + cb) * plane;
      float* lo = dst + (b * channels + ca) * plane;
      float* hi = dst + (b * channels + cb) * plane;
      for (int64_t i = 0; i < plane; ++i) {
        float x = a[i], y = bb[i];
        lo[i] = std::min(x, y);
        hi[i] = std::max(x, y);
      }
    }
}

void CpuBackend::maxmin_backward(const float* src, const float* diff_dst, float* diff_src, int64_t batch,
                                 int64_t channels, int64_t plane, bool paired) {
  int64_t half = channels / 2;
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * plane > kParallelFloats)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < half; ++c) {
      int64_t ca = paired ? 2 * c : c, cb = paired ? 2 * c + 1 : c + half;
      const float* a = src + (b * channels + ca) * plane;
      const float* bb = src + (b * channels + cb) * plane;
      const float* dlo = diff_dst + (b * channels + ca) * plane;
      const float* dhi = diff_dst + (b * channels + cb) * plane;
      float* da = diff_src + (b * channels + ca) * plane;
      float* db = diff_src + (b * channels + cb) * plane;
      for (int64_t i = 0; i < plane; ++i) {
        // min comes from a when a <= b (ties: min from a, max from b), matching the forward's choice.
        bool a_is_min = a[i] <= bb[i];
        float glo = dlo[i], ghi = dhi[i];
        da[i] = a_is_min ? glo : ghi;
        db[i] = a_is_min ? ghi : glo;
      }
    }
}

void CpuBackend::add_bias(float* dst, const float* bias, int64_t batch, int64_t channels, int64_t plane) {
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * plane > kParallelFloats)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c) {
      float* d = dst + (b * channels + c) * plane;
      float v = bias[c];
      for (int64_t i = 0; i < plane; ++i) d[i] += v;
    }
}

void CpuBackend::bias_backward(const float* diff_dst, float* diff_bias, int64_t batch, int64_t channels,
                               int64_t plane) {
  // Each plane summed in float (vectorized), the planes of a channel in double.
#pragma omp parallel for schedule(static) if (batch * channels * plane > kParallelFloats)
  for (int64_t c = 0; c < channels; ++c) {
    double sum = 0.0;
    for (int64_t b = 0; b < batch; ++b) sum += plane_sum(diff_dst + (b * channels + c) * plane, plane);
    diff_bias[c] += static_cast<float>(sum);
  }
}

// group_dot: filter.cpp.

void CpuBackend::to_host(const float* src, float* host_dst, int64_t count) { copy(src, host_dst, count); }
void CpuBackend::from_host(const float* host_src, float* dst, int64_t count) { copy(host_src, dst, count); }

}  // namespace orthoconv::cpu
