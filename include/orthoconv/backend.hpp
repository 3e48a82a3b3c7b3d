// orthoconv/backend.hpp: the narrow interface every layer is written against.
//
// Layers (SOC, GS-SOC, MaxMin, ...) never see oneDNN or CUDA: they call these primitives, and each device
// implements them once (lib/backend/cpu with oneDNN, lib/backend/cuda with cuDNN). All pointers are device
// pointers of the backend's device; all activations are NCHW float32, contiguous.
//
// Convolutions: grouped 2-D, stride 1, odd square kernel k, zero "same" padding k/2, no bias. Weights are
// laid out [groups, c_out/groups, c_in/groups, k, k] (a SocConv filter [g, C, C, k, k] as it is stored).
// Implementations create each vendor primitive once per ConvShape and reuse it.
//
// Precision (ConvShape::precision): fp32 is plain float32 everywhere. A reduced precision is a request for the
// inputs of the convolutions of that shape only: bf16 rounds the activations (src of the forward, src and
// diff_dst of backward-weights) and the weights to bfloat16 (8-bit significand, round to nearest even, unit
// roundoff u = 2^-8) and accumulates in float32 into float32 outputs (the CUDA forward rounds its result to bf16
// once before the float32 addend: lib/backend/cuda/cuda_backend.hpp); tf32 (CUDA) keeps float32 buffers and lets
// the tensor cores round the inputs to 10-bit significands. Everything else (addends, the elementwise and filter
// ops, the optimizer) is float32 whatever the shape says. A backend runs a requested precision only where it
// has the kernels and they pay off (conv_precision); elsewhere the same calls run in float32.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "orthoconv/tensor.hpp"

namespace orthoconv {

// The precision of the series convolutions (`orthoconv train --precision`).
enum class ConvPrecision { fp32, tf32, bf16 };
// "fp32" | "tf32" | "bf16"; anything else is a ConfigError naming --precision.
ConvPrecision parse_conv_precision(const std::string& text);
std::string conv_precision_name(ConvPrecision precision);

// forward also covers conv_forward_scaled (and SocConv's transposed convolutions, which run on it).
enum class ConvPass { forward, backward_data, backward_weights };

struct ConvShape {
  int64_t batch = 1;
  int64_t in_channels = 1;
  int64_t out_channels = 1;
  int64_t height = 1;
  int64_t width = 1;
  int64_t kernel = 1;
  int64_t groups = 1;
  ConvPrecision precision = ConvPrecision::fp32;  // requested for the inputs of this shape's convolutions

  int64_t weight_count() const { return out_channels * (in_channels / groups) * kernel * kernel; }
  // Multiply-adds of one forward pass.
  int64_t macs() const { return batch * height * width * weight_count(); }
  bool operator==(const ConvShape& other) const;
  std::string str() const;  // names the precision unless fp32
  void validate() const;    // throws ConfigError for impossible settings
};

// A batch of row-major float32 matrix products (Backend::matmul). Matrix b of an operand starts b * stride floats
// after its pointer; each matrix is contiguous (leading dimension = its row length):
//   op(A_b) rows x inner: A_b stored rows x inner, or inner x rows when transpose_a (then used transposed);
//   op(B_b) inner x cols: B_b stored inner x cols, or cols x inner when transpose_b;
//   C_b     rows x cols.
// A stride of 0 uses one matrix for the whole batch; for C (batch > 1) it sums the batch into one matrix:
//   C = alpha * sum_b op(A_b) op(B_b) + beta * C + shift * I.
struct MatmulShape {
  int64_t batch = 1;
  int64_t rows = 1;
  int64_t cols = 1;
  int64_t inner = 1;
  bool transpose_a = false;
  bool transpose_b = false;
  int64_t stride_a = 0;
  int64_t stride_b = 0;
  int64_t stride_c = 0;

  std::string str() const;
  void validate() const;  // throws ConfigError for impossible settings (C matrices must not overlap, unless summed)
};

// The persistent power-iteration state of one SocConv filter [g, C, C, k, k]: four (u, v) pairs per group,
// named and laid out as the reference code's u1..v4 (GS-SOC / SOC, skew_ortho_conv.py; 5-D shapes there):
//   u1 [C_in, w]  v1 [C_out, h];   u2 [C_in, h]  v2 [C_out, w];   u3 [C_in, h, w]  v3 [C_out];
//   u4 [C_out, h, w]  v4 [C_in]
// Reshape i of one group's filter is the matrix A_i with v_i over its rows and u_i over its columns:
//   (out*h) x (in*w),  (out*w) x (in*h),  out x (in*h*w),  in x (out*h*w),
// and one round updates v_i = normalize(A_i u_i), then u_i = normalize(A_i^T v_i): the reference's order for
// all four (for the fourth, the in-channel vector v4 first, from the (out, h, w) vector u4). The four pairs are
// independent, so the order between reshapes does not matter.
struct PowerIterationState {
  Tensor u[4];  // [groups, u_length(i)]
  Tensor v[4];  // [groups, v_length(i)]

  // Per-group lengths: u_i spans the columns of reshape i, v_i its rows.
  static int64_t u_length(int which, int64_t channels, int64_t kernel) {
    return which < 2 ? channels * kernel : channels * kernel * kernel;
  }
  static int64_t v_length(int which, int64_t channels, int64_t kernel) {
    return which < 2 ? channels * kernel : channels;
  }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // ---- precision ----
  // Throws ConfigError naming --precision when this device cannot run `precision` at all (bf16 without
  // AVX512-BF16, tf32 on the CPU, a GPU without tensor cores). fp32 always runs.
  virtual void check_precision(ConvPrecision precision) const;
  // The precision `pass` of `shape` runs in: shape.precision where this backend has kernels for it at this
  // shape and chooses them (see set_precision_choice), else fp32. Where it is bf16 the pass takes its activation
  // inputs as conv inputs (to_conv_input) and its weights (weights_to_conv_layout) in bfloat16; outputs, addends
  // and the other passes stay float32 buffers. The answer for a shape never changes once given, unless the
  // precision choice does.
  virtual ConvPrecision conv_precision(const ConvShape& shape, ConvPass pass) {
    (void)shape;
    (void)pass;
    return ConvPrecision::fp32;
  }
  // measured (the default): a reduced precision runs at a shape only where its kernels are faster than float32
  // there, timed once per shape (on the CPU, oneDNN's bf16 kernels are 2x faster at most LipConvnet shapes
  // and up to 9x SLOWER at some); always: wherever the backend has non-reference kernels (tests); never: float32
  // kernels for every pass, in the layout the backend runs a reduced-precision request in (tests of that
  // fallback). A change forgets the earlier choices.
  enum class PrecisionChoice { measured, always, never };
  virtual void set_precision_choice(PrecisionChoice choice) { (void)choice; }
  // A conv-layout activation buffer of `shape` as the input of a bf16 pass: conv_input_size floats hold it
  // (half of conv_buffer_size); stacking holds as for conv_buffer_size (k * batch images = k buffers of batch
  // images back to back). to_conv_input rounds the float32 conv-layout buffer `src` to it (nearest even);
  // dst aliases nothing. Only for shapes with a bf16 pass.
  virtual int64_t conv_input_size(const ConvShape& shape);
  virtual void to_conv_input(const ConvShape& shape, const float* src, float* dst);

  // ---- convolutions ----
  // Convolutions run on buffers in the backend's own "conv layout" (oneDNN's blocked nChw16c on the CPU, plain
  // NCHW on CUDA): convert once at a layer's entry and exit, run every series term in that layout. Elementwise
  // ops below (fill, copy, axpby) are layout-agnostic and may be applied to such buffers as flat arrays: padded
  // channel slots hold zeros and stay zero. The batch is the outermost axis in every conv layout, so a buffer
  // of k * batch images is k buffers of batch images back to back.
  // Activation buffers hold shape.in_channels (== shape.out_channels: the layers only convolve square).
  virtual int64_t conv_buffer_size(const ConvShape& shape) = 0;  // floats
  virtual void to_conv_layout(const ConvShape& shape, const float* nchw, float* dst) = 0;
  virtual void from_conv_layout(const ConvShape& shape, const float* src, float* nchw) = 0;
  // Weights in the layout (and precision, see conv_precision) the forward or backward-data primitive wants,
  // converted from the plain [g, c_out/g, c_in/g, k, k] float32 layout. Scaling such a float32 buffer
  // elementwise scales the filter; a bf16 one is opaque.
  virtual int64_t conv_weights_size(const ConvShape& shape, ConvPass pass) = 0;  // floats
  virtual void weights_to_conv_layout(const ConvShape& shape, ConvPass pass, const float* plain, float* dst) = 0;

  // Inputs named src / diff_dst below are conv inputs (to_conv_input) where conv_precision(shape, pass) is
  // bf16; every output and addend is a float32 conv-layout buffer.
  // dst = conv(src, weights), or with accumulate dst += conv(src, weights). Conv layout; weights in the
  // forward conv layout.
  virtual void conv_forward(const ConvShape& shape, const float* src, const float* weights, float* dst,
                            bool accumulate) = 0;
  // diff_src = conv^T(diff_dst, weights), overwritten. Conv layout; weights in the backward-data conv layout.
  virtual void conv_backward_data(const ConvShape& shape, const float* diff_dst, const float* weights,
                                  float* diff_src) = 0;
  // diff_weights (plain layout, float32) = gradient of <diff_dst, conv(src, w)> in w, overwritten. Conv layout
  // inputs.
  virtual void conv_backward_weights(const ConvShape& shape, const float* src, const float* diff_dst,
                                     float* diff_weights) = 0;
  // dst = alpha * conv(src, weights) + addend, or dst = alpha * conv(src, weights) when addend is null. Conv
  // layout, forward weights; dst aliases neither src nor addend. One fused pass where the vendor allows it
  // (oneDNN post-ops; cuDNN's conv-bias-activation z input): SocConv's Horner step x0 + (A/j) p. The default
  // is conv_forward followed by an axpby.
  virtual void conv_forward_scaled(const ConvShape& shape, const float* src, const float* weights, float alpha,
                                   const float* addend, float* dst) {
    conv_forward(shape, src, weights, dst, false);
    if (addend)
      axpby(1.0f, addend, alpha, dst, conv_buffer_size(shape));
    else if (alpha != 1.0f)
      axpby(alpha, dst, 0.0f, dst, conv_buffer_size(shape));
  }
  // conv_forward_scaled whose result is wanted only as the conv input of the next bf16 pass: dst_input =
  // to_conv_input(alpha * conv(src, weights) + addend), the float32 result rounded once to nearest even, as the
  // two calls would give. Where the backend fuses it (the CPU: oneDNN's bf16 dst, after its float32 accumulation
  // and the float32 addend) `scratch` (a float32 conv-layout buffer) is left alone and the float32 result never
  // written; the default writes it there and rounds it from there. Only where conv_precision(shape, forward) is
  // bf16.
  virtual void conv_forward_scaled_to_input(const ConvShape& shape, const float* src, const float* weights, float alpha,
                                            const float* addend, float* scratch, float* dst_input) {
    conv_forward_scaled(shape, src, weights, alpha, addend, scratch);
    to_conv_input(shape, scratch, dst_input);
  }

  // ---- elementwise ----
  virtual void fill(float* dst, int64_t count, float value) = 0;
  virtual void copy(const float* src, float* dst, int64_t count) = 0;
  // y = alpha * x + beta * y
  virtual void axpby(float alpha, const float* x, float beta, float* y, int64_t count) = 0;
  // dst = sum_i scales[i] * sources[i] over `count` floats; `inputs` >= 1 sources and scales in host arrays; dst
  // aliases no source. One pass where implemented; the default is `inputs` axpby passes.
  virtual void weighted_sum(const float* const* sources, const float* scales, int inputs, float* dst, int64_t count) {
    axpby(scales[0], sources[0], 0.0f, dst, count);
    for (int i = 1; i < inputs; ++i) axpby(scales[i], sources[i], 1.0f, dst, count);
  }
  // dst[b, c, :] (+)= src[b, c, :] for c < min(src_channels, dst_channels); with !accumulate the channels of
  // dst beyond src_channels are zeroed. Covers channel zero-padding and truncation (and their gradients).
  virtual void copy_channels(const float* src, int64_t src_channels, float* dst, int64_t dst_channels, int64_t batch,
                             int64_t plane, bool accumulate) = 0;
  // dst[b, destination[c], :] = src[b, c, :]  (a channel permutation).
  virtual void permute_channels(const float* src, float* dst, const int32_t* destination, int64_t batch,
                                int64_t channels, int64_t plane) = 0;
  // input [b, c, s*i+p, s*j+q] <-> output [b, c*s*s + s*p + q, i, j]; inverse does the opposite.
  virtual void pixel_unshuffle(const float* src, float* dst, int64_t batch, int64_t channels, int64_t height,
                               int64_t width, int64_t stride, bool inverse) = 0;
  // MaxMin. Plain: halves A = x[:, :n/2], B = x[:, n/2:], out = [min(A,B), max(A,B)].
  // Paired: on channel pairs (2i, 2i+1): out 2i = min, 2i+1 = max.
  virtual void maxmin_forward(const float* src, float* dst, int64_t batch, int64_t channels, int64_t plane,
                              bool paired) = 0;
  virtual void maxmin_backward(const float* src, const float* diff_dst, float* diff_src, int64_t batch,
                               int64_t channels, int64_t plane, bool paired) = 0;
  virtual void add_bias(float* dst, const float* bias, int64_t batch, int64_t channels, int64_t plane) = 0;
  // diff_bias[c] += sum over batch and plane of diff_dst.
  virtual void bias_backward(const float* diff_dst, float* diff_bias, int64_t batch, int64_t channels,
                             int64_t plane) = 0;

  // ---- SOC filter preparation, on [groups, C, C, k, k] filters ----
  // dst = (src - src^T) / 2, ^T swapping the channel axes and flipping both spatial axes. Linear and
  // self-adjoint up to sign structure: the gradient of M is skew_symmetrize(gradient of A).
  virtual void skew_symmetrize(const float* src, float* dst, int64_t groups, int64_t channels, int64_t kernel) = 0;
  // Runs `iterations` power-iteration rounds on each of the four reshapes (v then u, normalised per group with
  // the norm floored at 1e-12, see PowerIterationState), then writes per group
  // sigma[g] = min_i <A_g, u_i (x) v_i> (with the updated vectors) and which[g] = the argmin i (0..3).
  virtual void power_iteration(const float* filter, PowerIterationState& state, int64_t groups, int64_t channels,
                               int64_t kernel, int iterations, float* sigma, int32_t* which) = 0;
  // scaled = scale[g] * filter for each group g (scale has `groups` entries, host memory).
  virtual void scale_groups(const float* filter, const float* scale, float* scaled, int64_t groups,
                            int64_t group_size) = 0;
  // diff_filter[g] += coefficient[g] * (u_which (x) v_which) for each group (the gradient of sigma).
  virtual void add_sigma_gradient(const PowerIterationState& state, const int32_t* which, const float* coefficient,
                                  float* diff_filter, int64_t groups, int64_t channels, int64_t kernel) = 0;
  // Per-group inner products out[g] = <a_g, b_g> (host memory out).
  virtual void group_dot(const float* a, const float* b, float* out, int64_t groups, int64_t group_size) = 0;

  // ---- small dense matrices (SocConv's matrix path: one C x C matrix per group) ----
  // For b < shape.batch:  C_b = alpha * op(A_b) op(B_b) + beta * C_b + shift * I   (see MatmulShape; with
  // stride_c == 0 the batch is summed into one C, in an unspecified order).
  // b == nullptr: op(B_b) is the identity (inner == cols) and nothing is multiplied: C_b = alpha op(A_b) + ...
  // shift != 0 needs rows == cols (I is the identity of C_b). beta == 0: C is only written, never read (NaN or
  // garbage there does not propagate). c aliases neither a nor b. Device pointers; alpha, beta, shift by value.
  // Each entry of a product is a float32 dot product of `inner` terms (in any order, with or without FMA: the
  // vendor's GEMM, oneDNN's sgemm on the CPU, cuBLAS on CUDA); alpha scales that sum, beta * C and the shift are
  // added to it. The steps of Horner's rule on matrix polynomials are single calls:
  // T <- shift I + alpha op(A) T_next. The 1x1 convolutions of the matrix path on NCHW buffers are single calls
  // too: Y_n = P X_n (A stride 0, batch over images), dP^T = sum_n X_n dY_n^T (C stride 0).
  virtual void matmul(const MatmulShape& shape, float alpha, const float* a, const float* b, float beta, float shift,
                      float* c) = 0;

  // ---- training: loss and optimizer ----
  // Softmax cross-entropy over logits [batch, classes] (row-major) with host labels in [0, classes):
  // diff_logits = (softmax(logits) - onehot(label)) / batch, the gradient of the MEAN loss. Adds the summed
  // per-image loss (in double, natural log) to *loss_sum and the count of images whose first arg-max equals the
  // label to *correct (both host). Non-finite logits make *loss_sum non-finite; they are not an error here.
  virtual void softmax_cross_entropy(const float* logits, const int32_t* labels, int64_t batch, int64_t classes,
                                     float* diff_logits, double* loss_sum, int64_t* correct) = 0;
  // SGD with momentum, PyTorch semantics, in place on `count` floats:
  //   d = grad + weight_decay * param;  buf = first_step ? d : momentum_coef * buf + d;  param -= lr * buf.
  virtual void sgd_momentum(float* param, const float* grad, float* momentum, int64_t count, float lr,
                            float momentum_coef, float weight_decay, bool first_step) = 0;

  // Copies between this backend's memory and host memory.
  virtual void to_host(const float* src, float* host_dst, int64_t count) = 0;
  virtual void from_host(const float* host_src, float* dst, int64_t count) = 0;
  virtual void synchronize() {}

  // ---- activation scratch shared by the layers ----
  // kSharedBuffers buffers on this backend's device that every layer running on it may use within ONE call, never
  // to carry anything from one call to the next (SocConv's evaluation-mode series: x0 and two alternating terms).
  // A network's evaluation-mode forward thus needs these three activation buffers in all, reused layer after
  // layer, instead of K+1 per layer. The caller sizes a slot with Tensor::resize(shape, device()) (storage grows,
  // never shrinks). Same thread contract as the backend: one thread at a time.
  static constexpr int kSharedBuffers = 3;
  Tensor& shared_buffer(int slot);

 private:
  Tensor shared_buffers_[kSharedBuffers];
};

// The CPU backend (oneDNN). One instance per process is enough; it is thread-compatible, not thread-safe.
std::shared_ptr<Backend> cpu_backend();
// The CUDA backend, when built with it and a GPU is present; throws Error otherwise.
std::shared_ptr<Backend> cuda_backend();
bool cuda_available();
std::shared_ptr<Backend> backend_for(Device device);

}  // namespace orthoconv
