// orthoconv/maxmin.hpp: the MaxMin activation (gradient-norm preserving, 1-Lipschitz).
//
// Plain, on n channels (n even): A = x[:, :n/2], B = x[:, n/2:], output [min(A, B), max(A, B)].
// Paired: on channel pairs (2i, 2i+1): output 2i = min, 2i+1 = max.
// Ties send the gradient of min to the first input and of max to the second, so the Jacobian stays a
// permutation.
#pragma once

#include "orthoconv/layer.hpp"

namespace orthoconv {

class MaxMin : public Layer {
 public:
  explicit MaxMin(bool paired = false, std::shared_ptr<Backend> backend = cpu_backend());
  std::string kind() const override { return paired_ ? "maxmin-paired" : "maxmin"; }
  std::string describe() const override { return kind(); }
  bool paired() const { return paired_; }
  Shape output_shape(const Shape& input) const override;
  void forward(const Tensor& input, Tensor& output) override;
  void backward(const Tensor& diff_output, Tensor& diff_input) override;

 private:
  bool paired_;
  std::shared_ptr<Backend> backend_;
  Tensor input_;
};

}  // namespace orthoconv
