// SOC filter preparation on the GPU: skew-symmetrization, the four power iterations, the per-group scale and
// the gradient of sigma; plus the per-group inner products. The twin of backend/cpu/filter.cpp.
//
// A filter is [groups, C (out), C (in), k, k]. Reshape i of one group's filter into a matrix has
//   i = 0: rows (out, h)      cols (in, w)
//   i = 1: rows (out, w)      cols (in, h)
//   i = 2: rows out           cols (in, h, w)
//   i = 3: rows in            cols (out, h, w)
// with u over the columns and v over the rows, and each round updates v from u, then u from v: the reference's
// names and order (PowerIterationState). Matrix-vector products and the sigma
// estimates accumulate in double, like the CPU loops, so both backends agree to float rounding of the vectors.
// Per-group host values (scales, the chosen reshapes and coefficients) travel as kernel parameters, in chunks.
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernel_utils.cuh"

namespace orthoconv::cuda {

namespace {

constexpr int kLineThreads = 128;       // threads per matrix row / column in the power iteration
constexpr int64_t kReduceChunk = 8192;  // elements per block in two-stage reductions
constexpr int kScaleChunk = 256;        // groups per scale_groups launch
constexpr int kSigmaChunk = 128;        // groups per add_sigma_gradient launch

// PowerIterationState::v_length / u_length, for device code.
__host__ __device__ inline int64_t reshape_rows(int which, int64_t c, int64_t k) { return which < 2 ? c * k : c; }
__host__ __device__ inline int64_t reshape_cols(int which, int64_t c, int64_t k) {
  return which < 2 ? c * k : c * k * k;
}

// Offset in one group's filter of entry (row, col) of reshape `which`.
__device__ inline int64_t reshape_entry(int which, int64_t row, int64_t col, int64_t c, int64_t k) {
  int64_t o, i, y, x;
  switch (which) {
    case 0:
      o = row / k;
      y = row % k;
      i = col / k;
      x = col % k;
      break;
    case 1:
      o = row / k;
      x = row % k;
      i = col / k;
      y = col % k;
      break;
    case 2:
      o = row;
      i = col / (k * k);
      y = (col / k) % k;
      x = col % k;
      break;
    default:
      i = row;
      o = col / (k * k);
      y = (col / k) % k;
      x = col % k;
      break;
  }
  return ((o * c + i) * k + y) * k + x;
}

// Row and column in reshape `which` of the filter entry at offset e of its group.
__device__ inline void entry_position(int which, int64_t e, int64_t c, int64_t k, int64_t& row, int64_t& col) {
  const int64_t x = e % k, y = (e / k) % k, i = (e / (k * k)) % c, o = e / (k * k * c);
  switch (which) {
    case 0:
      row = o * k + y;
      col = i * k + x;
      break;
    case 1:
      row = o * k + x;
      col = i * k + y;
      break;
    case 2:
      row = o;
      col = (i * k + y) * k + x;
      break;
    default:
      row = i;
      col = (o * k + y) * k + x;
      break;
  }
}

struct ReshapeVectors {
  const float* u[4];
  const float* v[4];
};

// ---- skew-symmetrization ----
__global__ void skew_symmetrize_kernel(const float* src, float* dst, int64_t groups, int64_t c, int64_t k) {
  const int64_t kk = k * k, count = groups * c * c * kk;
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) {
    const int64_t x = index % k, y = (index / k) % k, i = (index / kk) % c, o = (index / (kk * c)) % c,
                  g = index / (kk * c * c);
    const int64_t transposed = ((g * c + i) * c + o) * kk + (k - 1 - y) * k + (k - 1 - x);
    dst[index] = 0.5f * (src[index] - src[transposed]);
  }
}

// ---- power iteration ----
// out[g, line] = sum_j M[line, j] vec[g, j] with M = reshape `which` of group g (or its transpose), in double.
// Grid (lines, groups).
__global__ void reshape_matvec_kernel(const float* filter, const float* vec, double* out, int which, bool transpose,
                                      int64_t c, int64_t k) {
  const int64_t g = blockIdx.y, line = blockIdx.x;
  const int64_t rows = reshape_rows(which, c, k), cols = reshape_cols(which, c, k);
  const int64_t length = transpose ? rows : cols;
  const float* a = filter + g * c * c * k * k;
  const float* v = vec + g * length;
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < length; j += blockDim.x) {
    const int64_t e = transpose ? reshape_entry(which, j, line, c, k) : reshape_entry(which, line, j, c, k);
    sum += static_cast<double>(a[e]) * static_cast<double>(v[j]);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) out[g * (transpose ? cols : rows) + line] = sum;
}

// out[g] = in[g] / max(||in[g]||, 1e-12), one block per group.
__global__ void normalize_kernel(const double* in, float* out, int64_t length) {
  const int64_t g = blockIdx.x;
  const double* v = in + g * length;
  double squares = 0.0;
  for (int64_t j = threadIdx.x; j < length; j += blockDim.x) squares += v[j] * v[j];
  squares = block_sum(squares);
  __shared__ double norm;
  if (threadIdx.x == 0) norm = fmax(sqrt(squares), 1e-12);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < length; j += blockDim.x) out[g * length + j] = static_cast<float>(v[j] / norm);
}

// partial[(which * groups + g) * chunks + chunk] = sum over the chunk of A_g[e] u[col(e)] v[row(e)].
// Grid (chunks, groups, 4).
__global__ void sigma_partial_kernel(const float* filter, ReshapeVectors vectors, double* partial, int64_t c, int64_t k,
                                     int64_t chunks) {
  const int64_t chunk = blockIdx.x, g = blockIdx.y, groups = gridDim.y;
  const int which = static_cast<int>(blockIdx.z);
  const int64_t group_size = c * c * k * k;
  const float* a = filter + g * group_size;
  const float* u = vectors.u[which] + g * reshape_cols(which, c, k);
  const float* v = vectors.v[which] + g * reshape_rows(which, c, k);
  const int64_t end = min(group_size, (chunk + 1) * kReduceChunk);
  double sum = 0.0;
  for (int64_t e = chunk * kReduceChunk + threadIdx.x; e < end; e += blockDim.x) {
    int64_t row, col;
    entry_position(which, e, c, k, row, col);
    sum += static_cast<double>(a[e]) * static_cast<double>(u[col]) * static_cast<double>(v[row]);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[(which * groups + g) * chunks + chunk] = sum;
}

// Per group: the four estimates, their minimum (the first one on ties, as on the CPU) and its index.
__global__ void sigma_finish_kernel(const double* partial, int64_t chunks, double* sigma, int32_t* which) {
  const int64_t g = blockIdx.x, groups = gridDim.x;
  __shared__ double estimate[4];
  for (int w = 0; w < 4; ++w) {
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < chunks; j += blockDim.x) sum += partial[(w * groups + g) * chunks + j];
    sum = block_sum(sum);
    if (threadIdx.x == 0) estimate[w] = sum;
  }
  if (threadIdx.x == 0) {
    int best = 0;
    for (int w = 1; w < 4; ++w)
      if (estimate[w] < estimate[best]) best = w;
    sigma[g] = estimate[best];
    which[g] = best;
  }
}

// ---- per-group scale and the gradient of sigma ----
struct GroupScales {
  float value[kScaleChunk];
};

__global__ void scale_groups_kernel(const float* filter, GroupScales scales, float* scaled, int64_t group_size,
                                    int64_t count) {
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) scaled[index] = scales.value[index / group_size] * filter[index];
}

struct SigmaGradientChunk {
  int32_t which[kSigmaChunk];
  float coefficient[kSigmaChunk];
};

// diff[g] += coefficient[g] * (u_which (x) v_which) for the groups first_group + [0, count / group_size).
__global__ void add_sigma_gradient_kernel(ReshapeVectors vectors, SigmaGradientChunk chunk, int64_t first_group,
                                          float* diff, int64_t c, int64_t k, int64_t count) {
  const int64_t group_size = c * c * k * k;
  ORTHOCONV_GRID_STRIDE_LOOP(index, count) {
    const int64_t local = index / group_size, e = index % group_size, g = first_group + local;
    const int w = chunk.which[local];
    int64_t row, col;
    entry_position(w, e, c, k, row, col);
    const float u = vectors.u[w][g * reshape_cols(w, c, k) + col];
    const float v = vectors.v[w][g * reshape_rows(w, c, k) + row];
    diff[g * group_size + e] += chunk.coefficient[local] * u * v;
  }
}

// ---- per-group inner products ----
// partial[g * chunks + chunk] = sum over the chunk of a_g b_g, in double. Grid (chunks, groups).
__global__ void dot_partial_kernel(const float* a, const float* b, double* partial, int64_t group_size,
                                   int64_t chunks) {
  const int64_t chunk = blockIdx.x, g = blockIdx.y;
  const int64_t end = min(group_size, (chunk + 1) * kReduceChunk);
  double sum = 0.0;
  for (int64_t e = chunk * kReduceChunk + threadIdx.x; e < end; e += blockDim.x)
    sum += static_cast<double>(a[g * group_size + e]) * static_cast<double>(b[g * group_size + e]);
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[g * chunks + chunk] = sum;
}

__global__ void sum_partials_kernel(const double* partial, int64_t chunks, double* out) {
  const int64_t g = blockIdx.x;
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < chunks; j += blockDim.x) sum += partial[g * chunks + j];
  sum = block_sum(sum);
  if (threadIdx.x == 0) out[g] = sum;
}

void check_groups(int64_t groups, const char* what) {
  require<ShapeError>(groups > 0 && groups <= 65535, what, ": ", groups,
                      " groups (the CUDA backend handles 1 to 65535)");
}

ReshapeVectors reshape_vectors(const PowerIterationState& state, int64_t groups, int64_t c, int64_t k,
                               const char* what) {
  ReshapeVectors out{};
  for (int w = 0; w < 4; ++w) {
    const Tensor& u = state.u[w];
    const Tensor& v = state.v[w];
    require<ShapeError>(u.device() == Device::cuda && v.device() == Device::cuda, what,
                        ": the power-iteration vectors must live on the GPU");
    require<ShapeError>(u.numel() >= groups * reshape_cols(w, c, k) && v.numel() >= groups * reshape_rows(w, c, k),
                        what, ": power-iteration vectors u", w + 1, " ", u.shape().str(), " / v", w + 1, " ",
                        v.shape().str(), " are too small for ", groups, " groups of ", c, " channels, kernel ", k);
    out.u[w] = u.data();
    out.v[w] = v.data();
  }
  return out;
}

}  // namespace

void CudaBackend::skew_symmetrize(const float* src, float* dst, int64_t groups, int64_t channels, int64_t kernel) {
  require<ShapeError>(src != dst, "skew_symmetrize cannot run in place");
  expect_device("skew_symmetrize", src, dst);
  const int64_t count = groups * channels * channels * kernel * kernel;
  if (count <= 0) return;
  skew_symmetrize_kernel<<<grid_for(count), kThreads, 0, stream()>>>(src, dst, groups, channels, kernel);
  ORTHOCONV_CUDA_LAUNCHED("skew_symmetrize_kernel");
}

void CudaBackend::power_iteration(const float* filter, PowerIterationState& state, int64_t groups, int64_t channels,
                                  int64_t kernel, int iterations, float* sigma, int32_t* which) {
  check_groups(groups, "power_iteration");
  const int64_t c = channels, k = kernel, group_size = c * c * k * k;
  const ReshapeVectors vectors = reshape_vectors(state, groups, c, k, "power_iteration");
  expect_device("power_iteration", filter);
  const int64_t chunks = (group_size + kReduceChunk - 1) / kReduceChunk;
  const int64_t longest_line = std::max(c * k * k, c * k);
  double* scratch = reduce_scratch_.as<double>(std::max(groups * longest_line, 4 * groups * chunks));
  cudaStream_t s = stream();

  for (int w = 0; w < 4; ++w) {
    const int64_t rows = reshape_rows(w, c, k), cols = reshape_cols(w, c, k);
    float* u = state.u[w].data();
    float* v = state.v[w].data();
    for (int it = 0; it < iterations; ++it) {
      reshape_matvec_kernel<<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(groups)), kLineThreads, 0, s>>>(
          filter, u, scratch, w, false, c, k);
      ORTHOCONV_CUDA_LAUNCHED("reshape_matvec_kernel");
      normalize_kernel<<<static_cast<unsigned>(groups), kThreads, 0, s>>>(scratch, v, rows);
      ORTHOCONV_CUDA_LAUNCHED("normalize_kernel");
      reshape_matvec_kernel<<<dim3(static_cast<unsigned>(cols), static_cast<unsigned>(groups)), kLineThreads, 0, s>>>(
          filter, v, scratch, w, true, c, k);
      ORTHOCONV_CUDA_LAUNCHED("reshape_matvec_kernel");
      normalize_kernel<<<static_cast<unsigned>(groups), kThreads, 0, s>>>(scratch, u, cols);
      ORTHOCONV_CUDA_LAUNCHED("normalize_kernel");
    }
  }

  sigma_partial_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(groups), 4), kThreads, 0, s>>>(
      filter, vectors, scratch, c, k, chunks);
  ORTHOCONV_CUDA_LAUNCHED("sigma_partial_kernel");
  auto* result = static_cast<char*>(result_scratch_.reserve(static_cast<size_t>(groups) * 12));
  auto* sigma_device = reinterpret_cast<double*>(result);
  auto* which_device = reinterpret_cast<int32_t*>(result + groups * 8);
  sigma_finish_kernel<<<static_cast<unsigned>(groups), kThreads, 0, s>>>(scratch, chunks, sigma_device, which_device);
  ORTHOCONV_CUDA_LAUNCHED("sigma_finish_kernel");

  std::vector<double> sigma_host(static_cast<size_t>(groups));
  ORTHOCONV_CUDA_CHECK(cudaMemcpyAsync(sigma_host.data(), sigma_device, static_cast<size_t>(groups) * sizeof(double),
                                       cudaMemcpyDeviceToHost, s));
  ORTHOCONV_CUDA_CHECK(
      cudaMemcpyAsync(which, which_device, static_cast<size_t>(groups) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
  ORTHOCONV_CUDA_CHECK(cudaStreamSynchronize(s));
  for (int64_t g = 0; g < groups; ++g) sigma[g] = static_cast<float>(sigma_host[static_cast<size_t>(g)]);
}

void CudaBackend::scale_groups(const float* filter, const float* scale, float* scaled, int64_t groups,
                               int64_t group_size) {
  if (group_size <= 0) return;
  expect_device("scale_groups", filter, scaled);
  for (int64_t first = 0; first < groups; first += kScaleChunk) {
    const int64_t n = std::min<int64_t>(kScaleChunk, groups - first);
    GroupScales chunk{};
    for (int64_t g = 0; g < n; ++g) chunk.value[g] = scale[first + g];
    const int64_t count = n * group_size, offset = first * group_size;
    scale_groups_kernel<<<grid_for(count), kThreads, 0, stream()>>>(filter + offset, chunk, scaled + offset, group_size,
                                                                    count);
    ORTHOCONV_CUDA_LAUNCHED("scale_groups_kernel");
  }
}

void CudaBackend::add_sigma_gradient(const PowerIterationState& state, const int32_t* which, const float* coefficient,
                                     float* diff_filter, int64_t groups, int64_t channels, int64_t kernel) {
  const int64_t c = channels, k = kernel, group_size = c * c * k * k;
  if (groups <= 0 || group_size <= 0) return;
  const ReshapeVectors vectors = reshape_vectors(state, groups, c, k, "add_sigma_gradient");
  expect_device("add_sigma_gradient", diff_filter);
  for (int64_t first = 0; first < groups; first += kSigmaChunk) {
    const int64_t n = std::min<int64_t>(kSigmaChunk, groups - first);
    SigmaGradientChunk chunk{};
    for (int64_t g = 0; g < n; ++g) {
      require<ShapeError>(which[first + g] >= 0 && which[first + g] < 4, "add_sigma_gradient: reshape index ",
                          which[first + g], " of group ", first + g, " is not in 0..3");
      chunk.which[g] = which[first + g];
      chunk.coefficient[g] = coefficient[first + g];
    }
    const int64_t count = n * group_size;
    add_sigma_gradient_kernel<<<grid_for(count), kThreads, 0, stream()>>>(vectors, chunk, first, diff_filter, c, k,
                                                                          count);
    ORTHOCONV_CUDA_LAUNCHED("add_sigma_gradient_kernel");
  }
}

void CudaBackend::group_dot(const float* a, const float* b, float* out, int64_t groups, int64_t group_size) {
  if (groups <= 0) return;
  check_groups(groups, "group_dot");
  expect_device("group_dot", a, b);
  const int64_t chunks = std::max<int64_t>(1, (group_size + kReduceChunk - 1) / kReduceChunk);
  double* partial = reduce_scratch_.as<double>(groups * chunks);
  double* sums = result_scratch_.as<double>(groups);
  cudaStream_t s = stream();
  dot_partial_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(groups)), kThreads, 0, s>>>(
      a, b, partial, group_size, chunks);
  ORTHOCONV_CUDA_LAUNCHED("dot_partial_kernel");
  sum_partials_kernel<<<static_cast<unsigned>(groups), kThreads, 0, s>>>(partial, chunks, sums);
  ORTHOCONV_CUDA_LAUNCHED("sum_partials_kernel");
  std::vector<double> host(static_cast<size_t>(groups));
  ORTHOCONV_CUDA_CHECK(
      cudaMemcpyAsync(host.data(), sums, static_cast<size_t>(groups) * sizeof(double), cudaMemcpyDeviceToHost, s));
  ORTHOCONV_CUDA_CHECK(cudaStreamSynchronize(s));
  for (int64_t g = 0; g < groups; ++g) out[g] = static_cast<float>(host[static_cast<size_t>(g)]);
}

}  // namespace orthoconv::cuda
