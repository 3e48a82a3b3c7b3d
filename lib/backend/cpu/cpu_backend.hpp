// The CPU backend: oneDNN for every convolution, plain OpenMP loops for the rest.
//
// Convolutions run in oneDNN's blocked layout (nChw16c with AVX-512, nChw8c otherwise), chosen here once:
// with plain NCHW oneDNN 2.6 falls back to im2col + GEMM, 2 to 5 times slower at LipConvnet's shapes.
// Every primitive (forward, forward-accumulate, backward-data, backward-weights, reorders) is created once
// per ConvShape and kept in a cache.
// bf16 (ConvShape::precision): a second set of forward and backward-weights primitives with bfloat16 src /
// diff_dst / weights, float32 dst / diff_weights and post-op addends, in the layout of the shape; created at
// the first bf16 request for a shape and chosen per pass (measured against float32 once, or always). A shape
// that requests bf16 is cached apart from its float32 twin: on a CPU with AMX it runs in nhwc where oneDNN has
// AMX bf16 kernels only in nhwc (grouped and dense shapes on planes of more than 4 pixels), and there its float32
// fallback runs in nhwc too.
#pragma once

#include <dnnl.hpp>
#include <array>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "orthoconv/backend.hpp"

namespace orthoconv::cpu {

// float32 -> bfloat16, round to nearest even (as oneDNN's conversions); NaN stays a (quiet) NaN.
void round_to_bf16(const float* src, uint16_t* dst, int64_t count);

// Runs body, turning a dnnl::error into a BackendError naming what failed and the convolution.
template <typename F>
auto dnnl_checked(const char* what, const ConvShape& shape, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    throw BackendError(detail::concat("oneDNN ", what, " failed for convolution ", shape.str(), ": ", e.what()));
  }
}

class CpuBackend final : public Backend {
 public:
  CpuBackend();
  ~CpuBackend() override;
  Device device() const override { return Device::cpu; }
  std::string name() const override;

  int64_t conv_buffer_size(const ConvShape& shape) override;
  void to_conv_layout(const ConvShape& shape, const float* nchw, float* dst) override;
  void from_conv_layout(const ConvShape& shape, const float* src, float* nchw) override;
  int64_t conv_weights_size(const ConvShape& shape, ConvPass pass) override;
  void weights_to_conv_layout(const ConvShape& shape, ConvPass pass, const float* plain, float* dst) override;
  void conv_forward(const ConvShape& shape, const float* src, const float* weights, float* dst,
                    bool accumulate) override;
  void conv_backward_data(const ConvShape& shape, const float* diff_dst, const float* weights,
                          float* diff_src) override;
  void conv_backward_weights(const ConvShape& shape, const float* src, const float* diff_dst,
                             float* diff_weights) override;
  void conv_forward_scaled(const ConvShape& shape, const float* src, const float* weights, float alpha,
                           const float* addend, float* dst) override;
  void conv_forward_scaled_to_input(const ConvShape& shape, const float* src, const float* weights, float alpha,
                                    const float* addend, float* scratch, float* dst_input) override;

  void check_precision(ConvPrecision precision) const override;
  ConvPrecision conv_precision(const ConvShape& shape, ConvPass pass) override;
  void set_precision_choice(PrecisionChoice choice) override;
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

  // Whether matmul runs `shape` (with this b) as one oneDNN matmul primitive, not sgemm per matrix: summed
  // products sum_b A_b B_b^T with a long inner dimension (inner >= 16 rows and cols, strided A and B), as the
  // matrix path's dL/dP^T = sum_n X_n dY_n^T at 32 channels on 32x32 planes. A fixed choice per shape.
  static bool summed_by_primitive(const MatmulShape& shape, const float* b);
  void matmul(const MatmulShape& shape, float alpha, const float* a, const float* b, float beta, float shift,
              float* c) override;

  void softmax_cross_entropy(const float* logits, const int32_t* labels, int64_t batch, int64_t classes,
                             float* diff_logits, double* loss_sum, int64_t* correct) override;
  void sgd_momentum(float* param, const float* grad, float* momentum, int64_t count, float lr, float momentum_coef,
                    float weight_decay, bool first_step) override;

  void to_host(const float* src, float* host_dst, int64_t count) override;
  void from_host(const float* host_src, float* dst, int64_t count) override;

  // The oneDNN implementation chosen for each pass of `shape` ("jit:avx512_core", ...), and for a bf16 shape
  // which passes run in bf16, with the timings that chose them; for benchmarks.
  std::string implementation(const ConvShape& shape);
  // One line per shape a bf16 choice was made for so far: the shape and, per pass, bf16 or fp32 and why.
  std::vector<std::string> precision_choices() const;
  // A measured bf16 candidate whose first run takes more than `factor` times the float32 run, and more than
  // `seconds`, is dropped without the timed rounds and never measured again at that shape (defaults 10 and 0.05 s:
  // below that a first run's one-time costs, such as AMX's set-up, can outweigh a tiny convolution; tests set 0, 0
  // to drop every candidate).
  void set_too_slow(double factor, double seconds) {
    too_slow_factor_ = factor;
    too_slow_seconds_ = seconds;
  }

 private:
  struct ConvKernels;
  struct ConvPrimitives;
  struct ShapeKey {
    int64_t n, ci, co, h, w, k, g;
    bool bf16;  // bf16 requested: its own layout where AMX wants nhwc (see primitives())
    bool operator<(const ShapeKey& o) const {
      return std::tie(n, ci, co, h, w, k, g, bf16) < std::tie(o.n, o.ci, o.co, o.h, o.w, o.k, o.g, o.bf16);
    }
  };
  ConvPrimitives& primitives(const ConvShape& shape);
  // The kernels `pass` of `shape` runs on (float32, or bf16 where conv_precision says so).
  ConvKernels& kernels(const ConvShape& shape, ConvPass pass);
  std::unique_ptr<ConvKernels> make_kernels(const ConvShape& shape, const ConvPrimitives& p,
                                            dnnl::memory::data_type input_type);
  // The forward primitive with post-ops alpha * conv (+ addend) of kernels k, created at its first use.
  struct ScaledPrimitive;
  // rounded: dst in the kernels' input type (bf16 kernels: conv_forward_scaled_to_input), else float32.
  ScaledPrimitive& scaled_primitive(const ConvShape& shape, ConvKernels& k, float alpha, bool addend, bool rounded);
  void run_scaled(const ConvShape& shape, ConvKernels& k, const float* src, const float* weights, float alpha,
                  const float* addend, float* dst, bool rounded = false);
  void run_backward_weights(const ConvShape& shape, ConvKernels& k, const float* src, const float* diff_dst,
                            float* diff_weights);
  bool choose_bf16(const ConvShape& shape, ConvPrimitives& p, ConvPass pass);
  static int64_t forward_weights_floats(const ConvKernels& k);  // the forward weights of k, in floats
  // Whether oneDNN's bf16 forward of `shape` in `layout` is one of its AMX kernels.
  bool amx_forward(const ConvShape& shape, dnnl::memory::format_tag layout) const;
  // Float32 backward-weights as one sgemm per group, dW_i = dY_i^T im2col(X_i), for convolutions on planes of
  // at most 4 pixels, where oneDNN 2.6's kernel is up to 6x slower (1024 channels at 2x2: 2.6 against 0.44 CPU s
  // for 2560 images; GS-SOC's 1024 channels in 4 groups at 2x2 and its 1x1 layers at 1x1 alike); im2col and dY
  // gathered from the conv layout into gemm_scratch_. Where the pixel matmul applies (pixel_matmul_applies: those
  // GS-SOC shapes) its backward-weights runs instead; this path keeps the other small planes (k = 1 at 2x2, groups
  // that are not whole channel blocks, padded channels).
  static bool gemm_backward_weights(const ConvShape& shape);
  void run_gemm_backward_weights(const ConvShape& shape, const ConvPrimitives& p, const float* src,
                                 const float* diff_dst, float* diff_weights);
  // The summed product of shape runs as one oneDNN matmul primitive over the batch into summed_scratch_, then
  // a sum over b in order (matmul.cpp).
  void run_summed_by_primitive(const MatmulShape& shape, float alpha, const float* a, const float* b, float beta,
                               float* c);
  // bf16 backward-weights at the planes of gemm_backward_weights as im2col + one oneDNN bf16 matmul batched over
  // the groups (AMX where the CPU has it), src / diff_dst bf16 conv inputs in a layout of `block` channels per
  // block; diff_weights plain float32, overwritten (bf16_gemm.cpp). Its matmul is created once per shape. Not
  // where the pixel matmul applies.
  void run_bf16_gemm_backward_weights(const ConvShape& shape, int64_t block, const float* src, const float* diff_dst,
                                      float* diff_weights);
  std::string bf16_gemm_implementation(const ConvShape& shape) const;  // oneDNN's matmul, once it ran
  // bf16 backward-weights of dense (one group) shapes in nhwc on planes of more than 4 pixels (SOC's layers with
  // AMX) as chunked im2col + bf16 matmul: oneDNN 2.6's AMX convolution backward-weights there is 4-15x slower
  // than float32 (256 channels 4x4, 640 images: 4725 against 95 CPU ms), its matmul is not.
  static bool nhwc_gemm_backward_weights(const ConvShape& shape, int64_t block);
  void run_bf16_nhwc_gemm_backward_weights(const ConvShape& shape, const float* src, const float* diff_dst,
                                           float* diff_weights);
  struct NhwcGemm {
    dnnl::matmul first, rest;  // a chunk overwriting dW', and one adding to it
    dnnl::memory::desc a, b, out;
    std::string impl;
  };
  struct Bf16Gemm {
    dnnl::matmul primitive;
    dnnl::memory::desc a, b, out;
    std::string impl;
  };
  // The forward at planes of at most 4 pixels whose kernel reaches every pixel (GS-SOC's 512 / 1024 channels in
  // 4 groups at 2x2, its 1x1 layers) as one matmul per group by a "pixel matrix" holding each tap once per pixel
  // pair that uses it (pixel_matmul.cpp): 2.25x fewer multiply-adds than the convolution at 2x2 with k = 3, and
  // oneDNN's matmul (AMX in bf16) instead of its convolution kernels, which are at their slowest at such planes.
  // Where a group's channels are whole blocks of the layout (or the plane is one pixel). The weights of such a
  // shape's forward are the pixel matrix in the matmul's format (conv_weights_size, weights_to_conv_layout).
  struct PixelMatmul {
    dnnl::memory::data_type type = dnnl::memory::data_type::f32;
    int64_t block = 1, groups = 1, rows = 1, size = 1, image = 1;  // size: cg * plane; image: values per image
    // Channels per block in the order of a group's (ci, q) values (pixel_offset): the layout's block, or all cg
    // channels at one pixel.
    int64_t row_block = 1;
    dnnl::memory::desc a, weights, c;
    dnnl::memory plain;  // the pixel matrix [groups, size, size] float32 (acb at one pixel), before its reorder
    dnnl::memory::desc plain_desc;
    dnnl::reorder reorder;
    dnnl::matmul primitive;                                 // no post-ops (bf16: then the addend pass)
    std::map<std::pair<float, bool>, dnnl::matmul> scaled;  // float32: (alpha, sum onto dst)
    std::optional<dnnl::matmul> backward;                   // bf16 backward-weights, created at its first use
    dnnl::memory::desc dy_t, x, gradient;
    std::string impl;
  };
  static bool pixel_matmul_applies(const ConvShape& shape, int64_t block);
  std::unique_ptr<PixelMatmul> make_pixel_matmul(const ConvShape& shape, int64_t block, dnnl::memory::data_type type);
  dnnl::matmul& pixel_scaled(PixelMatmul& pm, float alpha, bool sum);
  void pixel_weights(const ConvShape& shape, PixelMatmul& pm, const float* plain, float* dst);
  void pixel_matrix_rows(const ConvShape& shape, const PixelMatmul& pm, const float* plain, float* matrix);
  // Backward-weights where the forward is a pixel matmul: the pixel matrix's gradient per group, transposed (float32
  // sgemm on the conv layout in place; bf16 gathered + one AMX matmul), folded into the plain [g, o, i, k, k]
  // diff_weights (overwritten).
  void run_pixel_backward_weights(const ConvShape& shape, std::string& impl, PixelMatmul& pm, const float* src,
                                  const float* diff_dst, float* diff_weights);
  void fold_pixel_gradient(const ConvShape& shape, const PixelMatmul& pm, const float* matrix, float* diff_weights);
  // dst = alpha * conv(src) (+ addend, which may be dst itself); src in the kernels' input type.
  // rounded (bf16 only): dst is a conv input, the float32 result rounded once.
  void run_pixel_matmul(const ConvShape& shape, PixelMatmul& pm, const float* src, const float* weights, float alpha,
                        const float* addend, float* dst, bool rounded = false);
  dnnl::memory::desc activation_desc(const ConvShape& shape, int64_t channels, dnnl::memory::format_tag layout) const;
  dnnl::memory::desc plain_weights_desc(const ConvShape& shape) const;
  // bf16 kernels of grouped shapes with fewer than 16 channels per group (GS-SOC's 32 channels in 4 groups) run as
  // one dense convolution with block-diagonal weights: oneDNN 2.6 has no AMX or faster-than-float32 bf16 kernel
  // for 8-channel groups, while its dense AMX kernel, doing `groups` times the multiply-adds (of exact zeros), is
  // 1.5-1.7x faster than the grouped float32 one (32 channels at 32x32 in 4 groups, CPU ms: forward with the x0
  // addend 6.3 against 10.7 at 128 images, backward-weights 26 against 40 at 640). At most 4 groups, so the wasted
  // work stays bounded; the measured choice still decides per pass. Only with AMX (without it the dense
  // jit_bf16 kernel has no such margin). Zeros multiply exactly, so the result equals the grouped convolution's
  // but for summation order (and a non-finite input, which would spread to all groups).
  bool bf16_as_dense(const ConvShape& shape) const;
  dnnl::memory::desc dense_weights_desc(const ConvShape& shape) const;  // [C, C, k, k] float32 oihw
  // grouped [g, C/g, C/g, k, k] -> dense [C, C, k, k] with zeros off the diagonal blocks, and back (the diagonal).
  static void expand_groups(const ConvShape& shape, const float* grouped, float* dense);
  static void diagonal_groups(const ConvShape& shape, const float* dense, float* grouped);

  dnnl::engine engine_;
  dnnl::stream stream_;
  dnnl::memory::format_tag blocked_tag_;
  bool has_bf16_ = false;  // oneDNN's effective ISA includes AVX512-BF16
  bool has_amx_ = false;   // ... and AMX (bf16 tiles)
  PrecisionChoice precision_choice_ = PrecisionChoice::measured;
  double too_slow_factor_ = 10.0, too_slow_seconds_ = 0.05;
  std::map<ShapeKey, std::unique_ptr<ConvPrimitives>> cache_;
  // Scratch of the filter passes (filter.cpp), grown once: expanded vectors / accumulators, per-thread bins.
  std::vector<float> filter_scratch_, thread_scratch_;
  std::vector<float> gemm_scratch_;  // run_gemm_backward_weights: im2col(X) and dY, grown once
  // run_summed_by_primitive: the primitives keyed by (batch, rows, cols, inner, stride_a, stride_b), and the
  // batch of products before the sum, grown once.
  std::map<std::array<int64_t, 6>, dnnl::matmul> summed_products_;
  std::vector<float> summed_scratch_;
  std::map<ShapeKey, Bf16Gemm> bf16_gemm_;
  std::map<ShapeKey, NhwcGemm> bf16_nhwc_gemm_;
  std::vector<float> pixel_scratch_;         // run_pixel_matmul (bf16): gathered rows and the product, grown once
  std::vector<uint16_t> bf16_gemm_scratch_;  // run_bf16_gemm_backward_weights: im2col(X) and dY^T per group
};

}  // namespace orthoconv::cpu
