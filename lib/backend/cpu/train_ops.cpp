// Training primitives of the CPU backend: softmax cross-entropy (loss, gradient, accuracy) and the SGD-momentum
// update. Both are tiny next to the convolutions; they are written as plain loops.
#include <cmath>
#include <limits>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

// Per row, in double: m = max_j x_j, lse = m + log sum_j exp(x_j - m), loss = lse - x_y,
// d x_j = (exp(x_j - lse) - [j == y]) / batch. The first arg-max is the prediction.
void CpuBackend::softmax_cross_entropy(const float* logits, const int32_t* labels, int64_t batch, int64_t classes,
                                       float* diff_logits, double* loss_sum, int64_t* correct) {
  require(batch > 0 && classes > 0, "softmax_cross_entropy needs a non-empty batch and classes, got ", batch, " x ",
          classes);
  for (int64_t b = 0; b < batch; ++b)
    require(labels[b] >= 0 && labels[b] < classes, "softmax_cross_entropy: label ", labels[b], " of image ", b,
            " is outside [0, ", classes, ")");
  double total = 0.0;
  int64_t right = 0;
  const double inverse_batch = 1.0 / static_cast<double>(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const float* x = logits + b * classes;
    float* d = diff_logits + b * classes;
    int64_t arg = 0;
    double top = x[0];
    for (int64_t j = 1; j < classes; ++j)
      if (x[j] > top) {  // strict: the first maximum wins
        top = x[j];
        arg = j;
      }
    double sum = 0.0;
    for (int64_t j = 0; j < classes; ++j) sum += std::exp(static_cast<double>(x[j]) - top);
    const double lse = top + std::log(sum);
    const int32_t y = labels[b];
    total += lse - static_cast<double>(x[y]);
    for (int64_t j = 0; j < classes; ++j) {
      double p = std::exp(static_cast<double>(x[j]) - lse);
      d[j] = static_cast<float>((p - (j == y ? 1.0 : 0.0)) * inverse_batch);
    }
    bool finite = std::isfinite(lse);
    if (finite && arg == y) ++right;
  }
  *loss_sum += total;
  *correct += right;
}

void CpuBackend::sgd_momentum(float* param, const float* grad, float* momentum, int64_t count, float lr,
                              float momentum_coef, float weight_decay, bool first_step) {
  if (first_step) {
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) {
      const float d = grad[i] + weight_decay * param[i];
      momentum[i] = d;
      param[i] -= lr * d;
    }
  } else {
#pragma omp parallel for schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) {
      const float d = grad[i] + weight_decay * param[i];
      const float buf = momentum_coef * momentum[i] + d;
      momentum[i] = buf;
      param[i] -= lr * buf;
    }
  }
}

}  // namespace orthoconv::cpu
