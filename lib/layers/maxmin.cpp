#include "orthoconv/maxmin.hpp"

namespace orthoconv {

MaxMin::MaxMin(bool paired, std::shared_ptr<Backend> backend) : paired_(paired), backend_(std::move(backend)) {}

Shape MaxMin::output_shape(const Shape& input) const {
  require<ShapeError>(input.rank() == 4, "MaxMin expects an NCHW input, got shape ", input.str());
  require<ShapeError>(input[1] % 2 == 0 && input[1] > 0, "MaxMin needs an even, positive channel count, got shape ",
                      input.str());
  return input;
}

void MaxMin::forward(const Tensor& input, Tensor& output) {
  output.resize(output_shape(input.shape()), backend_->device());
  input_.resize(input.shape(), backend_->device());
  backend_->copy(input.data(), input_.data(), input.numel());
  backend_->maxmin_forward(input.data(), output.data(), input.dim(0), input.dim(1), input.dim(2) * input.dim(3),
                           paired_);
}

void MaxMin::backward(const Tensor& diff_output, Tensor& diff_input) {
  check_shape(diff_output, input_.shape(), "MaxMin::backward diff_output");
  diff_input.resize(input_.shape(), backend_->device());
  backend_->maxmin_backward(input_.data(), diff_output.data(), diff_input.data(), input_.dim(0), input_.dim(1),
                            input_.dim(2) * input_.dim(3), paired_);
}

}  // namespace orthoconv
