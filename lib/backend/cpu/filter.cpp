// SOC filter preparation on the CPU: skew-symmetrization, the four power iterations and their gradient.
//
// A filter is [groups, C (out), C (in), k, k]. Reshape i of one group's filter into a matrix has
//   i = 0: rows (out, h)      cols (in, w)
//   i = 1: rows (out, w)      cols (in, h)
//   i = 2: rows out           cols (in, h, w)
//   i = 3: rows (out, h, w)   cols in
// with u over the columns and v over the rows (PowerIterationState).
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

namespace {

struct Reshape {
  int64_t c, k;
  int64_t rows(int which) const {
    switch (which) {
      case 0: case 1: return c * k;
      case 2: return c;
      default: return c * k * k;
    }
  }
  int64_t cols(int which) const {
    switch (which) {
      case 0: case 1: return c * k;
      case 2: return c * k * k;
      default: return c;
    }
  }
  int64_t row(int which, int64_t o, int64_t y, int64_t x) const {
    switch (which) {
      case 0: return o * k + y;
      case 1: return o * k + x;
      case 2: return o;
      default: return (o * k + y) * k + x;
    }
  }
  int64_t col(int which, int64_t i, int64_t y, int64_t x) const {
    switch (which) {
      case 0: return i * k + x;
      case 1: return i * k + y;
      case 2: return (i * k + y) * k + x;
      default: return i;
    }
  }
};

void normalize(std::vector<double>& v, float* out) {
  double norm = 0.0;
  for (double x : v) norm += x * x;
  norm = std::max(std::sqrt(norm), 1e-12);
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(v[i] / norm);
}

}  // namespace

void CpuBackend::skew_symmetrize(const float* src, float* dst, int64_t groups, int64_t channels, int64_t kernel) {
  int64_t k = kernel, c = channels;
  require<ShapeError>(src != dst, "skew_symmetrize cannot run in place");
  for (int64_t g = 0; g < groups; ++g) {
    const float* m = src + g * c * c * k * k;
    float* a = dst + g * c * c * k * k;
    for (int64_t o = 0; o < c; ++o)
      for (int64_t i = 0; i < c; ++i)
        for (int64_t y = 0; y < k; ++y)
          for (int64_t x = 0; x < k; ++x) {
            float direct = m[((o * c + i) * k + y) * k + x];
            float transposed = m[((i * c + o) * k + (k - 1 - y)) * k + (k - 1 - x)];
            a[((o * c + i) * k + y) * k + x] = 0.5f * (direct - transposed);
          }
  }
}

void CpuBackend::power_iteration(const float* filter, PowerIterationState& state, int64_t groups,
                                 int64_t channels, int64_t kernel, int iterations, float* sigma,
                                 int32_t* which) {
  Reshape r{channels, kernel};
  int64_t c = channels, k = kernel;
  int64_t group_size = c * c * k * k;
  for (int64_t g = 0; g < groups; ++g) {
    const float* a = filter + g * group_size;
    double best = 0.0;
    int best_index = -1;
    for (int w = 0; w < 4; ++w) {
      float* u = state.u[w].data() + g * r.cols(w);
      float* v = state.v[w].data() + g * r.rows(w);
      std::vector<double> nv(static_cast<size_t>(r.rows(w))), nu(static_cast<size_t>(r.cols(w)));
      for (int it = 0; it < iterations; ++it) {
        std::fill(nv.begin(), nv.end(), 0.0);
        for (int64_t o = 0; o < c; ++o)
          for (int64_t i = 0; i < c; ++i)
            for (int64_t y = 0; y < k; ++y)
              for (int64_t x = 0; x < k; ++x)
                nv[r.row(w, o, y, x)] += static_cast<double>(a[((o * c + i) * k + y) * k + x]) * u[r.col(w, i, y, x)];
        normalize(nv, v);
        std::fill(nu.begin(), nu.end(), 0.0);
        for (int64_t o = 0; o < c; ++o)
          for (int64_t i = 0; i < c; ++i)
            for (int64_t y = 0; y < k; ++y)
              for (int64_t x = 0; x < k; ++x)
                nu[r.col(w, i, y, x)] += static_cast<double>(a[((o * c + i) * k + y) * k + x]) * v[r.row(w, o, y, x)];
        normalize(nu, u);
      }
      double s = 0.0;
      for (int64_t o = 0; o < c; ++o)
        for (int64_t i = 0; i < c; ++i)
          for (int64_t y = 0; y < k; ++y)
            for (int64_t x = 0; x < k; ++x)
              s += static_cast<double>(a[((o * c + i) * k + y) * k + x]) * u[r.col(w, i, y, x)] * v[r.row(w, o, y, x)];
      if (best_index < 0 || s < best) {
        best = s;
        best_index = w;
      }
    }
    sigma[g] = static_cast<float>(best);
    which[g] = best_index;
  }
}

void CpuBackend::scale_groups(const float* filter, const float* scale, float* scaled, int64_t groups,
                              int64_t group_size) {
  for (int64_t g = 0; g < groups; ++g) {
    float s = scale[g];
    const float* f = filter + g * group_size;
    float* d = scaled + g * group_size;
    for (int64_t i = 0; i < group_size; ++i) d[i] = s * f[i];
  }
}

void CpuBackend::add_sigma_gradient(const PowerIterationState& state, const int32_t* which,
                                    const float* coefficient, float* diff_filter, int64_t groups,
                                    int64_t channels, int64_t kernel) {
  Reshape r{channels, kernel};
  int64_t c = channels, k = kernel;
  for (int64_t g = 0; g < groups; ++g) {
    int w = which[g];
    const float* u = state.u[w].data() + g * r.cols(w);
    const float* v = state.v[w].data() + g * r.rows(w);
    float* d = diff_filter + g * c * c * k * k;
    float coef = coefficient[g];
    for (int64_t o = 0; o < c; ++o)
      for (int64_t i = 0; i < c; ++i)
        for (int64_t y = 0; y < k; ++y)
          for (int64_t x = 0; x < k; ++x)
            d[((o * c + i) * k + y) * k + x] += coef * u[r.col(w, i, y, x)] * v[r.row(w, o, y, x)];
  }
}

}  // namespace orthoconv::cpu
