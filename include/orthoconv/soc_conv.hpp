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
// Output [N, c_out, H/s, W/s]. Requires H, W divisible by s.
// Memory, with B = one batch of the series activations (N * C*g * H/s * W/s floats, channels padded to the
// backend's conv layout):
//   training forward   keeps K+1 B (the Horner terms p_1..p_K and x0, for the backward) and an NCHW staging B;
//                      the backward adds K+2 B (the terms of the gradient), also kept for the next step;
//   evaluation forward keeps nothing but its output: x0 and two alternating terms live in the backend's three
//                      shared buffers (Backend::shared_buffer), which every layer reuses in turn, so a whole
//                      network evaluates in 3 B of series memory (B of its widest layer), whatever K;
//   a backward after an evaluation-mode forward recomputes the K+1 terms from the input (K more convolutions;
//                      the input must be left unchanged in between, as for MaxMin) into the layer's own buffers,
//                      then proceeds as in training.
// Every mode also keeps the filter, A_n and the scaled filter copies (at most B in all).
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
  int init_iterations = 50;  // at construction, from random unit vectors
  PowerSchedule schedule;    // training-mode forwards
  KeepChannels keep = KeepChannels::first;
  uint64_t seed = 0;

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
  ConvShape series_shape(int64_t batch) const;
  void prepare_filter(int iterations);
  // x0 from `input`, then the Horner terms p_K..p_1 with forward_terms_ terms; keep: in series_ (for the
  // backward), else in the backend's shared buffers. Returns p_1 (conv layout).
  const float* run_series(const Tensor& input, bool keep);

  SocConfig config_;
  std::shared_ptr<Backend> backend_;
  Parameter weight_;
  Parameter bias_;
  PowerIterationState power_;
  int64_t step_ = 0;
  int last_power_iterations_ = 0;

  // per-forward state kept for backward
  Tensor skew_;            // A [g, C, C, k, k]
  Tensor scaled_;          // A_n, plain layout
  std::vector<float> sigma_;
  std::vector<float> scale_;      // correction / (sigma + 1e-12)
  std::vector<int32_t> which_;
  Tensor weights_forward_;        // [K+1] copies in forward conv layout: slot j = A_n / j (slot 0 = A_n)
  Tensor series_;                 // [K+1] x (batch in conv layout): slot s holds p_{s+1}; slot K = x0
  bool series_kept_ = false;      // series_ holds the last forward's terms (training mode, or recomputed)
  Tensor input_;                  // the last evaluation-mode forward's input (a handle), for a backward
  Tensor diff_series_;            // [K+1] x (batch in conv layout): slot j-1 holds g_j / j
  Tensor staging_;                // NCHW, C*g channels
  Tensor diff_weights_;           // plain, dA_n
  Tensor diff_skew_;              // plain, dM
  Tensor scratch_;                // NCHW, the unshuffled channels
  Shape input_shape_;
  int forward_terms_ = 0;
  int64_t buffer_size_ = 0;
};

}  // namespace orthoconv
