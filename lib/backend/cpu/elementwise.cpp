// Elementwise, channel and reduction primitives of the CPU backend: plain loops, parallel over OpenMP.
#include <algorithm>
#include <cstring>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

void CpuBackend::fill(float* dst, int64_t count, float value) {
#pragma omp parallel for schedule(static) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) dst[i] = value;
}

void CpuBackend::copy(const float* src, float* dst, int64_t count) {
  if (src == dst || count <= 0) return;
  std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
}

void CpuBackend::axpby(float alpha, const float* x, float beta, float* y, int64_t count) {
  if (beta == 0.0f) {
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) y[i] = alpha * x[i];
  } else if (beta == 1.0f) {
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) y[i] += alpha * x[i];
  } else {
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) y[i] = alpha * x[i] + beta * y[i];
  }
}

void CpuBackend::copy_channels(const float* src, int64_t src_channels, float* dst, int64_t dst_channels,
                               int64_t batch, int64_t plane, bool accumulate) {
  int64_t common = std::min(src_channels, dst_channels);
#pragma omp parallel for schedule(static) if (batch * dst_channels * plane > 65536)
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
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * plane > 65536)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      std::memcpy(dst + (b * channels + destination[c]) * plane, src + (b * channels + c) * plane,
                  static_cast<size_t>(plane) * sizeof(float));
}

void CpuBackend::pixel_unshuffle(const float* src, float* dst, int64_t batch, int64_t channels, int64_t height,
                                 int64_t width, int64_t stride, bool inverse) {
  int64_t oh = height / stride, ow = width / stride;
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * height * width > 65536)
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
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * plane > 65536)
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
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * plane > 65536)
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
#pragma omp parallel for collapse(2) schedule(static) if (batch * channels * plane > 65536)
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c) {
      float* d = dst + (b * channels + c) * plane;
      float v = bias[c];
      for (int64_t i = 0; i < plane; ++i) d[i] += v;
    }
}

void CpuBackend::bias_backward(const float* diff_dst, float* diff_bias, int64_t batch, int64_t channels,
                               int64_t plane) {
#pragma omp parallel for schedule(static) if (batch * channels * plane > 65536)
  for (int64_t c = 0; c < channels; ++c) {
    double sum = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      const float* d = diff_dst + (b * channels + c) * plane;
      for (int64_t i = 0; i < plane; ++i) sum += d[i];
    }
    diff_bias[c] += static_cast<float>(sum);
  }
}

void CpuBackend::group_dot(const float* a, const float* b, float* out, int64_t groups, int64_t group_size) {
  for (int64_t g = 0; g < groups; ++g) {
    double sum = 0.0;
    const float* x = a + g * group_size;
    const float* y = b + g * group_size;
#pragma omp parallel for reduction(+ : sum) schedule(static) if (group_size > 65536)
    for (int64_t i = 0; i < group_size; ++i) sum += static_cast<double>(x[i]) * y[i];
    out[g] = static_cast<float>(sum);
  }
}

void CpuBackend::to_host(const float* src, float* host_dst, int64_t count) { copy(src, host_dst, count); }
void CpuBackend::from_host(const float* host_src, float* dst, int64_t count) { copy(host_src, dst, count); }

}  // namespace orthoconv::cpu
