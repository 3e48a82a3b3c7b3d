// orthoconv/layer.hpp: what every layer is.
//
// A Layer maps an NCHW float32 tensor to another. forward() remembers what backward() needs (so backward must
// follow the forward of the same input); backward() returns the input gradient and ADDS each parameter's
// gradient into Parameter::grad (call zero_grad() between steps). Training and evaluation mode are explicit
// (set_training); they change the SOC series length and the power-iteration schedule.
// Buffers are kept between calls and reallocated only when the batch shape grows.
// set_parameter_gradients(false) makes backward() compute the input gradient only and leave every
// Parameter::grad untouched (attacks, Jacobians, saliency): cheaper, and after an evaluation-mode SocConv
// forward it spares recomputing the series (soc_conv.hpp, "Memory").
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "orthoconv/backend.hpp"
#include "orthoconv/tensor.hpp"

namespace orthoconv {

struct Parameter {
  std::string name;  // e.g. "weight" ([g, C, C, k, k]) or "bias" ([c_out])
  Tensor value;
  Tensor grad;  // same shape as value
};

// Non-trainable state saved in checkpoints (power-iteration vectors).
struct Buffer {
  std::string name;
  Tensor* tensor;
};

class Layer {
 public:
  virtual ~Layer() = default;
  virtual std::string kind() const = 0;      // "soc", "gs-soc", "channel-shuffle", "maxmin", ...
  virtual std::string describe() const = 0;  // one line for tables
  virtual Shape output_shape(const Shape& input) const = 0;
  virtual void forward(const Tensor& input, Tensor& output) = 0;
  virtual void backward(const Tensor& diff_output, Tensor& diff_input) = 0;

  virtual std::vector<Parameter*> parameters() { return {}; }
  virtual std::vector<Buffer> buffers() { return {}; }
  virtual void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }
  virtual void set_parameter_gradients(bool enabled) { parameter_gradients_ = enabled; }
  bool parameter_gradients() const { return parameter_gradients_; }
  void zero_grad();
  int64_t parameter_count();

 protected:
  bool training_ = true;
  bool parameter_gradients_ = true;
};

}  // namespace orthoconv
