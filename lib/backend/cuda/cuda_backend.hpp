// The CUDA backend: cuDNN for every convolution, cuBLAS for the small matrix products, CUDA kernels for the rest.
//
// Layout: plain NCHW everywhere, so to/from_conv_layout and weights_to_conv_layout are copies and the weights
// of every pass are the plain [g, c_out/g, c_in/g, k, k] filter (cuDNN's grouped KCRS).
// Convolutions: the legacy cuDNN API (cross-correlation, zero padding k/2, group count g). For each ConvShape
// the descriptors and the algorithm of each pass are chosen once and cached: the fastest by cudnnFind* (or the
// first by cuDNN's heuristics, CudaOptions::find_algorithms) among those whose workspace fits kMaxWorkspace;
// one workspace buffer, grown to the largest need, serves them all.
// Math: CUDNN_FMA_MATH (plain float32) unless CudaOptions::allow_tf32 (orthoconv/cuda_options.hpp); cuBLAS
// likewise: CUBLAS_DEFAULT_MATH (float32 products, no TF32), or CUBLAS_TF32_TENSOR_OP_MATH with allow_tf32.
// Reduced precision (ConvShape::precision, compute capability 8.0 or newer; no timing: tensor cores beat the
// float32 CUDA cores at every LipConvnet shape): tf32 lets every pass of the shape run on TF32 tensor cores
// (float32 buffers). bf16 forward convolutions take bf16 src and weights (conv inputs) and run cuDNN's
// PSEUDO_BFLOAT16 configuration (float32 accumulation, bf16 result): the result is rounded once to bf16 before
// the float32 epilogue alpha * result + addend, so Horner's addend x0 and every buffer handed on stay float32
// (cuDNN's legacy API has no bf16-in, float32-out convolution). bf16 backward-weights widens its bf16 inputs to
// float32 (exactly) and runs on TF32 tensor cores, whose products of bf16 values are exact: a float32 weight
// gradient of the rounded inputs, as on the CPU. Backward-data stays float32 (or TF32).
// Work is enqueued on one stream (memory.hpp); calls return without waiting, except those with host outputs
// (power_iteration, group_dot, softmax_cross_entropy, to_host) and from_host, which wait for the stream.
// Host inputs: `scale` (scale_groups), `which` and `coefficient` (add_sigma_gradient), `labels`
// (softmax_cross_entropy), `sources` / `scales` (weighted_sum: host arrays of device pointers) and
// `destination` (permute_channels, as ChannelShuffle passes it) are host memory;
// they travel as kernel parameters, so no host memory is read after a call returns.
// One instance per process (cuda_backend()); thread-compatible, not thread-safe.
#pragma once

#include <cublas_v2.h>
#include <cudnn.h>

#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "backend/cuda/memory.hpp"
#include "orthoconv/backend.hpp"
#include "orthoconv/cuda_options.hpp"

namespace orthoconv::cuda {

class CudaBackend final : public Backend {
 public:
  CudaBackend();
  ~CudaBackend() override;
  Device device() const override { return Device::cuda; }
  std::string name() const override { return name_; }

  int64_t conv_buffer_size(const ConvShape& shape) override;
  void to_conv_layout(const ConvShape& shape, const float* nchw, float* dst) override;
  void from_conv_layout(const ConvShape& shape, const float* src, float* nchw) override;
  int64_t conv_weights_size(const ConvShape& shape, ConvPass pass) override;
  void weights_to_conv_layout(const ConvShape& shape, ConvPass pass, const float* plain, float* dst) override;
  void conv_forward(const ConvShape& shape, const float* src, const float* weights, float* dst,
                    bool accumulate) override;
  // cuDNN's y = alpha * conv + beta * y with y first set to the addend (beta = 1) or not read (beta = 0).
  void conv_forward_scaled(const ConvShape& shape, const float* src, const float* weights, float alpha,
                           const float* addend, float* dst) override;
  void conv_backward_data(const ConvShape& shape, const float* diff_dst, const float* weights,
                          float* diff_src) override;
  void conv_backward_weights(const ConvShape& shape, const float* src, const float* diff_dst,
                             float* diff_weights) override;

  void check_precision(ConvPrecision precision) const override;
  ConvPrecision conv_precision(const ConvShape& shape, ConvPass pass) override;
  int64_t conv_input_size(const ConvShape& shape) override;
  void to_conv_input(const ConvShape& shape, const float* src, float* dst) override;

  void fill(float* dst, int64_t count, float value) override;
  void copy(const float* src, float* dst, int64_t count) override;
  void axpby(float alpha, const float* x, float beta, float* y, int64_t count) override;
  void weighted_sum(const float* const* sources, const float* scales, int inputs, float* dst, int64_t count) override;
  void copy_channels(const float* src, int64_t src_channels, float* dst, int64_t dst_channels, int64_t batch,
                     int64_t plane, bool accumulate) override;
  void permute_channels(const float* src, float* dst, const int32_t* destination, int64_t batch, int64_t channels,
                        int64_t plane) override;
  void pixel_unshuffle(const float* src, float* dst, int64_t batch, int64_t channels, int64_t height, int64_t width,
                       int64_t stride, bool inverse) override;
  void maxmin_forward(const float* src, float* dst, int64_t batch, int64_t channels, int64_t plane,
                      bool paired) override;
  void maxmin_backward(const float* src, const float* diff_dst, float* diff_src, int64_t batch, int64_t channels,
                       int64_t plane, bool paired) override;
  void add_bias(float* dst, const float* bias, int64_t batch, int64_t channels, int64_t plane) override;
  void bias_backward(const float* diff_dst, float* diff_bias, int64_t batch, int64_t channels, int64_t plane) override;

  void skew_symmetrize(const float* src, float* dst, int64_t groups, int64_t channels, int64_t kernel) override;
  void power_iteration(const float* filter, PowerIterationState& state, int64_t groups, int64_t channels,
                       int64_t kernel, int iterations, float* sigma, int32_t* which) override;
  void scale_groups(const float* filter, const float* scale, float* scaled, int64_t groups,
                    int64_t group_size) override;
  void add_sigma_gradient(const PowerIterationState& state, const int32_t* which, const float* coefficient,
                          float* diff_filter, int64_t groups, int64_t channels, int64_t kernel) override;
  void group_dot(const float* a, const float* b, float* out, int64_t groups, int64_t group_size) override;

  void matmul(const MatmulShape& shape, float alpha, const float* a, const float* b, float beta, float shift,
              float* c) override;

  void softmax_cross_entropy(const float* logits, const int32_t* labels, int64_t batch, int64_t classes,
                             float* diff_logits, double* loss_sum, int64_t* correct) override;
  void sgd_momentum(float* param, const float* grad, float* momentum, int64_t count, float lr, float momentum_coef,
                    float weight_decay, bool first_step) override;

  void to_host(const float* src, float* host_dst, int64_t count) override;
  void from_host(const float* host_src, float* dst, int64_t count) override;
  void synchronize() override;

  // The cuDNN algorithms chosen for `shape` ("fwd IMPLICIT_PRECOMP_GEMM (FMA, 0 MiB), ..."), for benchmarks.
  std::string implementation(const ConvShape& shape);
  // Applies new options; a change of allow_tf32 drops the cached algorithm choices.
  void set_options(const CudaOptions& options);
  const CudaOptions& options() const { return options_; }

  static constexpr size_t kMaxWorkspace = size_t{1} << 30;

  // With CudaOptions::check_pointers, throws unless every non-null pointer is GPU memory.
  template <typename... Pointers>
  void expect_device(const char* what, const Pointers*... pointers) const {
    if (options_.check_pointers) (expect_device_pointer(pointers, what), ...);
  }

 private:
  struct ConvPlan;
  struct ShapeKey {
    int64_t n, ci, co, h, w, k, g;
    ConvPrecision precision;
    bool operator<(const ShapeKey& o) const {
      return std::tie(n, ci, co, h, w, k, g, precision) < std::tie(o.n, o.ci, o.co, o.h, o.w, o.k, o.g, o.precision);
    }
  };
  // The plan of `shape` at the precision `pass` runs in (conv_precision; bf16 backward-weights: tf32).
  ConvPlan& plan(const ConvShape& shape, ConvPass pass);
  ConvPlan& plan_for(const ConvShape& shape);  // exactly shape.precision
  void* workspace(size_t bytes);
  // bf16 <-> float32 on device buffers (conv_bf16.cu): round to nearest even, widen exactly, and the epilogue
  // dst = alpha * bf16 result + addend (or dst += result when accumulate).
  void round_to_bf16(const float* src, void* dst, int64_t count);
  void widen_bf16(const void* src, float* dst, int64_t count);
  void bf16_epilogue(const void* result, float alpha, const float* addend, bool accumulate, float* dst, int64_t count);

  std::string name_;
  int compute_capability_ = 0;  // major * 10 + minor
  CudaOptions options_;
  cudnnHandle_t cudnn_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::map<ShapeKey, std::unique_ptr<ConvPlan>> plans_;
  DeviceScratch workspace_;
  DeviceScratch reduce_scratch_;              // partial sums of reductions
  DeviceScratch result_scratch_;              // per-group / per-row results copied to the host
  DeviceScratch bf16_result_;                 // bf16 forward results before the epilogue
  DeviceScratch widened_src_, widened_diff_;  // bf16 backward-weights inputs widened to float32
};

// One convolution descriptor per pass, so that each carries the math type its algorithm was chosen with.
struct CudaBackend::ConvPlan {
  cudnnTensorDescriptor_t src = nullptr, dst = nullptr;
  cudnnFilterDescriptor_t weights = nullptr;
  cudnnConvolutionDescriptor_t conv_fwd = nullptr, conv_bwd_data = nullptr, conv_bwd_weights = nullptr;
  cudnnConvolutionFwdAlgo_t fwd_algo{};
  cudnnConvolutionBwdDataAlgo_t bwd_data_algo{};
  cudnnConvolutionBwdFilterAlgo_t bwd_weights_algo{};
  size_t fwd_workspace = 0, bwd_data_workspace = 0, bwd_weights_workspace = 0;
  std::string description;

  ConvPlan() = default;
  ConvPlan(const ConvPlan&) = delete;
  ConvPlan& operator=(const ConvPlan&) = delete;
  ~ConvPlan() {
    if (src) cudnnDestroyTensorDescriptor(src);
    if (dst) cudnnDestroyTensorDescriptor(dst);
    if (weights) cudnnDestroyFilterDescriptor(weights);
    for (auto* c : {conv_fwd, conv_bwd_data, conv_bwd_weights})
      if (c) cudnnDestroyConvolutionDescriptor(c);
  }
};

}  // namespace orthoconv::cuda
