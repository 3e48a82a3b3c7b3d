// LinearNormalized (the `lln` head): y_i = q_i . x + b_i with q_i = w_i / max(||w_i||, 1e-12).
// Forward and backward side by side; host loops in double accumulation (classes x F is small: 100 x 1024).
//
// Backward, for one row i (dropping the index): with g = dL/dq = sum_n dy_n x_n and r = ||w||,
//   dL/dw = (g - q (q . g)) / r        (the Jacobian of w -> w / ||w|| is (I - q q^T) / r),
//   dL/dx_n = sum_i dy_ni q_i,  dL/db_i = sum_n dy_ni.
#include <cmath>
#include <random>
#include <sstream>

#include "orthoconv/model.hpp"

namespace orthoconv {

namespace {
constexpr double kNormFloor = 1e-12;
}

LinearNormalized::LinearNormalized(int64_t features, int64_t classes, uint64_t seed, std::shared_ptr<Backend> backend)
    : features_(features), classes_(classes), backend_(std::move(backend)) {
  require(features > 0 && classes > 0, "LinearNormalized needs positive sizes, got ", features, " -> ", classes);
  // nn.Linear's default: U(-1/sqrt(F), 1/sqrt(F)) for the weight and the bias.
  std::mt19937_64 rng(seed);
  const float bound = 1.0f / std::sqrt(static_cast<float>(features));
  std::uniform_real_distribution<float> uniform(-bound, bound);
  std::vector<float> w(static_cast<size_t>(classes * features)), b(static_cast<size_t>(classes));
  for (float& x : w) x = uniform(rng);
  for (float& x : b) x = uniform(rng);
  weight_.name = "weight";
  weight_.value = Tensor(Shape{classes, features}, backend_->device());
  weight_.grad = Tensor(Shape{classes, features}, backend_->device());
  backend_->from_host(w.data(), weight_.value.data(), weight_.value.numel());
  bias_.name = "bias";
  bias_.value = Tensor(Shape{classes}, backend_->device());
  bias_.grad = Tensor(Shape{classes}, backend_->device());
  backend_->from_host(b.data(), bias_.value.data(), classes);
}

std::string LinearNormalized::describe() const {
  std::ostringstream out;
  out << "lln " << features_ << "->" << classes_ << " (unit-norm rows, bias)";
  return out.str();
}

Shape LinearNormalized::output_shape(const Shape& input) const {
  require<ShapeError>(input.rank() == 4 && input[1] == features_ && input[2] == 1 && input[3] == 1 && input[0] > 0,
                      "LinearNormalized expects [N, ", features_, ", 1, 1], got ", input.str());
  return Shape{input[0], classes_, 1, 1};
}

std::vector<double> LinearNormalized::normalized_rows() {
  std::vector<float> w(static_cast<size_t>(classes_ * features_));
  backend_->to_host(weight_.value.data(), w.data(), weight_.value.numel());
  std::vector<double> q(w.size());
  for (int64_t i = 0; i < classes_; ++i) {
    const float* row = w.data() + i * features_;
    double norm = 0.0;
    for (int64_t f = 0; f < features_; ++f) norm += static_cast<double>(row[f]) * row[f];
    norm = std::max(std::sqrt(norm), kNormFloor);
    for (int64_t f = 0; f < features_; ++f) q[static_cast<size_t>(i * features_ + f)] = row[f] / norm;
  }
  return q;
}

void LinearNormalized::forward(const Tensor& input, Tensor& output) {
  const Shape out_shape = output_shape(input.shape());
  input_shape_ = input.shape();
  const int64_t n = input.dim(0);
  host_w_.resize(static_cast<size_t>(classes_ * features_));
  host_x_.resize(static_cast<size_t>(n * features_));
  host_y_.resize(static_cast<size_t>(n * classes_));
  std::vector<float> bias(static_cast<size_t>(classes_));
  backend_->to_host(weight_.value.data(), host_w_.data(), weight_.value.numel());
  backend_->to_host(input.data(), host_x_.data(), input.numel());
  backend_->to_host(bias_.value.data(), bias.data(), classes_);
  norms_.assign(static_cast<size_t>(classes_), 0.0);
  for (int64_t i = 0; i < classes_; ++i) {
    const float* row = host_w_.data() + i * features_;
    double norm = 0.0;
    for (int64_t f = 0; f < features_; ++f) norm += static_cast<double>(row[f]) * row[f];
    norms_[static_cast<size_t>(i)] = std::max(std::sqrt(norm), kNormFloor);
  }
#pragma omp parallel for schedule(static) if (n * classes_ * features_ > 262144)
  for (int64_t s = 0; s < n; ++s)
    for (int64_t i = 0; i < classes_; ++i) {
      const float* row = host_w_.data() + i * features_;
      const float* x = host_x_.data() + s * features_;
      double dot = 0.0;
      for (int64_t f = 0; f < features_; ++f) dot += static_cast<double>(row[f]) * x[f];
      host_y_[static_cast<size_t>(s * classes_ + i)] =
          static_cast<float>(dot / norms_[static_cast<size_t>(i)] + bias[static_cast<size_t>(i)]);
    }
  output.resize(out_shape);
  backend_->from_host(host_y_.data(), output.data(), output.numel());
}

void LinearNormalized::backward(const Tensor& diff_output, Tensor& diff_input) {
  require<ShapeError>(!input_shape_.dims().empty(), "LinearNormalized::backward called before forward");
  check_shape(diff_output, output_shape(input_shape_), "LinearNormalized::backward diff_output");
  const int64_t n = input_shape_[0];
  host_dy_.resize(static_cast<size_t>(n * classes_));
  host_dx_.resize(static_cast<size_t>(n * features_));
  host_g_.resize(static_cast<size_t>(classes_ * features_));
  backend_->to_host(diff_output.data(), host_dy_.data(), diff_output.numel());

  // dx_n = sum_i dy_ni q_i
#pragma omp parallel for schedule(static) if (n * classes_ * features_ > 262144)
  for (int64_t s = 0; s < n; ++s) {
    float* dx = host_dx_.data() + s * features_;
    for (int64_t f = 0; f < features_; ++f) {
      double acc = 0.0;
      for (int64_t i = 0; i < classes_; ++i)
        acc += static_cast<double>(host_dy_[static_cast<size_t>(s * classes_ + i)]) *
               host_w_[static_cast<size_t>(i * features_ + f)] / norms_[static_cast<size_t>(i)];
      dx[f] = static_cast<float>(acc);
    }
  }
  if (parameter_gradients_) add_parameter_gradients(n);

  diff_input.resize(input_shape_);
  backend_->from_host(host_dx_.data(), diff_input.data(), diff_input.numel());
}

void LinearNormalized::add_parameter_gradients(int64_t n) {
  // dW_i = (g_i - q_i (q_i . g_i)) / r_i,  g_i = sum_n dy_ni x_n;  db_i = sum_n dy_ni.
  std::vector<float> dbias(static_cast<size_t>(classes_));
#pragma omp parallel for schedule(static) if (n * classes_ * features_ > 262144)
  for (int64_t i = 0; i < classes_; ++i) {
    const double r = norms_[static_cast<size_t>(i)];
    const float* w = host_w_.data() + i * features_;
    std::vector<double> g(static_cast<size_t>(features_), 0.0);
    double db = 0.0;
    for (int64_t s = 0; s < n; ++s) {
      const double dy = host_dy_[static_cast<size_t>(s * classes_ + i)];
      db += dy;
      const float* x = host_x_.data() + s * features_;
      for (int64_t f = 0; f < features_; ++f) g[static_cast<size_t>(f)] += dy * x[f];
    }
    double qg = 0.0;
    for (int64_t f = 0; f < features_; ++f) qg += w[f] / r * g[static_cast<size_t>(f)];
    for (int64_t f = 0; f < features_; ++f)
      host_g_[static_cast<size_t>(i * features_ + f)] =
          static_cast<float>((g[static_cast<size_t>(f)] - w[f] / r * qg) / r);
    dbias[static_cast<size_t>(i)] = static_cast<float>(db);
  }
  // Parameter gradients accumulate (Layer contract): stage on the host, then add on the device.
  if (staged_w_.empty()) {
    staged_w_ = Tensor(weight_.value.shape(), backend_->device());
    staged_b_ = Tensor(bias_.value.shape(), backend_->device());
  }
  backend_->from_host(host_g_.data(), staged_w_.data(), staged_w_.numel());
  backend_->axpby(1.0f, staged_w_.data(), 1.0f, weight_.grad.data(), staged_w_.numel());
  backend_->from_host(dbias.data(), staged_b_.data(), classes_);
  backend_->axpby(1.0f, staged_b_.data(), 1.0f, bias_.grad.data(), classes_);
}

}  // namespace orthoconv
