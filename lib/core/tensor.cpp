// Tensor and Shape: host bookkeeping; device memory comes from the device's allocator.
#include "orthoconv/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <numeric>
#include <sstream>

#include "core/device_memory.hpp"

namespace orthoconv {

std::string device_name(Device device) { return device == Device::cpu ? "cpu" : "cuda"; }

Device parse_device(const std::string& text) {
  if (text == "cpu") return Device::cpu;
  if (text == "cuda") return Device::cuda;
  throw SettingError({"device"}, "{0} must be 'cpu' or 'cuda', got '" + text + "'");
}

Shape::Shape(std::initializer_list<int64_t> dims) : dims_(dims) {
  for (int64_t d : dims_) require<ShapeError>(d >= 0, "negative dimension ", d, " in shape ", str());
}

Shape::Shape(std::vector<int64_t> dims) : dims_(std::move(dims)) {
  for (int64_t d : dims_) require<ShapeError>(d >= 0, "negative dimension ", d, " in shape ", str());
}

int64_t Shape::numel() const { return std::accumulate(dims_.begin(), dims_.end(), int64_t{1}, std::multiplies<>()); }

std::string Shape::str() const {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < dims_.size(); ++i) out << (i ? ", " : "") << dims_[i];
  out << ']';
  return out.str();
}

Tensor::Tensor(Shape shape, Device device) : shape_(std::move(shape)), device_(device) {
  capacity_ = shape_.numel();
  storage_ = detail::allocate_floats(device_, std::max<int64_t>(capacity_, 1));
  data_ = storage_.get();
  detail::zero_floats(device_, data_, capacity_);
}

Tensor Tensor::view(float* data, Shape shape, Device device) {
  require<ShapeError>(data != nullptr || shape.numel() == 0, "Tensor::view of a null buffer with shape ", shape.str());
  Tensor t;
  t.shape_ = std::move(shape);
  t.device_ = device;
  t.capacity_ = t.shape_.numel();
  t.data_ = data;
  return t;
}

void Tensor::resize(const Shape& shape) {
  if (shape.numel() > capacity_) {
    require<ShapeError>(storage_ != nullptr || data_ == nullptr, "cannot grow a view from ", shape_.str(), " to ",
                        shape.str());
    capacity_ = shape.numel();
    storage_ = detail::allocate_floats(device_, capacity_);
    data_ = storage_.get();
    detail::zero_floats(device_, data_, capacity_);
  }
  shape_ = shape;
}

void Tensor::resize(const Shape& shape, Device device) {
  if (device != device_) {
    require<ShapeError>(storage_ != nullptr || data_ == nullptr, "cannot move a view of ", device_name(device_),
                        " memory to ", device_name(device));
    storage_.reset();
    data_ = nullptr;
    capacity_ = 0;
    device_ = device;
  }
  resize(shape);
}

Tensor Tensor::reshaped(const Shape& shape) const {
  require<ShapeError>(shape.numel() == numel(), "cannot reshape ", shape_.str(), " to ", shape.str());
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

float& Tensor::at(int64_t index) {
  require<ShapeError>(device_ == Device::cpu, "Tensor::at needs a CPU tensor");
  require<ShapeError>(index >= 0 && index < numel(), "index ", index, " out of range for ", shape_.str());
  return data_[index];
}

float Tensor::at(int64_t index) const { return const_cast<Tensor*>(this)->at(index); }

std::vector<float> Tensor::to_vector() const {
  std::vector<float> out(static_cast<size_t>(numel()));
  detail::copy_to_host(device_, data_, out.data(), numel());
  return out;
}

Tensor Tensor::from_vector(const std::vector<float>& values, Shape shape) {
  require<ShapeError>(static_cast<int64_t>(values.size()) == shape.numel(), "from_vector: ", values.size(),
                      " values for shape ", shape.str());
  Tensor t(std::move(shape));
  std::memcpy(t.data(), values.data(), values.size() * sizeof(float));
  return t;
}

void check_shape(const Tensor& tensor, const Shape& expected, const std::string& what) {
  require<ShapeError>(tensor.shape() == expected, what, ": expected shape ", expected.str(), ", got ",
                      tensor.shape().str());
}

}  // namespace orthoconv
