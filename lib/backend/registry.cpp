// Which backend serves which device; ConvShape and MatmulShape helpers; the layers' shared buffers.
#include <sstream>

#include "orthoconv/backend.hpp"
#include "orthoconv/cuda_options.hpp"
#ifdef ORTHOCONV_WITH_DNNL
#include "backend/cpu/cpu_backend.hpp"
#endif

namespace orthoconv {

ConvPrecision parse_conv_precision(const std::string& text) {
  if (text == "fp32") return ConvPrecision::fp32;
  if (text == "tf32") return ConvPrecision::tf32;
  if (text == "bf16") return ConvPrecision::bf16;
  throw SettingError({"precision"}, "{0} must be 'fp32', 'tf32' or 'bf16', got '" + text + "'");
}

std::string conv_precision_name(ConvPrecision precision) {
  switch (precision) {
    case ConvPrecision::tf32:
      return "tf32";
    case ConvPrecision::bf16:
      return "bf16";
    default:
      return "fp32";
  }
}

bool ConvShape::operator==(const ConvShape& o) const {
  return batch == o.batch && in_channels == o.in_channels && out_channels == o.out_channels && height == o.height &&
         width == o.width && kernel == o.kernel && groups == o.groups && precision == o.precision;
}

std::string ConvShape::str() const {
  std::ostringstream out;
  out << "[batch " << batch << ", " << in_channels << "->" << out_channels << " channels, " << height << "x" << width
      << ", kernel " << kernel << ", groups " << groups;
  if (precision != ConvPrecision::fp32) out << ", " << conv_precision_name(precision);
  out << "]";
  return out.str();
}

void Backend::check_precision(ConvPrecision precision) const {
  require_setting(precision == ConvPrecision::fp32, {"precision"}, "{0} ", conv_precision_name(precision),
                  " is not supported by the ", name(), " backend; use {0} fp32");
}

// Backends without reduced-precision passes (conv_precision always fp32) are never asked for conv inputs.
int64_t Backend::conv_input_size(const ConvShape& shape) {
  throw BackendError(
      detail::concat("the ", name(), " backend has no bf16 conv inputs (convolution ", shape.str(), ")"));
}

void Backend::to_conv_input(const ConvShape& shape, const float*, float*) {
  throw BackendError(
      detail::concat("the ", name(), " backend has no bf16 conv inputs (convolution ", shape.str(), ")"));
}

void ConvShape::validate() const {
  require(batch > 0, "convolution batch must be positive, got ", batch);
  require(in_channels > 0 && out_channels > 0, "convolution channels must be positive, got ", in_channels, "->",
          out_channels);
  require(height > 0 && width > 0, "convolution input must be non-empty, got ", height, "x", width);
  require(kernel > 0 && kernel % 2 == 1, "convolution kernel must be odd and positive, got ", kernel);
  require(groups > 0 && in_channels % groups == 0 && out_channels % groups == 0, "convolution groups (", groups,
          ") must divide in_channels (", in_channels, ") and out_channels (", out_channels, ")");
}

Tensor& Backend::shared_buffer(int slot) {
  require<ShapeError>(slot >= 0 && slot < kSharedBuffers, "shared buffer slot ", slot, " is not in 0..",
                      kSharedBuffers - 1);
  return shared_buffers_[slot];
}

std::string MatmulShape::str() const {
  std::ostringstream out;
  out << "[batch " << batch << ", " << rows << "x" << inner << (transpose_a ? " (A^T)" : "") << " * " << inner << "x"
      << cols << (transpose_b ? " (B^T)" : "") << ", strides " << stride_a << "/" << stride_b << "/" << stride_c << "]";
  return out.str();
}

void MatmulShape::validate() const {
  require(batch > 0 && rows > 0 && cols > 0 && inner > 0, "matmul sizes must be positive, got ", str());
  require(stride_a >= 0 && stride_b >= 0, "matmul strides of A and B must be >= 0, got ", str());
  require(batch == 1 || stride_c == 0 || stride_c >= rows * cols,
          "matmul: the C matrices of a batch must not overlap (stride 0 sums them), got ", str());
}

std::shared_ptr<Backend> cpu_backend() {
#ifdef ORTHOCONV_WITH_DNNL
  static std::shared_ptr<Backend> instance = std::make_shared<cpu::CpuBackend>();
  return instance;
#else
  throw BackendError(
      "this build of orthoconv has no CPU backend: oneDNN was not found when it was configured "
      "(install libdnnl-dev and reconfigure); use the CUDA backend");
#endif
}

// With the CUDA backend built in, cuda_backend() and cuda_available() live in lib/backend/cuda/backend.cpp.
#ifndef ORTHOCONV_WITH_CUDA
std::shared_ptr<Backend> cuda_backend() {
  throw BackendError("this build of orthoconv has no CUDA backend (configure with -DORTHOCONV_CUDA=ON)");
}
bool cuda_available() { return false; }
void set_cuda_options(const CudaOptions&) {}
CudaOptions cuda_options() { return {}; }
CudaMemoryStats cuda_memory_stats() { return {}; }
void reset_cuda_peak_memory() {}
#endif

std::shared_ptr<Backend> backend_for(Device device) { return device == Device::cpu ? cpu_backend() : cuda_backend(); }

}  // namespace orthoconv
