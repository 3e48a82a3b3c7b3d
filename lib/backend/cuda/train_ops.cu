// Training primitives on the GPU: softmax cross-entropy (loss, gradient, accuracy) and the SGD-momentum update.
// The twin of backend/cpu/train_ops.cpp, with the same arithmetic: each row in double, the first arg-max as the
// prediction, the per-row losses summed on the host in row order.
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernel_utils.cuh"

namespace orthoconv::cuda {

namespace {

constexpr int kLabelChunk = 512;  // rows per launch: their labels travel as a kernel parameter
constexpr int kRowThreads = 128;

struct LabelChunk {
  int32_t label[kLabelChunk];
};

// One block per row r of [first_row + blockIdx.x]: m = max_j x_j (first arg-max), lse = m + log sum exp(x_j - m),
// loss = lse - x_y, d_j = (exp(x_j - lse) - [j == y]) / batch. Writes row_loss[r] and row_correct[r].
__global__ void softmax_cross_entropy_kernel(const float* logits, LabelChunk labels, int64_t first_row, int64_t classes,
                                             double inverse_batch, float* diff_logits, double* row_loss,
                                             int32_t* row_correct) {
  const int64_t r = first_row + blockIdx.x;
  const float* x = logits + r * classes;
  float* d = diff_logits + r * classes;
  const int32_t y = labels.label[blockIdx.x];

  // First arg-max: the larger value wins, equal values the smaller index (a NaN never wins a comparison; the
  // CPU's sequential scan may differ then, but a NaN row's loss is NaN and it never counts as correct).
  __shared__ float best_value[kRowThreads];
  __shared__ int64_t best_index[kRowThreads];
  float top = x[0];
  int64_t arg = 0;
  for (int64_t j = threadIdx.x; j < classes; j += blockDim.x)
    if (x[j] > top || (x[j] == top && j < arg)) {
      top = x[j];
      arg = j;
    }
  best_value[threadIdx.x] = top;
  best_index[threadIdx.x] = arg;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      const float other = best_value[threadIdx.x + half];
      const int64_t other_index = best_index[threadIdx.x + half];
      const float mine = best_value[threadIdx.x];
      if (other > mine || (other == mine && other_index < best_index[threadIdx.x])) {
        best_value[threadIdx.x] = other;
        best_index[threadIdx.x] = other_index;
      }
    }
    __syncthreads();
  }
  const double m = best_value[0];
  const int64_t prediction = best_index[0];

  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < classes; j += blockDim.x) sum += exp(static_cast<double>(x[j]) - m);
  sum = block_sum(sum);
  __shared__ double lse;
  if (threadIdx.x == 0) lse = m + log(sum);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < classes; j += blockDim.x) {
    const double p = exp(static_cast<double>(x[j]) - lse);
    d[j] = static_cast<float>((p - (j == y ? 1.0 : 0.0)) * inverse_batch);
  }
  if (threadIdx.x == 0) {
    row_loss[r] = lse - static_cast<double>(x[y]);
    row_correct[r] = isfinite(lse) && prediction == y ? 1 : 0;
  }
}

__global__ void sgd_momentum_kernel(float* param, const float* grad, float* momentum, int64_t count, float lr,
                                    float momentum_coef, float weight_decay, bool first_step) {
  ORTHOCONV_GRID_STRIDE_LOOP(i, count) {
    const float d = grad[i] + weight_decay * param[i];
    const float buf = first_step ? d : momentum_coef * momentum[i] + d;
    momentum[i] = buf;
    param[i] -= lr * buf;
  }
}

}  // namespace

void CudaBackend::softmax_cross_entropy(const float* logits, const int32_t* labels, int64_t batch, int64_t classes,
                                        float* diff_logits, double* loss_sum, int64_t* correct) {
  require(batch > 0 && classes > 0, "softmax_cross_entropy needs a non-empty batch and classes, got ", batch, " x ",
          classes);
  for (int64_t b = 0; b < batch; ++b)
    require(labels[b] >= 0 && labels[b] < classes, "softmax_cross_entropy: label ", labels[b], " of image ", b,
            " is outside [0, ", classes, ")");
  expect_device("softmax_cross_entropy", logits, diff_logits);
  auto* rows = static_cast<char*>(result_scratch_.reserve(static_cast<size_t>(batch) * 12));
  auto* row_loss = reinterpret_cast<double*>(rows);
  auto* row_correct = reinterpret_cast<int32_t*>(rows + batch * 8);
  cudaStream_t s = stream();
  const double inverse_batch = 1.0 / static_cast<double>(batch);
  for (int64_t first = 0; first < batch; first += kLabelChunk) {
    const int64_t n = std::min<int64_t>(kLabelChunk, batch - first);
    LabelChunk chunk{};
    for (int64_t b = 0; b < n; ++b) chunk.label[b] = labels[first + b];
    softmax_cross_entropy_kernel<<<static_cast<unsigned>(n), kRowThreads, 0, s>>>(
        logits, chunk, first, classes, inverse_batch, diff_logits, row_loss, row_correct);
    ORTHOCONV_CUDA_LAUNCHED("softmax_cross_entropy_kernel");
  }
  std::vector<double> loss(static_cast<size_t>(batch));
  std::vector<int32_t> right(static_cast<size_t>(batch));
  ORTHOCONV_CUDA_CHECK(
      cudaMemcpyAsync(loss.data(), row_loss, static_cast<size_t>(batch) * sizeof(double), cudaMemcpyDeviceToHost, s));
  ORTHOCONV_CUDA_CHECK(cudaMemcpyAsync(right.data(), row_correct, static_cast<size_t>(batch) * sizeof(int32_t),
                                       cudaMemcpyDeviceToHost, s));
  ORTHOCONV_CUDA_CHECK(cudaStreamSynchronize(s));
  double total = 0.0;
  int64_t count = 0;
  for (int64_t b = 0; b < batch; ++b) {
    total += loss[static_cast<size_t>(b)];
    count += right[static_cast<size_t>(b)];
  }
  *loss_sum += total;
  *correct += count;
}

void CudaBackend::sgd_momentum(float* param, const float* grad, float* momentum, int64_t count, float lr,
                               float momentum_coef, float weight_decay, bool first_step) {
  if (count <= 0) return;
  expect_device("sgd_momentum", param, grad, momentum);
  sgd_momentum_kernel<<<grid_for(count), kThreads, 0, stream()>>>(param, grad, momentum, count, lr, momentum_coef,
                                                                  weight_decay, first_step);
  ORTHOCONV_CUDA_LAUNCHED("sgd_momentum_kernel");
}

}  // namespace orthoconv::cuda
