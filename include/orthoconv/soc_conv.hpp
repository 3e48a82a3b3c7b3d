// orthoconv/soc_conv.hpp: skew-orthogonal convolution (Singla & Feizi 2021), optionally grouped.
//
// SocConv(c_in -> c_out, kernel k odd, stride s in {1, 2}, groups g):
//   M            free parameter [g, C, C, k, k], C = max(c_out, c_in*s*s) / g, init N(0, 1/C)
//   A = (M - M^T)/2   M^T swaps the channel axes and flips both spatial axes: with zero "same" padding the
//                     convolution by A is exactly skew-symmetric, so exp(A) is orthogonal
//   sigma_g      per group, the minimum of four power-iteration estimates <A_g, u_i (x) v_i> over the reshapes
//                (out*h)x(in*w), (out*w)x(in*h), out x(in*h*w), in x(out*h*w) (v_i over the rows, u_i over the
//                columns; the reference's u1..v4, its update order v then u: PowerIterationState); u, v persist
//                across steps: init_iterations (50) at construction; in training mode the PowerSchedule's count
//                for the step counter (50 when it is a multiple of 200, else 1), then the counter advances; none
//                in evaluation mode. Gradients flow through sigma with u, v held fixed.
//   A_n = correction * A / (sigma + 1e-12), correction 0.7 for k > 1 and 1.0 for k = 1 unless set
//   input  [N, c_in, H, W] -> pixel-unshuffle by s -> zero channels appended up to C*g
//   y = sum_{i=0..K} A_n^i x / i!   (evaluated by Horner's rule: p = x; p = x + A_n p / j for j = K..1)
//          K = 5 terms in training, 12 in evaluation (configurable)
//   keep c_out channels (the first c_out, or the first c_out/g of each group), add the bias.
// Truncation: with rho = ||A_n||_2 the series misses exp(A_n) by at most sum_{i>K} rho^i / i! in norm.
// Precision: in training mode the series convolutions (forward, transposed, backward-weights) run in
// `precision` where the backend chooses it for the shape (Backend::conv_precision): with bf16 each convolution
// rounds its input (p_{j+1} or h_j) and A_n / j to bfloat16 and accumulates in float32; the terms handed on,
// x0 (Horner's addend), the output, every gradient and the filter preparation stay float32. Evaluation mode
// always runs float32, and so does the matrix path below (its one convolution's input is x0 itself: rounding it
// would cost u = 2^-8 in the output, where the series' rounded terms cost u ||A_n|| / j).
// Output [N, c_out, H/s, W/s]. Requires H, W divisible by s.
// Memory, with B = one batch of the series activations (N * C*g * H/s * W/s floats, channels padded to the
// backend's conv layout):
//   training forward   keeps K+1 B (the Horner terms p_1..p_K and x0, for the backward) and an NCHW staging B;
//                      the backward adds K+2 B (the terms of the gradient), also kept for the next step;
//                      bf16 adds the K rounded inputs of each direction (K B/2 each);
//   evaluation forward keeps nothing but its output: x0 and two alternating terms live in the backend's three
//                      shared buffers (Backend::shared_buffer), which every layer reuses in turn, so a whole
//                      network evaluates in 3 B of series memory (B of its widest layer), whatever K;
//   a backward after an evaluation-mode forward recomputes the K+1 terms from the input (K more convolutions;
//                      the input must be left unchanged in between, as for MaxMin) into the layer's own buffers,
//                      then proceeds as in training.
// Every mode also keeps the filter, A_n and the scaled filter copies (at most B in all). A 1x1 layer on the
// matrix path (below) keeps 2 B in training (x0 and y; matrix_gemm: x0 only, and nothing when x0 is the input
// itself (stride 1, no padded channels): then, in training too, the input must be left unchanged until the
// backward) and, in every mode, its K+2 C x C matrices per group
// (the Horner products T_2..T_K, P and P^T, for a backward) and the adjoints after a backward.
//
// Two ways to compute the series of a 1x1 layer (k = 1), the same operator up to float32 rounding:
//   series  K convolutions by A_n over the whole activation (Horner as above; always so for k > 1);
//   matrix  per group, the C x C matrix P = sum_{i=0..K} A_n^i / i! by Horner's rule on the matrices (K-1
//           products), then ONE 1x1 convolution by P; backward: one convolution by P^T for the input gradient,
//           one backward-weights call for dL/dP, and reverse-mode Horner on the matrices for dL/dA_n (exact).
//           P is applied either as a 1x1 convolution in the backend's conv layout (matrix-conv) or as batched
//           GEMMs Y_n = P X_n straight on the NCHW buffers (matrix-gemm: no layout conversions; dL/dP^T is one
//           GEMM summed over the images), chosen by soc_matrix_variant for the shape.
// SocConfig::path chooses; `automatic` takes the cheaper by soc_path_cost for each input shape and mode.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "orthoconv/layer.hpp"

namespace orthoconv {

enum class KeepChannels { first, per_group };

// The power iterations of a training-mode forward at step counter `step` (evaluation mode runs none):
// refresh_iterations when step % update_every == 0, else update_iterations. The reference's schedule is 50, 1,
// 200 (its init_iters, update_iters, update_freq). hold() keeps u, v fixed: no iterations, sigma follows M
// through the fixed vectors (for fine-tuning a trained model, or to study the estimate).
struct PowerSchedule {
  int refresh_iterations = 50;
  int update_iterations = 1;
  int64_t update_every = 200;

  static PowerSchedule hold() { return PowerSchedule{0, 0, 1}; }
  bool holds() const { return refresh_iterations == 0 && update_iterations == 0; }
  int iterations_at(int64_t step) const { return step % update_every == 0 ? refresh_iterations : update_iterations; }
  void validate() const;  // throws ConfigError naming the value
  // "50,1,200" (refresh, update, every) or "hold"; parse() reads both and throws ConfigError otherwise.
  std::string str() const;
  static PowerSchedule parse(const std::string& text);
  bool operator==(const PowerSchedule&) const = default;
};
// matrix: the matrix path, applied as soc_matrix_variant chooses; matrix_conv, matrix_gemm: that application.
enum class SocPath { automatic, series, matrix, matrix_conv, matrix_gemm };
// "auto" | "series" | "matrix" | "matrix-conv" | "matrix-gemm" (throws ConfigError)
SocPath parse_soc_path(const std::string& text);
std::string soc_path_name(SocPath path);
bool is_matrix_path(SocPath path);  // matrix, matrix_conv or matrix_gemm

// How the matrix path applies P to `channels` (C per group) x `plane` (H*W, after the pixel-unshuffle) images:
// matrix_gemm, one GEMM per image and group on the NCHW buffers, where C <= 4 * plane, else matrix_conv, oneDNN's
// 1x1 convolution in its blocked layout (which batches the pixels of all images into one GEMM, at the price of
// layout conversions). The GEMMs read P once per image: measured, they win up to C = 4 * plane and lose from
// C = 16 * plane (lib/layers/soc_matrix.cpp).
SocPath soc_matrix_variant(int64_t channels, int64_t plane);

// The cost model behind SocPath::automatic (lib/layers/soc_matrix.cpp, where the counts are derived): the
// multiply-adds and the bytes moved by what differs between the two paths of one 1x1 SocConv for one forward
// pass (and its backward, in training), with `groups` groups of `channels` (C) channels over `pixels` = N*H*W
// (after the pixel-unshuffle) and `terms` series terms. Shared work (layout reorders, channel copies, bias, the
// filter's skew, power iteration, scale and sigma gradient) is left out. series_time() and matrix_time() weigh
// the bytes at kMacsPerByte multiply-adds each; the matrix path is chosen when its time is not larger. In multiply-adds
// alone the two paths cross exactly at N*H*W = C; the bytes (the series streams the activations 3 times per
// term) move the crossover a little below: N*H*W = 0.88 C (C = 32) to 0.98 C (C = 512) in evaluation.
struct SocPathCost {
  static constexpr double kMacsPerByte = 4.0;  // a machine balance: ~100 GMAC/s against ~25 GB/s
  double series_macs = 0.0, series_bytes = 0.0;
  double matrix_macs = 0.0, matrix_bytes = 0.0;
  double series_time() const { return series_macs + kMacsPerByte * series_bytes; }
  double matrix_time() const { return matrix_macs + kMacsPerByte * matrix_bytes; }
  SocPath cheaper() const { return matrix_time() <= series_time() ? SocPath::matrix : SocPath::series; }
};
SocPathCost soc_path_cost(int64_t groups, int64_t channels, int64_t pixels, int terms, bool training);

struct SocConfig {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t kernel = 3;
  int64_t stride = 1;
  int64_t groups = 1;
  bool bias = true;
  int train_terms = 5;
  int eval_terms = 12;
  std::optional<float> correction;  // default: 0.7 for kernel > 1, 1.0 for kernel 1
  int init_iterations = 50;         // at construction, from random unit vectors
  PowerSchedule schedule;           // training-mode forwards
  KeepChannels keep = KeepChannels::first;
  uint64_t seed = 0;
  SocPath path = SocPath::automatic;  // matrix needs kernel 1; not part of the model (checkpoints ignore it)
  ConvPrecision precision = ConvPrecision::fp32;  // series convolutions in training mode (checked on the backend)

  void validate() const;  // throws ConfigError naming the setting and the value
  int64_t unshuffled_channels() const { return in_channels * stride * stride; }
  int64_t group_channels() const;  // C
  float effective_correction() const;
};

class SocConv : public Layer {
 public:
  explicit SocConv(const SocConfig& config, std::shared_ptr<Backend> backend = cpu_backend());

  std::string kind() const override { return "soc"; }
  std::string describe() const override;
  Shape output_shape(const Shape& input) const override;
  void forward(const Tensor& input, Tensor& output) override;
  void backward(const Tensor& diff_output, Tensor& diff_input) override;
  std::vector<Parameter*> parameters() override;
  std::vector<Buffer> buffers() override;

  const SocConfig& config() const { return config_; }
  int terms() const { return training_ ? config_.train_terms : config_.eval_terms; }
  void set_terms(int train_terms, int eval_terms);
  void set_schedule(const PowerSchedule& schedule);  // validated; takes effect at the next training forward
  // The path setting (throws ConfigError for a matrix path on k > 1), the path a forward on `input` would take in
  // the current mode (series, matrix_conv or matrix_gemm), and the path the last forward took (its backward takes
  // the same).
  void set_path(SocPath path);
  SocPath path_for(const Shape& input) const;
  SocPath last_path() const { return forward_path_; }
  void set_precision(ConvPrecision precision);  // throws ConfigError where the backend cannot run it

  Parameter& weight() { return weight_; }
  Parameter& bias() { return bias_; }
  int64_t step() const { return step_; }
  void set_step(int64_t step) { step_ = step; }
  // The last scales used by forward (per group), and how many power iterations the last forward ran.
  const std::vector<float>& sigma() const { return sigma_; }
  int last_power_iterations() const { return last_power_iterations_; }
  // Bytes of the working buffers this layer keeps between calls (series and gradient terms, staging, filter
  // copies), beyond its parameters, their gradients and u, v: see "Memory" above.
  int64_t retained_bytes() const;

  // The skew filter A = (M - M^T)/2 and the scaled filter A_n (plain layout [g, C, C, k, k]), computed from the
  // current M and power-iteration vectors without advancing anything.
  Tensor skew_filter();
  Tensor scaled_filter();
  // Re-runs `iterations` power iterations (used at construction and by tools), without a forward pass.
  void refresh_sigma(int iterations);

 private:
  ConvShape series_shape(int64_t batch) const;  // at forward_precision_
  // Which series passes take bf16 inputs at `shape` with `terms` terms (Backend::conv_precision): the forward
  // (and transposed) convolutions, the stacked backward-weights; and the floats of one rounded term.
  struct RoundedInputs {
    bool forward = false, weights = false;
    int64_t size = 0;  // 0 when neither
  };
  RoundedInputs rounded_inputs(const ConvShape& shape, int terms) const;
  void prepare_filter(int iterations);
  // x0 from `input`, then the Horner terms p_K..p_1 with forward_terms_ terms (or the matrices of the matrix
  // path); keep: in series_ (for the backward), else in the backend's shared buffers. Writes y = p_1 in NCHW
  // (series channels) to `y` unless it is null (a recompute for the backward).
  void run_series(const Tensor& input, bool keep, float* y);
  // Whether x0 is the input itself (matrix_gemm without unshuffle or padding: kept as input_), and where the
  // last forward keeps x0 otherwise (series_ slot).
  bool x0_is_input() const;
  int x0_slot() const;
  const float* kept_x0() const;
  // The matrix path (lib/layers/soc_matrix.cpp), on buffers of `shape` in the conv layout (matrix_conv) or NCHW
  // (matrix_gemm): the matrices, then y = P x0 unless y is null; and, from h = dL/dy, dx0 = P^T h and (with
  // weight_gradient) diff_weights_ = dL/dA_n from kept_x0().
  void matrix_forward(const ConvShape& shape, const float* x0, float* y);
  void matrix_backward(const ConvShape& shape, const float* h, float* dx0, bool weight_gradient);
  // y_n = P x_n per image and group on NCHW buffers of `shape` (P: [g, C, C]).
  void apply_nchw(const ConvShape& shape, const float* p, const float* x, float* y);

  SocConfig config_;
  std::shared_ptr<Backend> backend_;
  Parameter weight_;
  Parameter bias_;
  PowerIterationState power_;
  int64_t step_ = 0;
  int last_power_iterations_ = 0;

  // per-forward state kept for backward
  Tensor skew_;    // A [g, C, C, k, k]
  Tensor scaled_;  // A_n, plain layout
  std::vector<float> sigma_;
  std::vector<float> scale_;  // correction / (sigma + 1e-12)
  std::vector<int32_t> which_;
  Tensor weights_forward_;    // [K+1] copies in forward conv layout: slot j = A_n / j (slot 0 = A_n)
  Tensor filter_scratch_;     // plain, A_n / j on its way to weights_forward_
  Tensor series_;             // [K+1] x (batch in conv layout): slot s holds p_{s+1}; slot K = x0 (x0_slot())
  bool series_kept_ = false;  // series_ holds the last forward's terms (training mode, or recomputed)
  Tensor input_;              // the last forward's input (a handle), for a backward: evaluation mode or x0_is_input()
  Tensor diff_series_;        // [K+2] x (batch in conv layout): slot j-1 holds h_j, slot K+1 dL/dx0
  Tensor series_input_;       // bf16 passes: [K] conv inputs, slot s-1 = p_{s+1} rounded (s = 1..K)
  Tensor diff_series_input_;  // bf16 passes: [K] conv inputs, slot j-1 = h_j rounded (j = 1..K)
  Tensor staging_;            // NCHW, C*g channels
  Tensor diff_weights_;       // plain, dA_n
  Tensor diff_skew_;          // plain, dM
  Tensor scratch_;            // NCHW, the unshuffled channels
  // matrix path (soc_matrix.cpp): the transposed Horner partial products T_j = Q_j^T and the adjoints H'_j
  Tensor horner_;          // [g, K-1, C, C] T_2..T_K
  Tensor transposed_;      // [g, C, C] T_1 = P^T
  Tensor series_matrix_;   // [g, C, C] P
  Tensor adjoint_;         // [g, max(K-1, 1), C, C] H'_1..H'_{K-1}
  Tensor matrix_weights_;  // P, then P^T, in the forward conv layout
  Shape input_shape_;
  SocPath forward_path_ = SocPath::series;
  // Requested by the last forward for its series convolutions: config_.precision in training on the series path,
  // else fp32 (evaluation, and the matrix path, whose one convolution takes x0 itself).
  ConvPrecision forward_precision_ = ConvPrecision::fp32;
  int forward_terms_ = 0;
  int64_t buffer_size_ = 0;
};

}  // namespace orthoconv
