// The learning-rate schedule and SGD with momentum (PyTorch semantics). See include/orthoconv/trainer.hpp.
#include <cmath>

#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/trainer.hpp"

namespace orthoconv {

double scheduled_lr(const TrainConfig& config, int64_t step, int64_t total) {
  require(total > 0 && total <= kMaxTrainingSteps && step >= 0, "scheduled_lr: step ", step, " of ", total,
          " outside 0..", kMaxTrainingSteps);
  double lr = config.lr;
  for (double fraction : config.milestones) {
    // floor(total * fraction) computed exactly for the usual 1/2 and 3/4: (total * k) / d
    const int64_t milestone = fraction == 0.5    ? total / 2
                              : fraction == 0.75 ? (3 * total) / 4
                                                 : static_cast<int64_t>(std::floor(total * fraction));
    if (step >= milestone) lr *= config.lr_decay;
  }
  return lr;
}

Sgd::Sgd(LipConvnet& model) : model_(model), params_(model.parameters()) {
  for (NamedParameter& p : params_) momentum_.emplace_back(p.parameter->value.shape(), model.backend().device());
}

void Sgd::step(float lr, float momentum, float weight_decay) {
  Backend& be = model_.backend();
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter& p = *params_[i].parameter;
    be.sgd_momentum(p.value.data(), p.grad.data(), momentum_[i].data(), p.value.numel(), lr, momentum, weight_decay,
                    steps_ == 0);
  }
  ++steps_;
}

void Sgd::save(Checkpoint& out) {
  Backend& be = model_.backend();
  for (size_t i = 0; i < params_.size(); ++i) {
    CheckpointTensor t;
    t.shape = momentum_[i].shape().dims();
    t.values.resize(static_cast<size_t>(momentum_[i].numel()));
    be.to_host(momentum_[i].data(), t.values.data(), momentum_[i].numel());
    out.tensors["optimizer.momentum." + params_[i].name] = std::move(t);
  }
  out.metadata["optimizer"] = "sgd-momentum";
  out.metadata["optimizer.steps"] = std::to_string(steps_);
}

void Sgd::load(const Checkpoint& in, const std::string& file) {
  std::vector<const CheckpointTensor*> sources;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string name = "optimizer.momentum." + params_[i].name;
    auto it = in.tensors.find(name);
    if (it == in.tensors.end()) throw IoError("checkpoint " + file + ": missing tensor '" + name + "'");
    if (it->second.shape != momentum_[i].shape().dims() ||
        static_cast<int64_t>(it->second.values.size()) != momentum_[i].numel())
      throw IoError("checkpoint " + file + ": tensor '" + name + "' has shape " + Shape(it->second.shape).str() +
                    ", expected " + momentum_[i].shape().str());
    check_tensor_values(it->second, name, file);
    sources.push_back(&it->second);
  }
  const int64_t count = metadata_int(in, "optimizer.steps", file, 0, kMaxTrainingSteps);
  Backend& be = model_.backend();
  for (size_t i = 0; i < params_.size(); ++i)
    be.from_host(sources[i]->values.data(), momentum_[i].data(), momentum_[i].numel());
  steps_ = count;
}

}  // namespace orthoconv
