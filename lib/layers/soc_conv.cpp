// SocConv: the exponential of a (grouped) skew-symmetric convolution, by a truncated Taylor series, written
// once on the Backend interface. See include/orthoconv/soc_conv.hpp for the exact semantics.
//
// Forward (Horner): p_{K+1} = x0; p_j = x0 + (A_n / j) p_{j+1} for j = K..1; y = p_1. That is K convolutions,
// each ONE fused conv_forward_scaled call: the addition of x0 (and the 1/j, or filter copies A_n / j where
// the filter is small) are post-ops of the convolution, so the series costs K convolutions and no extra passes.
// Backward: with h_j = (dL/dp_j) / j:  h_1 = dL/dy,  h_{j+1} = A_n^T h_j / (j+1),  dL/dx0 = sum_j j h_j + A_n^T h_K,
// dL/dA_n = sum_j h_j (x) p_{j+1}: all K products in ONE backward-weights call over a batch of K*N images,
// since the p_{j+1} and the h_j are stored back to back.
// A_n is exactly skew-symmetric as an operator (A = (M - M^T)/2 is computed elementwise, so A^T = -A holds
// bit for bit, and scaling keeps it), so the transposed convolution A_n^T h is the FORWARD convolution by A_n
// with scale -1: the backward runs on the same forward primitive and weights, with -1/(j+1) as a post-op,
// and dL/dx0 is one weighted sum of the K+1 terms.
// 1x1 layers may take the matrix path instead (one convolution by the precomputed series matrix P):
// lib/layers/soc_matrix.cpp, chosen per shape by its cost model (SocConfig::path).
// bf16 (training mode on the series path, where the backend chooses it for the shape and pass): every
// convolution input is the term rounded once to bfloat16 (to_conv_input, K conversions per direction, kept in
// series_input_ / diff_series_input_, which also feed the stacked backward-weights); the float32 terms stay in
// series_ / diff_series_ for the addend x0, the output and the weighted sum. Where both the forward and the
// backward-weights run bf16, the forward's p_K..p_2 are wanted only rounded: each Horner step writes its term
// straight to its rounded slot (conv_forward_scaled_to_input: the same bits, without the float32 term's pass). Rounding
// p_{j+1} or h_j costs relative u times ||A_n / j|| in the result; rounding x0 or h_1 would cost u itself
// (tests/test_precision.cpp). The matrix path stays float32 (its one convolution's input is x0 itself).
#include "orthoconv/soc_conv.hpp"

#include <cmath>
#include <random>
#include <sstream>
#include <vector>

namespace orthoconv {

void SocConfig::validate() const {
  require(in_channels > 0, "SocConv in_channels must be positive, got ", in_channels);
  require(out_channels > 0, "SocConv out_channels must be positive, got ", out_channels);
  require(kernel > 0 && kernel % 2 == 1, "SocConv kernel must be odd and positive, got ", kernel);
  require(stride == 1 || stride == 2, "SocConv stride must be 1 or 2, got ", stride);
  require(groups > 0, "SocConv groups must be positive, got ", groups);
  int64_t channels = std::max(out_channels, unshuffled_channels());
  require(channels % groups == 0, "SocConv groups (", groups, ") must divide the series channels max(out ",
          out_channels, ", in*stride^2 ", unshuffled_channels(), ") = ", channels);
  require(train_terms > 0, "SocConv train_terms must be positive, got ", train_terms);
  require(eval_terms > 0, "SocConv eval_terms must be positive, got ", eval_terms);
  require(init_iterations >= 0, "SocConv init_iterations must be >= 0, got ", init_iterations);
  schedule.validate();
  require(!correction || (*correction > 0.0f && std::isfinite(*correction)),
          "SocConv correction must be positive and finite, got ", correction.value_or(0.0f));
  require(!is_matrix_path(path) || kernel == 1, "SocConv path=", soc_path_name(path), " needs kernel 1, got kernel ",
          kernel);
  if (keep == KeepChannels::per_group)
    require(out_channels % groups == 0, "SocConv keep=per-group needs groups (", groups, ") to divide out_channels (",
            out_channels, ")");
}

void PowerSchedule::validate() const {
  require(refresh_iterations >= 0 && update_iterations >= 0,
          "power-iteration schedule: iteration counts must be "
          ">= 0, got ",
          refresh_iterations, " and ", update_iterations);
  require(update_every > 0, "power-iteration schedule: update_every must be positive, got ", update_every);
}

std::string PowerSchedule::str() const {
  if (holds()) return "hold";
  return std::to_string(refresh_iterations) + "," + std::to_string(update_iterations) + "," +
         std::to_string(update_every);
}

PowerSchedule PowerSchedule::parse(const std::string& text) {
  if (text == "hold") return hold();
  PowerSchedule out;
  std::stringstream in(text);
  std::string part;
  std::vector<int64_t> values;
  while (std::getline(in, part, ',')) {
    size_t used = 0;
    long long value = -1;
    try {
      value = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    require(used == part.size() && !part.empty() && value >= 0 && value <= (1LL << 30),
            "power-iteration schedule: expected 'hold' or 'refresh,update,every' (e.g. 50,1,200), got '", text, "'");
    values.push_back(value);
  }
  require(values.size() == 3,
          "power-iteration schedule: expected 'hold' or 'refresh,update,every' (e.g. 50,1,200), "
          "got '",
          text, "'");
  out.refresh_iterations = static_cast<int>(values[0]);
  out.update_iterations = static_cast<int>(values[1]);
  out.update_every = values[2];
  out.validate();
  return out;
}

int64_t SocConfig::group_channels() const { return std::max(out_channels, unshuffled_channels()) / groups; }

float SocConfig::effective_correction() const {
  if (correction) return *correction;
  return kernel > 1 ? 0.7f : 1.0f;
}

namespace {

Tensor on_device(const std::vector<float>& host, const Shape& shape, Backend& backend) {
  Tensor t(shape, backend.device());
  backend.from_host(host.data(), t.data(), t.numel());
  return t;
}

}  // namespace

SocConv::SocConv(const SocConfig& config, std::shared_ptr<Backend> backend)
    : config_(config), backend_(std::move(backend)) {
  config_.validate();
  require(backend_ != nullptr, "SocConv needs a backend");
  backend_->check_precision(config_.precision);
  const int64_t g = config_.groups, c = config_.group_channels(), k = config_.kernel;
  Shape filter_shape{g, c, c, k, k};
  std::mt19937_64 rng(config_.seed);

  std::vector<float> host(static_cast<size_t>(filter_shape.numel()));
  std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(static_cast<float>(c)));
  for (float& x : host) x = normal(rng);
  weight_.name = "weight";
  weight_.value = on_device(host, filter_shape, *backend_);
  weight_.grad = Tensor(filter_shape, backend_->device());

  if (config_.bias) {
    std::vector<float> b(static_cast<size_t>(config_.out_channels));
    float bound = 1.0f / std::sqrt(static_cast<float>(config_.out_channels));
    std::uniform_real_distribution<float> uniform(-bound, bound);
    for (float& x : b) x = uniform(rng);
    bias_.name = "bias";
    bias_.value = on_device(b, Shape{config_.out_channels}, *backend_);
    bias_.grad = Tensor(Shape{config_.out_channels}, backend_->device());
  }

  std::normal_distribution<float> unit(0.0f, 1.0f);
  auto random_unit_rows = [&](int64_t rows_per_group) {
    std::vector<float> v(static_cast<size_t>(g * rows_per_group));
    for (int64_t gi = 0; gi < g; ++gi) {
      double norm = 0.0;
      for (int64_t i = 0; i < rows_per_group; ++i) {
        float x = unit(rng);
        v[static_cast<size_t>(gi * rows_per_group + i)] = x;
        norm += static_cast<double>(x) * x;
      }
      norm = std::max(std::sqrt(norm), 1e-12);
      for (int64_t i = 0; i < rows_per_group; ++i)
        v[static_cast<size_t>(gi * rows_per_group + i)] /= static_cast<float>(norm);
    }
    return on_device(v, Shape{g, rows_per_group}, *backend_);
  };
  for (int w = 0; w < 4; ++w) {
    power_.u[w] = random_unit_rows(PowerIterationState::u_length(w, c, k));
    power_.v[w] = random_unit_rows(PowerIterationState::v_length(w, c, k));
  }
  refresh_sigma(config_.init_iterations);
}

std::string SocConv::describe() const {
  std::ostringstream out;
  out << "soc " << config_.in_channels << "->" << config_.out_channels << " k" << config_.kernel << " s"
      << config_.stride << " g" << config_.groups << " (series on " << config_.group_channels() * config_.groups
      << " ch, terms " << config_.train_terms << "/" << config_.eval_terms;
  if (config_.path != SocPath::automatic) out << ", path " << soc_path_name(config_.path);
  if (config_.precision != ConvPrecision::fp32) out << ", training " << conv_precision_name(config_.precision);
  out << ")";
  return out.str();
}

Shape SocConv::output_shape(const Shape& input) const {
  require<ShapeError>(input.rank() == 4, "SocConv expects an NCHW input, got shape ", input.str());
  require<ShapeError>(input[1] == config_.in_channels, "SocConv expects ", config_.in_channels,
                      " input channels, got shape ", input.str());
  require<ShapeError>(input[2] > 0 && input[3] > 0 && input[2] % config_.stride == 0 && input[3] % config_.stride == 0,
                      "SocConv with stride ", config_.stride,
                      " needs a non-empty input with height and width "
                      "divisible by the stride, got shape ",
                      input.str());
  require<ShapeError>(input[0] > 0, "SocConv got an empty batch, shape ", input.str());
  return Shape{input[0], config_.out_channels, input[2] / config_.stride, input[3] / config_.stride};
}

std::vector<Parameter*> SocConv::parameters() {
  std::vector<Parameter*> out{&weight_};
  if (config_.bias) out.push_back(&bias_);
  return out;
}

std::vector<Buffer> SocConv::buffers() {
  std::vector<Buffer> out;
  for (int w = 0; w < 4; ++w) {
    out.push_back({"u" + std::to_string(w + 1), &power_.u[w]});
    out.push_back({"v" + std::to_string(w + 1), &power_.v[w]});
  }
  return out;
}

void SocConv::set_terms(int train_terms, int eval_terms) {
  require(train_terms > 0 && eval_terms > 0, "SocConv terms must be positive, got ", train_terms, " and ", eval_terms);
  config_.train_terms = train_terms;
  config_.eval_terms = eval_terms;
}

void SocConv::set_schedule(const PowerSchedule& schedule) {
  schedule.validate();
  config_.schedule = schedule;
}

void SocConv::set_precision(ConvPrecision precision) {
  backend_->check_precision(precision);
  config_.precision = precision;
}

int64_t SocConv::retained_bytes() const {
  int64_t floats = 0;
  for (const Tensor* t : {&skew_, &scaled_, &weights_forward_, &filter_scratch_, &series_, &diff_series_,
                          &series_input_, &diff_series_input_, &staging_, &diff_weights_, &diff_skew_, &scratch_,
                          &horner_, &transposed_, &series_matrix_, &adjoint_, &matrix_weights_})
    floats += t->storage_floats();
  return floats * static_cast<int64_t>(sizeof(float));
}

SocConv::RoundedInputs SocConv::rounded_inputs(const ConvShape& shape, int terms) const {
  ConvShape stacked = shape;
  stacked.batch = terms * shape.batch;
  RoundedInputs r;
  r.forward = backend_->conv_precision(shape, ConvPass::forward) == ConvPrecision::bf16;
  r.weights = backend_->conv_precision(stacked, ConvPass::backward_weights) == ConvPrecision::bf16;
  if (r.forward || r.weights) r.size = backend_->conv_input_size(shape);
  return r;
}

ConvShape SocConv::series_shape(int64_t batch) const {
  const int64_t channels = config_.group_channels() * config_.groups;
  ConvShape s;
  s.batch = batch;
  s.in_channels = s.out_channels = channels;
  s.height = input_shape_[2] / config_.stride;
  s.width = input_shape_[3] / config_.stride;
  s.kernel = config_.kernel;
  s.groups = config_.groups;
  s.precision = forward_precision_;
  return s;
}

void SocConv::prepare_filter(int iterations) {
  const int64_t g = config_.groups, c = config_.group_channels(), k = config_.kernel;
  skew_.resize(weight_.value.shape(), backend_->device());
  scaled_.resize(weight_.value.shape(), backend_->device());
  backend_->skew_symmetrize(weight_.value.data(), skew_.data(), g, c, k);
  sigma_.resize(static_cast<size_t>(g));
  scale_.resize(static_cast<size_t>(g));
  which_.resize(static_cast<size_t>(g));
  backend_->power_iteration(skew_.data(), power_, g, c, k, iterations, sigma_.data(), which_.data());
  const float correction = config_.effective_correction();
  for (int64_t i = 0; i < g; ++i) scale_[i] = correction / (sigma_[i] + 1e-12f);
  backend_->scale_groups(skew_.data(), scale_.data(), scaled_.data(), g, c * c * k * k);
}

void SocConv::refresh_sigma(int iterations) { prepare_filter(iterations); }

Tensor SocConv::skew_filter() {
  Tensor a(weight_.value.shape(), backend_->device());
  backend_->skew_symmetrize(weight_.value.data(), a.data(), config_.groups, config_.group_channels(), config_.kernel);
  return a;
}

Tensor SocConv::scaled_filter() {
  prepare_filter(0);
  Tensor out(scaled_.shape(), backend_->device());
  backend_->copy(scaled_.data(), out.data(), out.numel());
  return out;
}

void SocConv::forward(const Tensor& input, Tensor& output) {
  const Shape out_shape = output_shape(input.shape());
  input_shape_ = input.shape();
  int iterations = 0;
  if (training_) {
    iterations = config_.schedule.iterations_at(step_);
    ++step_;
  }
  prepare_filter(iterations);
  last_power_iterations_ = iterations;
  forward_terms_ = terms();
  forward_path_ = path_for(input_shape_);
  forward_precision_ = training_ && forward_path_ == SocPath::series ? config_.precision : ConvPrecision::fp32;
  // Training keeps the K+1 terms for the backward; evaluation runs in the backend's shared buffers and keeps only
  // (a handle to) the input, from which a backward recomputes the terms. Where x0 is the input itself, the
  // handle is all a backward needs of it in both modes.
  series_kept_ = training_;
  input_ = !series_kept_ || x0_is_input() ? input : Tensor();

  const int64_t n = input_shape_[0], g = config_.groups, c = config_.group_channels();
  const ConvShape shape = series_shape(n);
  const int64_t plane = shape.height * shape.width, channels = shape.in_channels;
  Backend& be = *backend_;
  output.resize(out_shape, backend_->device());
  float* y = output.data();
  const bool direct = config_.out_channels == channels;
  // The NCHW staging of y when channels are dropped. Evaluation: a shared buffer, sized as run_series sizes them:
  // x0's (free again once the series has run; matrix_gemm reads x0 while it writes y: the next one).
  float* staging = nullptr;
  if (!direct) {
    Tensor& t = series_kept_ ? staging_ : be.shared_buffer(forward_path_ == SocPath::matrix_gemm ? 1 : 0);
    t.resize(series_kept_ ? Shape{n, channels, shape.height, shape.width} : Shape{be.conv_buffer_size(shape)},
             backend_->device());
    staging = t.data();
  }
  run_series(input, series_kept_, direct ? y : staging);
  if (!direct) {
    if (config_.keep == KeepChannels::first)
      be.copy_channels(staging, channels, y, config_.out_channels, n, plane, false);
    else
      be.copy_channels(staging, c, y, config_.out_channels / g, n * g, plane, false);
  }
  if (config_.bias) be.add_bias(y, bias_.value.data(), n, config_.out_channels, plane);
}

bool SocConv::x0_is_input() const {
  return forward_path_ == SocPath::matrix_gemm && config_.stride == 1 &&
         config_.in_channels == config_.group_channels() * config_.groups;
}

int SocConv::x0_slot() const {
  switch (forward_path_) {
    case SocPath::matrix_conv:
      return 1;
    case SocPath::matrix_gemm:
      return 0;
    default:
      return forward_terms_;
  }
}

const float* SocConv::kept_x0() const {
  return x0_is_input() ? input_.data() : series_.data() + x0_slot() * buffer_size_;
}

void SocConv::run_series(const Tensor& input, bool keep, float* y) {
  const int K = forward_terms_;
  const int64_t n = input_shape_[0];
  const ConvShape shape = series_shape(n);
  const int64_t plane = shape.height * shape.width, channels = shape.in_channels;
  const int64_t unshuffled = config_.unshuffled_channels();
  buffer_size_ = backend_->conv_buffer_size(shape);
  Backend& be = *backend_;

  // Where x0 and p_j (j = K..1) live. Kept: series_ slot x0_slot() holds x0 and slot j-1 holds p_j, for the
  // backward (matrix_conv: slot 1 holds x0, slot 0 y = p_1; matrix_gemm: slot 0 holds x0 in NCHW, unless x0 is
  // the input). Not kept: x0 in shared buffer 0, p_j alternating between shared buffers 1 and 2; the NCHW
  // staging of x0 uses buffers 1 and 2 before the series needs them (conv_buffer_size >= any NCHW size of the
  // series channels). matrix_gemm builds x0 in NCHW where it stays.
  const bool matrix = forward_path_ != SocPath::series, gemm = forward_path_ == SocPath::matrix_gemm;
  float *x0, *staging, *unshuffle_target;
  if (keep) {
    if (!x0_is_input()) series_.resize(Shape{(x0_slot() + 1) * buffer_size_}, backend_->device());
    if (!gemm) staging_.resize(Shape{n, channels, shape.height, shape.width}, backend_->device());
    if (config_.stride > 1 && unshuffled != channels)
      scratch_.resize(Shape{n, unshuffled, shape.height, shape.width}, backend_->device());
    x0 = series_.data() + x0_slot() * buffer_size_;
    staging = gemm ? x0 : staging_.data();
    unshuffle_target = scratch_.data();
  } else {
    for (int b = 0; b < Backend::kSharedBuffers; ++b)
      be.shared_buffer(b).resize(Shape{buffer_size_}, backend_->device());
    x0 = be.shared_buffer(0).data();
    staging = gemm ? x0 : be.shared_buffer(1).data();
    unshuffle_target = be.shared_buffer(2).data();
  }
  auto p = [&](int j) -> float* {
    if (j == K + 1) return x0;
    return keep ? series_.data() + (j - 1) * buffer_size_ : be.shared_buffer(1 + (j & 1)).data();
  };

  // x0: pixel-unshuffle, then zero channels up to C*g, then into the conv layout.
  const float* x = input.data();
  if (config_.stride > 1) {
    float* target = unshuffled != channels ? unshuffle_target : staging;
    be.pixel_unshuffle(x, target, n, config_.in_channels, input_shape_[2], input_shape_[3], config_.stride, false);
    x = target;
  }
  if (unshuffled != channels) {
    be.copy_channels(x, unshuffled, staging, channels, n, plane, false);
    x = staging;
  }
  if (gemm) {
    matrix_forward(shape, x, y);
    return;
  }
  be.to_conv_layout(shape, x, x0);

  if (matrix) {
    matrix_forward(shape, x0, y != nullptr ? p(1) : nullptr);
  } else {
    // bf16 convolution inputs (training only): p_{s+1} rounded in series_input_ slot s-1, for the forward
    // convolutions and (the same rounded terms) the stacked backward-weights, where the backend runs them in bf16.
    const RoundedInputs low = rounded_inputs(shape, K);
    if (low.size) {
      series_input_.resize(Shape{K * low.size}, backend_->device());
      be.to_conv_input(shape, x0, series_input_.data() + (K - 1) * low.size);
    }
    auto rounded = [&](int j) { return series_input_.data() + (j - 1) * low.size; };  // p_{j+1}, j = 1..K

    // Slot 0 of weights_forward_ holds A_n in the conv layout (the backward uses it too). Where the filter is
    // small next to the activations (the wide early layers), slots 1..K hold A_n / j and the Horner steps only
    // add x0; elsewhere the 1/j is a post-op scale (with both post-ops oneDNN's kernels slow down at few
    // channels, up to 2.7x at 32 channels; copying a 9.4 MB filter K times would cost more at 512).
    // A_n / j is scaled in float32 (plain layout) and then converted, so that a bf16 copy is A_n / j rounded once.
    const int64_t wsize = be.conv_weights_size(shape, ConvPass::forward);
    const bool scaled_copies = K * wsize <= buffer_size_;
    weights_forward_.resize(Shape{(scaled_copies ? K + 1 : 1) * wsize}, backend_->device());
    float* w = weights_forward_.data();
    be.weights_to_conv_layout(shape, ConvPass::forward, scaled_.data(), w);
    if (scaled_copies) {
      filter_scratch_.resize(scaled_.shape(), backend_->device());
      for (int j = 2; j <= K; ++j) {
        be.axpby(1.0f / static_cast<float>(j), scaled_.data(), 0.0f, filter_scratch_.data(), scaled_.numel());
        be.weights_to_conv_layout(shape, ConvPass::forward, filter_scratch_.data(), w + j * wsize);
      }
    }
    for (int j = K; j >= 1; --j) {
      const float* src = low.forward ? rounded(j) : p(j + 1);
      const float* wj = scaled_copies && j > 1 ? w + j * wsize : w;
      const float alpha = scaled_copies ? 1.0f : 1.0f / static_cast<float>(j);
      if (low.forward && low.weights && j > 1) {
        // p_j is read only rounded (the next convolution, the stacked backward-weights): written only rounded.
        be.conv_forward_scaled_to_input(shape, src, wj, alpha, x0, p(j), rounded(j - 1));
      } else {
        be.conv_forward_scaled(shape, src, wj, alpha, x0, p(j));
        if (low.size && j > 1) be.to_conv_input(shape, p(j), rounded(j - 1));
      }
    }
  }
  if (y != nullptr) be.from_conv_layout(shape, p(1), y);
}

void SocConv::backward(const Tensor& diff_output, Tensor& diff_input) {
  require<ShapeError>(forward_terms_ > 0, "SocConv::backward called before forward");
  check_shape(diff_output, output_shape(input_shape_), "SocConv::backward diff_output");
  if (!series_kept_ && parameter_gradients_) {  // after an evaluation-mode forward: the terms, from the same input
    run_series(input_, true, nullptr);
    series_kept_ = true;
    if (!x0_is_input()) input_ = Tensor();
  }
  const int K = forward_terms_;
  const int64_t n = input_shape_[0], g = config_.groups, c = config_.group_channels(), k = config_.kernel;
  const ConvShape shape = series_shape(n);
  const int64_t plane = shape.height * shape.width, channels = shape.in_channels;
  const int64_t unshuffled = config_.unshuffled_channels();
  Backend& be = *backend_;
  const float* dy = diff_output.data();

  if (config_.bias && parameter_gradients_) be.bias_backward(dy, bias_.grad.data(), n, config_.out_channels, plane);

  // h_1 = dL/dy expanded to the series channels (zeros where channels were dropped).
  const float* expanded = dy;
  if (config_.out_channels != channels) {
    staging_.resize(Shape{n, channels, shape.height, shape.width}, backend_->device());
    if (config_.keep == KeepChannels::first)
      be.copy_channels(dy, config_.out_channels, staging_.data(), channels, n, plane, false);
    else
      be.copy_channels(dy, config_.out_channels / g, staging_.data(), c, n * g, plane, false);
    expanded = staging_.data();
  }
  // Series: slot j-1 holds h_j, slot K+1 dL/dx0. matrix_conv: slot 0 holds h = dL/dy, slot 1 dL/dx0. matrix_gemm
  // (NCHW): h is `expanded`, dL/dx0 goes to diff_input, or to slot 0 when unshuffle or padding follow.
  const bool matrix = forward_path_ != SocPath::series, gemm = forward_path_ == SocPath::matrix_gemm;
  const bool direct = config_.stride == 1 && unshuffled == channels;
  diff_input.resize(input_shape_, backend_->device());
  if (!gemm || !direct) diff_series_.resize(Shape{(gemm ? 1 : matrix ? 2 : K + 2) * buffer_size_}, backend_->device());
  auto dslot = [&](int s) { return diff_series_.data() + s * buffer_size_; };
  float* dx0 = gemm ? (direct ? diff_input.data() : dslot(0)) : dslot(matrix ? 1 : K + 1);
  if (!gemm) be.to_conv_layout(shape, expanded, dslot(0));
  if (parameter_gradients_) diff_weights_.resize(weight_.value.shape(), backend_->device());

  if (matrix) {
    matrix_backward(shape, gemm ? expanded : dslot(0), dx0, parameter_gradients_);
  } else {
    // bf16 convolution inputs (after a training-mode forward): h_{s+1} rounded in diff_series_input_ slot s.
    const RoundedInputs low = rounded_inputs(shape, K);
    if (low.size) {
      diff_series_input_.resize(Shape{K * low.size}, backend_->device());
      be.to_conv_input(shape, dslot(0), diff_series_input_.data());
    }
    auto h = [&](int s) { return low.forward ? diff_series_input_.data() + s * low.size : dslot(s); };
    // h_{j+1} = A_n^T h_j / (j+1) = -(A_n h_j) / (j+1), on the forward weights of this step.
    const float* w = weights_forward_.data();
    for (int j = 1; j < K; ++j) {
      be.conv_forward_scaled(shape, h(j - 1), w, -1.0f / static_cast<float>(j + 1), nullptr, dslot(j));
      if (low.size) be.to_conv_input(shape, dslot(j), diff_series_input_.data() + j * low.size);
    }
    // dL/dx0 = sum_j j h_j + A_n^T h_K: the last product into slot K, then the sum in one pass.
    be.conv_forward_scaled(shape, h(K - 1), w, -1.0f, nullptr, dslot(K));
    std::vector<const float*> sources(static_cast<size_t>(K + 1));
    std::vector<float> weights(static_cast<size_t>(K + 1));
    for (int j = 1; j <= K + 1; ++j) {
      sources[static_cast<size_t>(j - 1)] = dslot(j - 1);
      weights[static_cast<size_t>(j - 1)] = j <= K ? static_cast<float>(j) : 1.0f;
    }
    be.weighted_sum(sources.data(), weights.data(), K + 1, dx0, buffer_size_);

    if (parameter_gradients_) {
      // dL/dA_n in one call over the K stored (p_{j+1}, h_j) pairs.
      ConvShape stacked = shape;
      stacked.batch = K * n;
      be.conv_backward_weights(stacked, low.weights ? series_input_.data() : series_.data() + buffer_size_,
                               low.weights ? diff_series_input_.data() : dslot(0), diff_weights_.data());
    }
  }

  if (parameter_gradients_) {
    // Through A_n = correction * A / sigma(A) (u, v fixed), then A = (M - M^T) / 2.
    const int64_t group_size = c * c * k * k;
    std::vector<float> dots(static_cast<size_t>(g)), coefficient(static_cast<size_t>(g));
    be.group_dot(diff_weights_.data(), skew_.data(), dots.data(), g, group_size);
    for (int64_t i = 0; i < g; ++i) coefficient[i] = -scale_[i] * dots[i] / (sigma_[i] + 1e-12f);
    be.scale_groups(diff_weights_.data(), scale_.data(), diff_weights_.data(), g, group_size);
    be.add_sigma_gradient(power_, which_.data(), coefficient.data(), diff_weights_.data(), g, c, k);
    // skew_symmetrize is its own adjoint: dM = (dA - dA^T) / 2.
    diff_skew_.resize(weight_.value.shape(), backend_->device());
    be.skew_symmetrize(diff_weights_.data(), diff_skew_.data(), g, c, k);
    be.axpby(1.0f, diff_skew_.data(), 1.0f, weight_.grad.data(), weight_.grad.numel());
  }

  // dL/dx: NCHW (out of the conv layout), drop the padded channels, undo the pixel-unshuffle.
  const float* dx_nchw = dx0;
  if (!gemm) {
    staging_.resize(Shape{n, channels, shape.height, shape.width}, backend_->device());
    be.from_conv_layout(shape, dx0, direct ? diff_input.data() : staging_.data());
    dx_nchw = staging_.data();
  }
  if (direct) return;
  if (config_.stride == 1) {
    be.copy_channels(dx_nchw, channels, diff_input.data(), unshuffled, n, plane, false);
    return;
  }
  const float* unshuffled_grad = dx_nchw;
  if (unshuffled != channels) {
    scratch_.resize(Shape{n, unshuffled, shape.height, shape.width}, backend_->device());
    be.copy_channels(dx_nchw, channels, scratch_.data(), unshuffled, n, plane, false);
    unshuffled_grad = scratch_.data();
  }
  be.pixel_unshuffle(unshuffled_grad, diff_input.data(), n, config_.in_channels, input_shape_[2], input_shape_[3],
                     config_.stride, true);
}

}  // namespace orthoconv
