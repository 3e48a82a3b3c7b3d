// Grouped 2-D convolution (stride 1, odd kernel, zero "same" padding) through cuDNN's legacy API: forward (with
// beta = 1 for accumulation), backward-data and backward-weights, on plain NCHW and grouped KCRS filters, with
// descriptors and algorithms chosen once per ConvShape and precision (see cuda_backend.hpp). The twin of
// backend/cpu/conv.cpp; the bf16 conversions are in conv_bf16.cu.
#include <climits>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"

namespace orthoconv::cuda {

namespace {

bool is_tensor_op(cudnnMathType_t math) {
  return math == CUDNN_TENSOR_OP_MATH || math == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION;
}

const char* math_name(cudnnMathType_t math) {
  switch (math) {
    case CUDNN_DEFAULT_MATH:
      return "default";
    case CUDNN_TENSOR_OP_MATH:
      return "tensor-op";
    case CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION:
      return "tensor-op+conversion";
    case CUDNN_FMA_MATH:
      return "FMA";
    default:
      return "?";
  }
}

const char* algo_name(cudnnConvolutionFwdAlgo_t a) {
  switch (a) {
    case CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM:
      return "IMPLICIT_GEMM";
    case CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM:
      return "IMPLICIT_PRECOMP_GEMM";
    case CUDNN_CONVOLUTION_FWD_ALGO_GEMM:
      return "GEMM";
    case CUDNN_CONVOLUTION_FWD_ALGO_DIRECT:
      return "DIRECT";
    case CUDNN_CONVOLUTION_FWD_ALGO_FFT:
      return "FFT";
    case CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING:
      return "FFT_TILING";
    case CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD:
      return "WINOGRAD";
    case CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED:
      return "WINOGRAD_NONFUSED";
    default:
      return "?";
  }
}
const char* algo_name(cudnnConvolutionBwdDataAlgo_t a) {
  switch (a) {
    case CUDNN_CONVOLUTION_BWD_DATA_ALGO_0:
      return "ALGO_0";
    case CUDNN_CONVOLUTION_BWD_DATA_ALGO_1:
      return "ALGO_1";
    case CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT:
      return "FFT";
    case CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING:
      return "FFT_TILING";
    case CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD:
      return "WINOGRAD";
    case CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED:
      return "WINOGRAD_NONFUSED";
    default:
      return "?";
  }
}
const char* algo_name(cudnnConvolutionBwdFilterAlgo_t a) {
  switch (a) {
    case CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0:
      return "ALGO_0";
    case CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1:
      return "ALGO_1";
    case CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT:
      return "FFT";
    case CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3:
      return "ALGO_3";
    case CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED:
      return "WINOGRAD_NONFUSED";
    case CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING:
      return "FFT_TILING";
    default:
      return "?";
  }
}

// The first (fastest) successful result whose math is allowed and whose workspace fits.
template <typename Perf>
const Perf* pick(const std::vector<Perf>& results, int returned, bool allow_tf32) {
  for (int i = 0; i < returned; ++i) {
    const Perf& p = results[static_cast<size_t>(i)];
    if (p.status != CUDNN_STATUS_SUCCESS) continue;
    if (!allow_tf32 && is_tensor_op(p.mathType)) continue;
    if (p.memory > CudaBackend::kMaxWorkspace) continue;
    return &p;
  }
  return nullptr;
}

int as_int(int64_t value, const char* what, const ConvShape& shape) {
  require<ShapeError>(value <= INT_MAX, "convolution ", shape.str(), ": ", what, " (", value,
                      ") exceeds cuDNN's int range");
  return static_cast<int>(value);
}

}  // namespace

CudaBackend::ConvPlan& CudaBackend::plan(const ConvShape& shape, ConvPass pass) {
  ConvShape effective = shape;
  effective.precision = conv_precision(shape, pass);
  if (effective.precision == ConvPrecision::bf16 && pass == ConvPass::backward_weights)
    effective.precision = ConvPrecision::tf32;  // on the widened inputs
  return plan_for(effective);
}

CudaBackend::ConvPlan& CudaBackend::plan_for(const ConvShape& shape) {
  ShapeKey key{shape.batch, shape.in_channels, shape.out_channels, shape.height,
               shape.width, shape.kernel,      shape.groups,       shape.precision};
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  shape.validate();
  const int n = as_int(shape.batch, "batch", shape), ci = as_int(shape.in_channels, "in_channels", shape),
            co = as_int(shape.out_channels, "out_channels", shape), h = as_int(shape.height, "height", shape),
            w = as_int(shape.width, "width", shape), k = as_int(shape.kernel, "kernel", shape),
            g = as_int(shape.groups, "groups", shape);
  as_int(shape.batch * std::max(shape.in_channels, shape.out_channels) * shape.height * shape.width, "activation size",
         shape);

  // bf16: bf16 src, weights and result (cuDNN's PSEUDO_BFLOAT16 configuration, float32 compute), forward only.
  const bool bf16 = shape.precision == ConvPrecision::bf16;
  const cudnnDataType_t type = bf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
  auto p = std::make_unique<ConvPlan>();
  ORTHOCONV_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->src));
  ORTHOCONV_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->dst));
  ORTHOCONV_CUDNN_CHECK(cudnnCreateFilterDescriptor(&p->weights));
  ORTHOCONV_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->src, CUDNN_TENSOR_NCHW, type, n, ci, h, w));
  ORTHOCONV_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->dst, CUDNN_TENSOR_NCHW, type, n, co, h, w));
  ORTHOCONV_CUDNN_CHECK(cudnnSetFilter4dDescriptor(p->weights, type, CUDNN_TENSOR_NCHW, co, ci / g, k, k));
  // Tensor cores: allowed for tf32 and bf16 shapes, and for float32 ones only with CudaOptions::allow_tf32.
  const bool tensor_ops = shape.precision != ConvPrecision::fp32 || options_.allow_tf32;
  const cudnnMathType_t search_math = tensor_ops ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
  if (bf16) p->description = "bf16: ";
  for (auto* c : {&p->conv_fwd, &p->conv_bwd_data, &p->conv_bwd_weights}) {
    ORTHOCONV_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(c));
    ORTHOCONV_CUDNN_CHECK(
        cudnnSetConvolution2dDescriptor(*c, k / 2, k / 2, 1, 1, 1, 1, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    ORTHOCONV_CUDNN_CHECK(cudnnSetConvolutionGroupCount(*c, g));
    ORTHOCONV_CUDNN_CHECK(cudnnSetConvolutionMathType(*c, search_math));
  }
  const bool tf32 = tensor_ops, find = options_.find_algorithms;
  // cudnnFind* times each algorithm on buffers it allocates itself; without find_algorithms, or when that fails
  // (memory), the heuristic ranking (Get*_v7) is used instead.
  {
    int count = 0, returned = 0;
    ORTHOCONV_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(cudnn_, &count));
    std::vector<cudnnConvolutionFwdAlgoPerf_t> results(static_cast<size_t>(count));
    if (!find || cudnnFindConvolutionForwardAlgorithm(cudnn_, p->src, p->weights, p->conv_fwd, p->dst, count, &returned,
                                                      results.data()) != CUDNN_STATUS_SUCCESS)
      ORTHOCONV_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(cudnn_, p->src, p->weights, p->conv_fwd, p->dst,
                                                                   count, &returned, results.data()));
    const auto* best = pick(results, returned, tf32);
    require<BackendError>(best != nullptr, "cuDNN has no usable forward algorithm for convolution ", shape.str());
    p->fwd_algo = best->algo;
    p->fwd_workspace = best->memory;
    ORTHOCONV_CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv_fwd, best->mathType));
    p->description += detail::concat("fwd ", algo_name(best->algo), " (", math_name(best->mathType), ", ",
                                     best->memory >> 20, " MiB)");
  }
  if (!bf16) {
    int count = 0, returned = 0;
    ORTHOCONV_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithmMaxCount(cudnn_, &count));
    std::vector<cudnnConvolutionBwdDataAlgoPerf_t> results(static_cast<size_t>(count));
    if (!find || cudnnFindConvolutionBackwardDataAlgorithm(cudnn_, p->weights, p->dst, p->conv_bwd_data, p->src, count,
                                                           &returned, results.data()) != CUDNN_STATUS_SUCCESS)
      ORTHOCONV_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(cudnn_, p->weights, p->dst, p->conv_bwd_data,
                                                                        p->src, count, &returned, results.data()));
    const auto* best = pick(results, returned, tf32);
    require<BackendError>(best != nullptr, "cuDNN has no usable backward-data algorithm for convolution ", shape.str());
    p->bwd_data_algo = best->algo;
    p->bwd_data_workspace = best->memory;
    ORTHOCONV_CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv_bwd_data, best->mathType));
    p->description += detail::concat(", bwd-data ", algo_name(best->algo), " (", math_name(best->mathType), ", ",
                                     best->memory >> 20, " MiB)");
  }
  if (!bf16) {
    int count = 0, returned = 0;
    ORTHOCONV_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(cudnn_, &count));
    std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> results(static_cast<size_t>(count));
    if (!find || cudnnFindConvolutionBackwardFilterAlgorithm(cudnn_, p->src, p->dst, p->conv_bwd_weights, p->weights,
                                                             count, &returned, results.data()) != CUDNN_STATUS_SUCCESS)
      ORTHOCONV_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(
          cudnn_, p->src, p->dst, p->conv_bwd_weights, p->weights, count, &returned, results.data()));
    const auto* best = pick(results, returned, tf32);
    require<BackendError>(best != nullptr, "cuDNN has no usable backward-weights algorithm for convolution ",
                          shape.str());
    p->bwd_weights_algo = best->algo;
    p->bwd_weights_workspace = best->memory;
    ORTHOCONV_CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv_bwd_weights, best->mathType));
    p->description += detail::concat(", bwd-weights ", algo_name(best->algo), " (", math_name(best->mathType), ", ",
                                     best->memory >> 20, " MiB)");
  }
  // A failed cudnnFind* may leave a CUDA error pending; it was handled above.
  (void)cudaGetLastError();
  auto& slot = plans_[key];
  slot = std::move(p);
  return *slot;
}

void* CudaBackend::workspace(size_t bytes) { return bytes == 0 ? nullptr : workspace_.reserve(bytes); }

std::string CudaBackend::implementation(const ConvShape& shape) {
  std::string out = plan(shape, ConvPass::forward).description;
  if (shape.precision != ConvPrecision::fp32)
    out += "; backward-weights " + plan(shape, ConvPass::backward_weights).description;
  return out;
}

void CudaBackend::check_precision(ConvPrecision precision) const {
  if (precision == ConvPrecision::fp32) return;
  require_setting(compute_capability_ >= 80, {"precision"}, "{0} ", conv_precision_name(precision),
                  " needs a GPU with ", conv_precision_name(precision),
                  " tensor cores (compute capability 8.0 or newer); ", name_, " has ", compute_capability_ / 10, ".",
                  compute_capability_ % 10, "; use {0} fp32");
}

// bf16 conv inputs stack like float32 buffers only with an even number of values per buffer (two per float).
ConvPrecision CudaBackend::conv_precision(const ConvShape& shape, ConvPass pass) {
  if (shape.precision == ConvPrecision::fp32 || compute_capability_ < 80) return ConvPrecision::fp32;
  if (shape.precision == ConvPrecision::tf32) return ConvPrecision::tf32;
  if (pass == ConvPass::backward_data || conv_buffer_size(shape) % 2 != 0) return ConvPrecision::fp32;
  return ConvPrecision::bf16;
}

int64_t CudaBackend::conv_input_size(const ConvShape& shape) { return (conv_buffer_size(shape) + 1) / 2; }

void CudaBackend::to_conv_input(const ConvShape& shape, const float* src, float* dst) {
  expect_device("to_conv_input", src, dst);
  round_to_bf16(src, dst, conv_buffer_size(shape));
}

int64_t CudaBackend::conv_buffer_size(const ConvShape& shape) {
  shape.validate();
  return shape.batch * shape.in_channels * shape.height * shape.width;
}

void CudaBackend::to_conv_layout(const ConvShape& shape, const float* nchw, float* dst) {
  copy(nchw, dst, conv_buffer_size(shape));
}

void CudaBackend::from_conv_layout(const ConvShape& shape, const float* src, float* nchw) {
  copy(src, nchw, conv_buffer_size(shape));
}

int64_t CudaBackend::conv_weights_size(const ConvShape& shape, ConvPass pass) {
  shape.validate();
  return conv_precision(shape, pass) == ConvPrecision::bf16 ? (shape.weight_count() + 1) / 2 : shape.weight_count();
}

void CudaBackend::weights_to_conv_layout(const ConvShape& shape, ConvPass pass, const float* plain, float* dst) {
  if (conv_precision(shape, pass) == ConvPrecision::bf16) {
    expect_device("weights_to_conv_layout", plain, dst);
    round_to_bf16(plain, dst, shape.weight_count());
  } else {
    copy(plain, dst, conv_weights_size(shape, pass));
  }
}

void CudaBackend::conv_forward(const ConvShape& shape, const float* src, const float* weights, float* dst,
                               bool accumulate) {
  expect_device("conv_forward", src, weights, dst);
  ConvPlan& p = plan(shape, ConvPass::forward);
  const int64_t count = shape.batch * shape.out_channels * shape.height * shape.width;
  const float one = 1.0f, zero = 0.0f, beta = accumulate ? 1.0f : 0.0f;
  if (conv_precision(shape, ConvPass::forward) == ConvPrecision::bf16) {
    void* result = bf16_result_.reserve(static_cast<size_t>(count) * 2);
    ORTHOCONV_CUDNN_CHECK(cudnnConvolutionForward(cudnn_, &one, p.src, src, p.weights, weights, p.conv_fwd, p.fwd_algo,
                                                  workspace(p.fwd_workspace), p.fwd_workspace, &zero, p.dst, result));
    bf16_epilogue(result, 1.0f, nullptr, accumulate, dst, count);
    return;
  }
  ORTHOCONV_CUDNN_CHECK(cudnnConvolutionForward(cudnn_, &one, p.src, src, p.weights, weights, p.conv_fwd, p.fwd_algo,
                                                workspace(p.fwd_workspace), p.fwd_workspace, &beta, p.dst, dst));
}

void CudaBackend::conv_forward_scaled(const ConvShape& shape, const float* src, const float* weights, float alpha,
                                      const float* addend, float* dst) {
  expect_device("conv_forward_scaled", src, weights, addend, dst);
  require<ShapeError>(dst != src && dst != addend, "conv_forward_scaled: dst must alias neither src nor addend");
  ConvPlan& p = plan(shape, ConvPass::forward);
  if (conv_precision(shape, ConvPass::forward) == ConvPrecision::bf16) {
    const int64_t count = shape.batch * shape.out_channels * shape.height * shape.width;
    void* result = bf16_result_.reserve(static_cast<size_t>(count) * 2);
    const float one = 1.0f, zero = 0.0f;
    ORTHOCONV_CUDNN_CHECK(cudnnConvolutionForward(cudnn_, &one, p.src, src, p.weights, weights, p.conv_fwd, p.fwd_algo,
                                                  workspace(p.fwd_workspace), p.fwd_workspace, &zero, p.dst, result));
    bf16_epilogue(result, alpha, addend, false, dst, count);
    return;
  }
  float beta = 0.0f;
  if (addend != nullptr) {
    copy(addend, dst, shape.batch * shape.out_channels * shape.height * shape.width);
    beta = 1.0f;
  }
  ORTHOCONV_CUDNN_CHECK(cudnnConvolutionForward(cudnn_, &alpha, p.src, src, p.weights, weights, p.conv_fwd, p.fwd_algo,
                                                workspace(p.fwd_workspace), p.fwd_workspace, &beta, p.dst, dst));
}

void CudaBackend::conv_backward_data(const ConvShape& shape, const float* diff_dst, const float* weights,
                                     float* diff_src) {
  expect_device("conv_backward_data", diff_dst, weights, diff_src);
  ConvPlan& p = plan(shape, ConvPass::backward_data);
  const float one = 1.0f, zero = 0.0f;
  ORTHOCONV_CUDNN_CHECK(cudnnConvolutionBackwardData(cudnn_, &one, p.weights, weights, p.dst, diff_dst, p.conv_bwd_data,
                                                     p.bwd_data_algo, workspace(p.bwd_data_workspace),
                                                     p.bwd_data_workspace, &zero, p.src, diff_src));
}

void CudaBackend::conv_backward_weights(const ConvShape& shape, const float* src, const float* diff_dst,
                                        float* diff_weights) {
  expect_device("conv_backward_weights", src, diff_dst, diff_weights);
  ConvPlan& p = plan(shape, ConvPass::backward_weights);
  const float one = 1.0f, zero = 0.0f;
  if (conv_precision(shape, ConvPass::backward_weights) == ConvPrecision::bf16) {
    const int64_t count = conv_buffer_size(shape);
    float* wide_src = widened_src_.as<float>(count);
    float* wide_diff = widened_diff_.as<float>(count);
    widen_bf16(src, wide_src, count);
    widen_bf16(diff_dst, wide_diff, count);
    src = wide_src;
    diff_dst = wide_diff;
  }
  ORTHOCONV_CUDNN_CHECK(cudnnConvolutionBackwardFilter(cudnn_, &one, p.src, src, p.dst, diff_dst, p.conv_bwd_weights,
                                                       p.bwd_weights_algo, workspace(p.bwd_weights_workspace),
                                                       p.bwd_weights_workspace, &zero, p.weights, diff_weights));
}

}  // namespace orthoconv::cuda
