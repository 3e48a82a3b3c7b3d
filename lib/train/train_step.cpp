// One training step: forward, loss (+ certificate regularization), backward, the ranks' all-reduce, SGD update.
// See include/orthoconv/trainer.hpp.
#include <chrono>
#include <cmath>

#include "orthoconv/trainer.hpp"

namespace orthoconv {

namespace {

// The gradient of -gamma * mean relu(r_n), r_n = (f_y - f_j*) / (sqrt2 L), with c = gamma / (batch sqrt2 L):
// d/df_y = -c and d/df_j* = +c (j* the runner-up) where r_n > 0, zero elsewhere. logits: host [n, classes].
void regularizer_gradient(const std::vector<float>& logits, const std::vector<int32_t>& labels, int64_t classes,
                          double c, std::vector<float>& gradient) {
  const int64_t n = static_cast<int64_t>(labels.size());
  gradient.assign(static_cast<size_t>(n * classes), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* f = logits.data() + i * classes;
    const int32_t y = labels[static_cast<size_t>(i)];
    int64_t runner = y == 0 ? 1 : 0;
    for (int64_t j = 0; j < classes; ++j)
      if (j != y && f[j] > f[runner]) runner = j;
    if (static_cast<double>(f[y]) - static_cast<double>(f[runner]) > 0.0) {
      gradient[static_cast<size_t>(i * classes + y)] = static_cast<float>(-c);
      gradient[static_cast<size_t>(i * classes + runner)] = static_cast<float>(c);
    }
  }
}

// The global batch's statistics on every rank (a non-finite loss anywhere stops every rank at this step): stats
// summed over the ranks in place. Returns the all-reduce's wall time.
double allreduce_statistics(Communicator& communicator, StepStats& stats) {
  const auto start = std::chrono::steady_clock::now();
  double sums[3] = {stats.loss_sum, static_cast<double>(stats.correct), static_cast<double>(stats.images)};
  communicator.allreduce_sum(sums, 3);
  stats.loss_sum = sums[0];
  stats.correct = static_cast<int64_t>(sums[1]);
  stats.images = static_cast<int64_t>(sums[2]);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

TrainStep::TrainStep(LipConvnet& model, Sgd& optimizer, double gamma, double input_lipschitz,
                     std::shared_ptr<Communicator> communicator)
    : model_(model),
      optimizer_(optimizer),
      gamma_(gamma),
      lipschitz_(input_lipschitz),
      communicator_(communicator ? std::move(communicator) : single_process_communicator()) {
  const Device device = model.backend().device();
  if (device != Device::cpu) {
    device_images_ = Tensor(Shape{1}, device);
    logits_ = Tensor(Shape{1}, device);
    diff_logits_ = Tensor(Shape{1}, device);
    regularizer_ = Tensor(Shape{1}, device);
  }
  if (communicator_->size() > 1) {
    params_ = model.parameters();
    flat_gradient_ = Tensor(Shape{allreduce_floats()}, device);
  }
}

int64_t TrainStep::allreduce_floats() const {
  int64_t total = 0;
  for (const NamedParameter& p : params_) total += p.parameter->value.numel();
  return total;
}

// The gradient of the global batch: every parameter's gradient packed into one flat buffer, one all-reduce (MPI on
// host memory, NCCL on CUDA memory), unpacked. One collective per step rather than one per tensor (~70 for
// LipConvnet-15): the per-call latency is paid once.
void TrainStep::allreduce_gradients() {
  Backend& be = model_.backend();
  float* flat = flat_gradient_.data();
  int64_t offset = 0;
  for (NamedParameter& p : params_) {
    require<ShapeError>(p.parameter->grad.numel() == p.parameter->value.numel(), "all-reduce: the gradient of ", p.name,
                        " has ", p.parameter->grad.numel(), " values for ", p.parameter->value.numel(), " weights");
    be.copy(p.parameter->grad.data(), flat + offset, p.parameter->grad.numel());
    offset += p.parameter->grad.numel();
  }
  communicator_->allreduce_sum(flat, offset, be.device());
  offset = 0;
  for (NamedParameter& p : params_) {
    be.copy(flat + offset, p.parameter->grad.data(), p.parameter->grad.numel());
    offset += p.parameter->grad.numel();
  }
}

StepStats TrainStep::run(const Tensor& images, const std::vector<int32_t>& labels, float lr, float momentum,
                         float weight_decay, int64_t batch_images) {
  Backend& be = model_.backend();
  const int64_t n = images.dim(0), classes = model_.config().classes;
  require<ShapeError>(static_cast<int64_t>(labels.size()) == n, "training step: ", labels.size(), " labels for ", n,
                      " images");
  const int64_t batch = batch_images > 0 ? batch_images : n;  // the global batch
  const bool distributed = communicator_->size() > 1;
  require(distributed ? n > 0 && n <= batch : n == batch, "training step: a part of ", n, " images of a batch of ",
          batch, " on ", communicator_->size(), " rank(s)");
  const Tensor* input = &images;
  if (be.device() != images.device()) {
    device_images_.resize(images.shape());
    be.from_host(images.data(), device_images_.data(), images.numel());
    input = &device_images_;
  }
  model_.forward(*input, logits_);
  diff_logits_.resize(Shape{n, classes});
  StepStats stats;
  stats.images = n;
  be.softmax_cross_entropy(logits_.data(), labels.data(), n, classes, diff_logits_.data(), &stats.loss_sum,
                           &stats.correct);
  using Clock = std::chrono::steady_clock;
  if (distributed) {
    allreduce_seconds_ += allreduce_statistics(*communicator_, stats);
    require(stats.images == batch, "training step: the ranks' parts hold ", stats.images, " images, the batch ", batch);
    // softmax_cross_entropy's gradient is of this part's mean loss: d(global mean)/d logits is n / batch of it.
    if (n != batch)
      be.axpby(static_cast<float>(n) / static_cast<float>(batch), diff_logits_.data(), 0.0f, diff_logits_.data(),
               n * classes);
  }
  if (!std::isfinite(stats.loss_sum)) return stats;  // the caller stops; nothing is updated

  if (gamma_ > 0) {
    host_logits_.resize(static_cast<size_t>(n * classes));
    be.to_host(logits_.data(), host_logits_.data(), n * classes);
    const double c = gamma_ / (static_cast<double>(batch) * std::sqrt(2.0) * lipschitz_);
    regularizer_gradient(host_logits_, labels, classes, c, host_regularizer_);
    regularizer_.resize(Shape{n, classes});
    be.from_host(host_regularizer_.data(), regularizer_.data(), n * classes);
    be.axpby(1.0f, regularizer_.data(), 1.0f, diff_logits_.data(), n * classes);
  }
  model_.zero_grad();
  model_.backward(diff_logits_);
  if (distributed) {
    be.synchronize();  // the backward pass is done: what follows is the all-reduce's time
    const auto start = Clock::now();
    allreduce_gradients();
    be.synchronize();
    allreduce_seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
  }
  optimizer_.step(lr, momentum, weight_decay);
  return stats;
}

}  // namespace orthoconv
