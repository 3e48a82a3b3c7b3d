// SOC filter preparation on the CPU: skew-symmetrization, the four power iterations and their gradient.
//
// A filter is [groups, C (out), C (in), k, k]. Reshape i of one group's filter into a matrix has
//   i = 0: rows (out, h)      cols (in, w)
//   i = 1: rows (out, w)      cols (in, h)
//   i = 2: rows out           cols (in, h, w)
//   i = 3: rows (out, h, w)   cols in
// with u over the columns and v over the rows (PowerIterationState).
//
// Speed. These run every training step on filters of up to 2048 x 2048 (LipConvnet's last stride-2 layer) or
// 512 x 512 x 3 x 3 (9.4 MB): memory-bound passes over the filter. So
//  - the four reshapes are served by ONE pass over the filter per half-iteration (v = A u for all four, then
//    u = A^T v for all four, then the four sigma = <v, A u>): 3 passes for one iteration instead of 12;
//  - the pass runs over out-channel rows A_o = filter[o] (C*k*k contiguous floats, f = (in*k + y)*k + x):
//    every reshape's product is an elementwise product of A_o with an expanded vector, reduced (v = A u) or
//    accumulated (u = A^T v) in bins t = f mod k*k, so the inner loops are contiguous and vectorize (AVX-512
//    clones chosen at run time); OpenMP over out-channels (v) or in-channel ranges (u);
//  - skew-symmetrization is tiled over (out, in) blocks so the transposed reads stay in cache.
// Products are summed in float within a row and normalized in double; results differ from a sequential
// double-precision loop by float rounding only.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define ORTHOCONV_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ORTHOCONV_SIMD_CLONES
#endif

namespace orthoconv::cpu {

namespace {

constexpr int64_t kLanes = 16;  // one AVX-512 register of floats
// Below this many floats a pass runs on one thread: the work is shorter than waking the OpenMP team (and on a
// busy machine a descheduled team member can cost a whole scheduler tick).
constexpr int64_t kParallelFloats = int64_t{1} << 18;

// bins[t] += sum over j < n with j mod kk == t of a[j] * e[j]. `acc` is scratch of lanes*kk floats.
// n is a multiple of kk; the chunk length lanes*kk is a multiple of both kk and the vector width.
ORTHOCONV_SIMD_CLONES
void binned_dot(const float* a, const float* e, int64_t n, int64_t kk, float* acc, float* bins) {
  const int64_t chunk = kLanes * kk;
  for (int64_t j = 0; j < chunk; ++j) acc[j] = 0.0f;
  int64_t f = 0;
  for (; f + chunk <= n; f += chunk)
    for (int64_t j = 0; j < chunk; ++j) acc[j] += a[f + j] * e[f + j];
  for (int64_t j = 0; f + j < n; ++j) acc[j] += a[f + j] * e[f + j];
  for (int64_t rep = 0; rep < kLanes; ++rep)
    for (int64_t t = 0; t < kk; ++t) bins[t] += acc[rep * kk + t];
}

// out[j] += a[j] * pattern[j mod chunk] for j < n (pattern holds `chunk` floats, periodic in kk).
ORTHOCONV_SIMD_CLONES
void patterned_fma(const float* a, const float* pattern, int64_t chunk, int64_t n, float* out) {
  int64_t f = 0;
  for (; f + chunk <= n; f += chunk)
    for (int64_t j = 0; j < chunk; ++j) out[f + j] += a[f + j] * pattern[j];
  for (int64_t j = 0; f + j < n; ++j) out[f + j] += a[f + j] * pattern[j];
}

ORTHOCONV_SIMD_CLONES
void skew_tile(const float* m, float* a, int64_t c, int64_t kk, int64_t o0, int64_t o1, int64_t i0, int64_t i1) {
  if (kk == 1) {  // a plain transpose: keep the inner loop free of the spatial loop
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t i = i0; i < i1; ++i) a[o * c + i] = 0.5f * (m[o * c + i] - m[i * c + o]);
    return;
  }
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t i = i0; i < i1; ++i) {
      const float* direct = m + (o * c + i) * kk;
      const float* transposed = m + (i * c + o) * kk;  // flipped in both spatial axes: index kk-1-t
      float* out = a + (o * c + i) * kk;
      for (int64_t t = 0; t < kk; ++t) out[t] = 0.5f * (direct[t] - transposed[kk - 1 - t]);
    }
}

ORTHOCONV_SIMD_CLONES
void scale_copy(const float* src, float scale, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = scale * src[i];
}

ORTHOCONV_SIMD_CLONES
double dot_chunked(const float* a, const float* b, int64_t n) {
  double total = 0.0;
  constexpr int64_t block = 4096;
  for (int64_t start = 0; start < n; start += block) {
    const int64_t end = std::min(n, start + block);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t i = start; i < end; ++i) part += a[i] * b[i];
    total += part;
  }
  return total;
}

double normalize(std::vector<double>& v, float* out) {
  double norm = 0.0;
  for (double x : v) norm += x * x;
  norm = std::max(std::sqrt(norm), 1e-12);
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(v[i] / norm);
  return norm;
}

// The expanded column vectors of one group: E_w[f] = u_w[col_w(f)] for f = (in*k + y)*k + x.
void expand_columns(float* const u[4], int64_t c, int64_t k, float* e0, float* e1, float* e3) {
  const int64_t kk = k * k;
#pragma omp parallel for schedule(static) if (c * kk > kParallelFloats)
  for (int64_t i = 0; i < c; ++i)
    for (int64_t y = 0; y < k; ++y)
      for (int64_t x = 0; x < k; ++x) {
        const int64_t f = i * kk + y * k + x;
        e0[f] = u[0][i * k + x];
        e1[f] = u[1][i * k + y];
        e3[f] = u[3][i];
      }
}

// nv_w = A_w u_w for the four reshapes of one group's filter, in one pass over its rows.
// `expanded` holds 3*C*kk floats (E0, E1, E3; E2 is u2 itself); `scratch` per thread (2*lanes*kk + 4*kk).
void multiply_rows(const float* a, float* const u[4], int64_t c, int64_t k, float* expanded,
                   std::vector<float>& scratch, std::vector<double> nv[4]) {
  const int64_t kk = k * k, row = c * kk;
  float* e0 = expanded;
  float* e1 = expanded + row;
  float* e3 = expanded + 2 * row;
  expand_columns(u, c, k, e0, e1, e3);
  const float* e[4] = {e0, e1, u[2], e3};
  const int64_t per_thread = kLanes * kk + 4 * kk;
  const int threads = omp_get_max_threads();
  if (static_cast<int64_t>(scratch.size()) < threads * per_thread) scratch.resize(threads * per_thread);
#pragma omp parallel for schedule(static) if (c * row > kParallelFloats)
  for (int64_t o = 0; o < c; ++o) {
    float* acc = scratch.data() + omp_get_thread_num() * per_thread;
    float* bins = acc + kLanes * kk;  // 4 * kk
    std::fill(bins, bins + 4 * kk, 0.0f);
    const float* a_o = a + o * row;
    for (int w = 0; w < 4; ++w) binned_dot(a_o, e[w], row, kk, acc, bins + w * kk);
    const float* b0 = bins;
    const float* b1 = bins + kk;
    const float* b2 = bins + 2 * kk;
    const float* b3 = bins + 3 * kk;
    double total2 = 0.0;
    for (int64_t y = 0; y < k; ++y) {
      double by = 0.0, bx = 0.0;
      for (int64_t x = 0; x < k; ++x) {
        by += b0[y * k + x];
        bx += b1[x * k + y];
      }
      nv[0][o * k + y] = by;
      nv[1][o * k + y] = bx;  // row (o, w = y) of reshape 1: sum over h
    }
    for (int64_t t = 0; t < kk; ++t) {
      total2 += b2[t];
      nv[3][o * kk + t] = b3[t];
    }
    nv[2][o] = total2;
  }
}

// nu_w = A_w^T v_w for the four reshapes, one pass: each thread owns a range of input channels and runs over
// every output row, accumulating N_w[f] += A_o[f] * V_w(o, f mod kk) in place; then the bins are folded.
void multiply_columns(const float* a, float* const v[4], int64_t c, int64_t k, float* accum,
                      std::vector<float>& scratch, std::vector<double> nu[4]) {
  const int64_t kk = k * k, row = c * kk, chunk = kLanes * kk;
  float* n0 = accum;
  float* n1 = accum + row;
  float* n2 = accum + 2 * row;
  float* n3 = accum + 3 * row;
  const int threads = omp_get_max_threads();
  const int64_t per_thread = 4 * chunk;
  if (static_cast<int64_t>(scratch.size()) < threads * per_thread) scratch.resize(threads * per_thread);
#pragma omp parallel if (c * row > kParallelFloats)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t i0 = c * tid / nt, i1 = c * (tid + 1) / nt;
    const int64_t f0 = i0 * kk, len = (i1 - i0) * kk;
    float* q = scratch.data() + tid * per_thread;  // four patterns of `chunk` floats
    std::fill(n0 + f0, n0 + f0 + len, 0.0f);
    std::fill(n1 + f0, n1 + f0 + len, 0.0f);
    std::fill(n2 + f0, n2 + f0 + len, 0.0f);
    std::fill(n3 + f0, n3 + f0 + len, 0.0f);
    for (int64_t o = 0; o < c; ++o) {
      // The four patterns of row o over one period (t = y*k + x), then repeated to `chunk` floats.
      for (int64_t y = 0, t = 0; y < k; ++y)
        for (int64_t x = 0; x < k; ++x, ++t) {
          q[t] = v[0][o * k + y];
          q[chunk + t] = v[1][o * k + x];
          q[2 * chunk + t] = v[2][o];
          q[3 * chunk + t] = v[3][o * kk + t];
        }
      for (int w = 0; w < 4; ++w)
        for (int64_t rep = 1; rep < kLanes; ++rep)
          std::copy(q + w * chunk, q + w * chunk + kk, q + w * chunk + rep * kk);
      const float* a_o = a + o * row + f0;
      patterned_fma(a_o, q, chunk, len, n0 + f0);
      patterned_fma(a_o, q + chunk, chunk, len, n1 + f0);
      patterned_fma(a_o, q + 2 * chunk, chunk, len, n2 + f0);
      patterned_fma(a_o, q + 3 * chunk, chunk, len, n3 + f0);
    }
  }
  // Fold: nu0[i, x] = sum_y N0[i, y, x]; nu1[i, y] = sum_x N1[i, y, x]; nu2 = N2; nu3[i] = sum_t N3[i, t].
#pragma omp parallel for schedule(static) if (row > kParallelFloats)
  for (int64_t i = 0; i < c; ++i) {
    double total3 = 0.0;
    for (int64_t j = 0; j < k; ++j) nu[0][i * k + j] = nu[1][i * k + j] = 0.0;
    for (int64_t y = 0; y < k; ++y)
      for (int64_t x = 0; x < k; ++x) {
        const int64_t f = i * kk + y * k + x;
        nu[0][i * k + x] += n0[f];
        nu[1][i * k + y] += n1[f];
        nu[2][f] = n2[f];
        total3 += n3[f];
      }
    nu[3][i] = total3;
  }
}

}  // namespace

void CpuBackend::skew_symmetrize(const float* src, float* dst, int64_t groups, int64_t channels, int64_t kernel) {
  const int64_t k = kernel, c = channels, kk = k * k;
  require<ShapeError>(src != dst, "skew_symmetrize cannot run in place");
  const int64_t tile = kk == 1 ? 32 : 16;
  const int64_t tiles = (c + tile - 1) / tile;
#pragma omp parallel for collapse(2) schedule(static) if (groups * c * c * kk > kParallelFloats)
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t ot = 0; ot < tiles; ++ot) {
      const float* m = src + g * c * c * kk;
      float* a = dst + g * c * c * kk;
      const int64_t o0 = ot * tile, o1 = std::min(c, o0 + tile);
      for (int64_t i0 = 0; i0 < c; i0 += tile) skew_tile(m, a, c, kk, o0, o1, i0, std::min(c, i0 + tile));
    }
}

void CpuBackend::power_iteration(const float* filter, PowerIterationState& state, int64_t groups,
                                 int64_t channels, int64_t kernel, int iterations, float* sigma,
                                 int32_t* which) {
  const int64_t c = channels, k = kernel, kk = k * k;
  const int64_t group_size = c * c * kk, row = c * kk;
  const int64_t rows[4] = {c * k, c * k, c, c * kk};
  const int64_t cols[4] = {c * k, c * k, c * kk, c};
  if (static_cast<int64_t>(filter_scratch_.size()) < 4 * row) filter_scratch_.resize(4 * row);
  std::vector<double> nv[4], nu[4];
  for (int w = 0; w < 4; ++w) {
    nv[w].resize(static_cast<size_t>(rows[w]));
    nu[w].resize(static_cast<size_t>(cols[w]));
  }
  for (int64_t g = 0; g < groups; ++g) {
    const float* a = filter + g * group_size;
    float* u[4];
    float* v[4];
    for (int w = 0; w < 4; ++w) {
      u[w] = state.u[w].data() + g * cols[w];
      v[w] = state.v[w].data() + g * rows[w];
    }
    for (int it = 0; it < iterations; ++it) {
      multiply_rows(a, u, c, k, filter_scratch_.data(), thread_scratch_, nv);
      for (int w = 0; w < 4; ++w) normalize(nv[w], v[w]);
      multiply_columns(a, v, c, k, filter_scratch_.data(), thread_scratch_, nu);
      for (int w = 0; w < 4; ++w) normalize(nu[w], u[w]);
    }
    // sigma_w = <A, u_w (x) v_w> = <v_w, A_w u_w>.
    multiply_rows(a, u, c, k, filter_scratch_.data(), thread_scratch_, nv);
    double best = 0.0;
    int best_index = -1;
    for (int w = 0; w < 4; ++w) {
      double s = 0.0;
      for (int64_t r = 0; r < rows[w]; ++r) s += nv[w][static_cast<size_t>(r)] * v[w][r];
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
  constexpr int64_t block = 16384;
  const int64_t blocks = (group_size + block - 1) / block;
#pragma omp parallel for collapse(2) schedule(static) if (groups * group_size > kParallelFloats)
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t start = b * block, n = std::min(group_size - start, block);
      scale_copy(filter + g * group_size + start, scale[g], scaled + g * group_size + start, n);
    }
}

void CpuBackend::add_sigma_gradient(const PowerIterationState& state, const int32_t* which,
                                    const float* coefficient, float* diff_filter, int64_t groups,
                                    int64_t channels, int64_t kernel) {
  const int64_t c = channels, k = kernel, kk = k * k, row = c * kk, chunk = kLanes * kk;
  const int64_t rows[4] = {c * k, c * k, c, c * kk};
  const int64_t cols[4] = {c * k, c * k, c * kk, c};
  if (static_cast<int64_t>(filter_scratch_.size()) < 4 * row) filter_scratch_.resize(4 * row);
  const int threads = omp_get_max_threads();
  if (static_cast<int64_t>(thread_scratch_.size()) < threads * chunk) thread_scratch_.resize(threads * chunk);
  for (int64_t g = 0; g < groups; ++g) {
    const int w = which[g];
    const float* u = state.u[w].data() + g * cols[w];
    const float* v = state.v[w].data() + g * rows[w];
    const float coef = coefficient[g];
    // E[f] = u[col_w(f)]; the gradient row o is E * coef * v[row_w(o, f mod kk)].
    float* e = filter_scratch_.data();
    for (int64_t i = 0; i < c; ++i)
      for (int64_t y = 0; y < k; ++y)
        for (int64_t x = 0; x < k; ++x) {
          const int64_t col = w == 0 ? i * k + x : w == 1 ? i * k + y : w == 2 ? (i * k + y) * k + x : i;
          e[i * kk + y * k + x] = u[col];
        }
    float* d = diff_filter + g * c * row;
#pragma omp parallel for schedule(static) if (c * row > kParallelFloats)
    for (int64_t o = 0; o < c; ++o) {
      float* q = thread_scratch_.data() + omp_get_thread_num() * chunk;
      for (int64_t y = 0, t = 0; y < k; ++y)
        for (int64_t x = 0; x < k; ++x, ++t) {
          const int64_t r = w == 0 ? o * k + y : w == 1 ? o * k + x : w == 2 ? o : o * kk + t;
          q[t] = coef * v[r];
        }
      for (int64_t rep = 1; rep < kLanes; ++rep) std::copy(q, q + kk, q + rep * kk);
      patterned_fma(e, q, chunk, row, d + o * row);
    }
  }
}

void CpuBackend::group_dot(const float* a, const float* b, float* out, int64_t groups, int64_t group_size) {
  constexpr int64_t block = 16384;
  const int64_t blocks = (group_size + block - 1) / block;
  for (int64_t g = 0; g < groups; ++g) {
    const float* x = a + g * group_size;
    const float* y = b + g * group_size;
    double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static) if (group_size > kParallelFloats)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t start = blk * block, n = std::min(group_size - start, block);
      sum += dot_chunked(x + start, y + start, n);
    }
    out[g] = static_cast<float>(sum);
  }
}

}  // namespace orthoconv::cpu
