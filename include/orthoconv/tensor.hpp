// orthoconv/tensor.hpp: a small float32 tensor, NCHW, owning its memory or viewing a user's buffer.
//
// Shapes are at most 5-D (filters are [groups, C_out, C_in, k, k]); activations are always NCHW.
// The device tag says where the data lives; the backend of that device owns allocation. Copying a
// Tensor copies the handle (shared ownership), not the data: use Backend::copy for data.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "orthoconv/error.hpp"

namespace orthoconv {

enum class Device { cpu, cuda };

// "cpu" | "cuda", and back: the one pair that names devices (config.json, --device). parse_device throws
// SettingError naming the setting "device" for any other text.
std::string device_name(Device device);
Device parse_device(const std::string& text);

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  explicit Shape(std::vector<int64_t> dims);

  int rank() const { return static_cast<int>(dims_.size()); }
  int64_t operator[](int axis) const { return dims_.at(static_cast<size_t>(axis)); }
  int64_t numel() const;
  const std::vector<int64_t>& dims() const { return dims_; }
  bool operator==(const Shape& other) const { return dims_ == other.dims_; }
  bool operator!=(const Shape& other) const { return !(*this == other); }
  std::string str() const;  // "[128, 32, 32, 32]"

 private:
  std::vector<int64_t> dims_;
};

class Tensor {
 public:
  Tensor() = default;
  // An owning tensor, zero-filled, on `device`.
  Tensor(Shape shape, Device device = Device::cpu);
  // A view of a user's buffer; the caller keeps it alive for the tensor's lifetime.
  static Tensor view(float* data, Shape shape, Device device = Device::cpu);

  const Shape& shape() const { return shape_; }
  int64_t numel() const { return shape_.numel(); }
  int64_t dim(int axis) const { return shape_[axis]; }
  Device device() const { return device_; }
  bool empty() const { return data_ == nullptr; }
  bool owns_memory() const { return storage_ != nullptr; }
  // Floats of owned storage (at least numel(): resize() grows it and never shrinks it); 0 for a view.
  int64_t storage_floats() const { return storage_ ? capacity_ : 0; }

  float* data() { return data_; }
  const float* data() const { return data_; }

  // Reallocates only when the element count grows beyond the current storage (no allocation in the
  // steady state). Views cannot be resized to a larger size.
  void resize(const Shape& shape);
  // The same, and moves the tensor to `device` first when it is elsewhere (an owning tensor's old contents are
  // dropped; a view on another device throws). Layers size their outputs and buffers with this, so a
  // default-constructed Tensor lands on the layer's device.
  void resize(const Shape& shape, Device device);
  // Same memory, another shape with the same element count.
  Tensor reshaped(const Shape& shape) const;

  // Host-side access, CPU tensors only.
  float& at(int64_t index);
  float at(int64_t index) const;
  std::vector<float> to_vector() const;
  static Tensor from_vector(const std::vector<float>& values, Shape shape);

 private:
  Shape shape_;
  Device device_ = Device::cpu;
  std::shared_ptr<float> storage_;
  int64_t capacity_ = 0;
  float* data_ = nullptr;
};

// Throws ShapeError naming `what` when `actual` differs from `expected`.
void check_shape(const Tensor& tensor, const Shape& expected, const std::string& what);

}  // namespace orthoconv
