// SOC filter preparation on the CPU: skew-symmetrization, the four power iterations and their gradient.
//
// A filter is [groups, C (out), C (in), k, k]. Each of the four reshapes of one group's filter pairs an
// in-channel-side vector with an out-channel-side vector (PowerIterationState names them as the reference does):
//   i = 0: out side (out, h) = v1      in side (in, w)    = u1
//   i = 1: out side (out, w) = v2      in side (in, h)    = u2
//   i = 2: out side out      = v3      in side (in, h, w) = u3
//   i = 3: out side (out, h, w) = u4   in side in         = v4
// The loops below think in sides: a "rows" pass computes every out-side product A x from the in-side vectors, a
// "columns" pass every in-side product A^T y from the out-side vectors. The reference updates v before u in
// every reshape, which is out side first for reshapes 1-3 and in side first for the fourth.
//
// Speed. These run every training step on filters of up to 2048 x 2048 (LipConvnet's last stride-2 layer) or
// 512 x 512 x 3 x 3 (9.4 MB): memory-bound passes over the filter. So
//  - the four reshapes are served by ONE pass over the filter per half-iteration (the out-side products of all
//    four, then the in-side products) and one for the four sigma = <v, A u>: 2 * iterations + 2 passes (the
//    fourth reshape's first half-round, in side first, runs alone), 4 for one iteration instead of 16;
//  - the pass runs over out-channel rows A_o = filter[o] (C*k*k contiguous floats, f = (in*k + y)*k + x):
//    every reshape's product is an elementwise product of A_o with an expanded vector, reduced (out side) or
//    accumulated (in side) in bins t = f mod k*k, so the inner loops are contiguous and vectorize (AVX-512
//    clones chosen at run time); OpenMP over out-channels (rows) or in-channel ranges (columns);
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

// The expanded in-side vectors of one group: E_w[f] = x_w[in-side index of f] for f = (in*k + y)*k + x.
void expand_columns(float* const x_in[4], int64_t c, int64_t k, float* e0, float* e1, float* e3) {
  const int64_t kk = k * k;
#pragma omp parallel for schedule(static) if (c * kk > kParallelFloats)
  for (int64_t i = 0; i < c; ++i)
    for (int64_t y = 0; y < k; ++y)
      for (int64_t x = 0; x < k; ++x) {
        const int64_t f = i * kk + y * k + x;
        e0[f] = x_in[0][i * k + x];
        e1[f] = x_in[1][i * k + y];
        e3[f] = x_in[3][i];
      }
}

// nv_w = (out-side product of the in-side vector x_w) for the four reshapes of one group's filter, in one pass
// over its rows. `expanded` holds 3*C*kk floats (E0, E1, E3; E2 is x_2 itself); `scratch` per thread.
void multiply_rows(const float* a, float* const x_in[4], int64_t c, int64_t k, float* expanded,
                   std::vector<float>& scratch, std::vector<double> nv[4]) {
  const int64_t kk = k * k, row = c * kk;
  float* e0 = expanded;
  float* e1 = expanded + row;
  float* e3 = expanded + 2 * row;
  expand_columns(x_in, c, k, e0, e1, e3);
  const float* e[4] = {e0, e1, x_in[2], e3};
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
      nv[1][o * k + y] = bx;  // (o, w = y) of reshape 1: sum over h
    }
    for (int64_t t = 0; t < kk; ++t) {
      total2 += b2[t];
      nv[3][o * kk + t] = b3[t];
    }
    nv[2][o] = total2;
  }
}

// nu_w = (in-side product of the out-side vector y_w) for the reshapes w with active[w], one pass: each thread
// owns a range of input channels and runs over every output row, accumulating N_w[f] += A_o[f] * Y_w(o, f mod kk)
// in place; then the bins are folded.
void multiply_columns(const float* a, float* const y_out[4], const bool active[4], int64_t c, int64_t k, float* accum,
                      std::vector<float>& scratch, std::vector<double> nu[4]) {
  const int64_t kk = k * k, row = c * kk, chunk = kLanes * kk;
  float* n[4] = {accum, accum + row, accum + 2 * row, accum + 3 * row};
  const int threads = omp_get_max_threads();
  const int64_t per_thread = 4 * chunk;
  if (static_cast<int64_t>(scratch.size()) < threads * per_thread) scratch.resize(threads * per_thread);
#pragma omp parallel if (c * row > kParallelFloats)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t i0 = c * tid / nt, i1 = c * (tid + 1) / nt;
    const int64_t f0 = i0 * kk, len = (i1 - i0) * kk;
    float* q = scratch.data() + tid * per_thread;  // four patterns of `chunk` floats
    for (int w = 0; w < 4; ++w)
      if (active[w]) std::fill(n[w] + f0, n[w] + f0 + len, 0.0f);
    for (int64_t o = 0; o < c; ++o) {
      // The four patterns of row o over one period (t = y*k + x), then repeated to `chunk` floats.
      for (int64_t y = 0, t = 0; y < k; ++y)
        for (int64_t x = 0; x < k; ++x, ++t) {
          q[t] = y_out[0][o * k + y];
          q[chunk + t] = y_out[1][o * k + x];
          q[2 * chunk + t] = y_out[2][o];
          q[3 * chunk + t] = y_out[3][o * kk + t];
        }
      const float* a_o = a + o * row + f0;
      for (int w = 0; w < 4; ++w) {
        if (!active[w]) continue;
        for (int64_t rep = 1; rep < kLanes; ++rep)
          std::copy(q + w * chunk, q + w * chunk + kk, q + w * chunk + rep * kk);
        patterned_fma(a_o, q + w * chunk, chunk, len, n[w] + f0);
      }
    }
  }
  // Fold: nu0[i, x] = sum_y N0[i, y, x]; nu1[i, y] = sum_x N1[i, y, x]; nu2 = N2; nu3[i] = sum_t N3[i, t].
#pragma omp parallel for schedule(static) if (row > kParallelFloats)
  for (int64_t i = 0; i < c; ++i) {
    double total3 = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      if (active[0]) nu[0][i * k + j] = 0.0;
      if (active[1]) nu[1][i * k + j] = 0.0;
    }
    for (int64_t y = 0; y < k; ++y)
      for (int64_t x = 0; x < k; ++x) {
        const int64_t f = i * kk + y * k + x;
        if (active[0]) nu[0][i * k + x] += n[0][f];
        if (active[1]) nu[1][i * k + y] += n[1][f];
        if (active[2]) nu[2][f] = n[2][f];
        if (active[3]) total3 += n[3][f];
      }
    if (active[3]) nu[3][i] = total3;
  }
}

double dot(const std::vector<double>& product, const float* vector) {
  double s = 0.0;
  for (size_t i = 0; i < product.size(); ++i) s += product[i] * vector[i];
  return s;
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

void CpuBackend::power_iteration(const float* filter, PowerIterationState& state, int64_t groups, int64_t channels,
                                 int64_t kernel, int iterations, float* sigma, int32_t* which) {
  const int64_t c = channels, k = kernel, kk = k * k;
  const int64_t group_size = c * c * kk, row = c * kk;
  const int64_t out_length[4] = {c * k, c * k, c, c * kk}, in_length[4] = {c * k, c * k, c * kk, c};
  if (static_cast<int64_t>(filter_scratch_.size()) < 4 * row) filter_scratch_.resize(4 * row);
  std::vector<double> nv[4], nu[4];  // out-side and in-side products
  for (int w = 0; w < 4; ++w) {
    nv[w].resize(static_cast<size_t>(out_length[w]));
    nu[w].resize(static_cast<size_t>(in_length[w]));
  }
  constexpr bool all[4] = {true, true, true, true};
  constexpr bool fourth[4] = {false, false, false, true};
  constexpr bool first_three[4] = {true, true, true, false};
  for (int64_t g = 0; g < groups; ++g) {
    const float* a = filter + g * group_size;
    float* in[4];   // u1, u2, u3, v4
    float* out[4];  // v1, v2, v3, u4
    for (int w = 0; w < 4; ++w) {
      float* u = state.u[w].data() + g * PowerIterationState::u_length(w, c, k);
      float* v = state.v[w].data() + g * PowerIterationState::v_length(w, c, k);
      in[w] = w < 3 ? u : v;
      out[w] = w < 3 ? v : u;
    }
    // Round r is v = normalize(A u), then u = normalize(A^T v): out side then in side for reshapes 1-3, in side
    // then out side for the fourth. So the fourth's first half-round runs alone, the rows passes serve every
    // reshape, and the last columns pass only the first three.
    if (iterations > 0) {
      multiply_columns(a, out, fourth, c, k, filter_scratch_.data(), thread_scratch_, nu);
      normalize(nu[3], in[3]);
    }
    for (int it = 0; it < iterations; ++it) {
      multiply_rows(a, in, c, k, filter_scratch_.data(), thread_scratch_, nv);
      for (int w = 0; w < 4; ++w) normalize(nv[w], out[w]);
      const bool* active = it + 1 < iterations ? all : first_three;
      multiply_columns(a, out, active, c, k, filter_scratch_.data(), thread_scratch_, nu);
      for (int w = 0; w < 4; ++w)
        if (active[w]) normalize(nu[w], in[w]);
    }
    // sigma_w = <A, u_w (x) v_w> = <out_w, A in_w>, always from a rows pass with the final vectors: the same
    // arithmetic whatever the iterations, so evaluation mode reproduces the last training step's sigma exactly.
    multiply_rows(a, in, c, k, filter_scratch_.data(), thread_scratch_, nv);
    double best = 0.0;
    int best_index = -1;
    for (int w = 0; w < 4; ++w) {
      const double s = dot(nv[w], out[w]);
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

void CpuBackend::add_sigma_gradient(const PowerIterationState& state, const int32_t* which, const float* coefficient,
                                    float* diff_filter, int64_t groups, int64_t channels, int64_t kernel) {
  const int64_t c = channels, k = kernel, kk = k * k, row = c * kk, chunk = kLanes * kk;
  if (static_cast<int64_t>(filter_scratch_.size()) < 4 * row) filter_scratch_.resize(4 * row);
  const int threads = omp_get_max_threads();
  if (static_cast<int64_t>(thread_scratch_.size()) < threads * chunk) thread_scratch_.resize(threads * chunk);
  for (int64_t g = 0; g < groups; ++g) {
    const int w = which[g];
    const float* u = state.u[w].data() + g * PowerIterationState::u_length(w, c, k);
    const float* v = state.v[w].data() + g * PowerIterationState::v_length(w, c, k);
    const float* in = w < 3 ? u : v;   // u1, u2, u3, v4
    const float* out = w < 3 ? v : u;  // v1, v2, v3, u4
    const float coef = coefficient[g];
    // E[f] = in[in-side index of f]; the gradient row o is E * coef * out[out-side index of (o, f mod kk)].
    float* e = filter_scratch_.data();
    for (int64_t i = 0; i < c; ++i)
      for (int64_t y = 0; y < k; ++y)
        for (int64_t x = 0; x < k; ++x) {
          const int64_t col = w == 0 ? i * k + x : w == 1 ? i * k + y : w == 2 ? (i * k + y) * k + x : i;
          e[i * kk + y * k + x] = in[col];
        }
    float* d = diff_filter + g * c * row;
#pragma omp parallel for schedule(static) if (c * row > kParallelFloats)
    for (int64_t o = 0; o < c; ++o) {
      float* q = thread_scratch_.data() + omp_get_thread_num() * chunk;
      for (int64_t y = 0, t = 0; y < k; ++y)
        for (int64_t x = 0; x < k; ++x, ++t) {
          const int64_t r = w == 0 ? o * k + y : w == 1 ? o * k + x : w == 2 ? o : o * kk + t;
          q[t] = coef * out[r];
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
