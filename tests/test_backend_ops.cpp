// Every Backend operation on every available backend against the double-precision reference: ONE table of op
// cases (as ggml's tests/test-backend-ops.cpp), run by one harness on the CPU backend and, in builds with the
// CUDA backend and a usable GPU, on the GPU (the same table; hidden tag [.gpu], like tests/test_cuda_backend.cpp).
//
// A row of the table (OpCase) names the Backend member it compares with the reference (`op`), the members whose
// results feed that comparison (`uses`: layout conversions, size queries, ...), its shapes, and its tolerance
// with the reason. The harness
//  - runs each row through a RecordingBackend, which forwards every virtual member to the backend under test and
//    notes which were called: a row fails if it never called its own op, and the table run fails if a member a
//    row declares in `uses` was called by none of the rows that ran;
//  - puts every raw-pointer buffer (device buffers and the host arrays of scales, labels, sigma, ...) between
//    guard blocks of kGuard elements (inputs: a NaN, so a read past an end poisons the result; outputs: a huge
//    value of their own, so a write past an end changes it, checked bitwise after the op); inputs must come
//    back bit for bit unchanged; outputs start as NaN, so an element the op should write and does not fails too;
//  - compares element by element with the reference computed in double from the same float32 inputs.
// The coverage check (TEST_CASE "every Backend member ...") reads include/orthoconv/backend.hpp, collects the
// name of every virtual member of class Backend, and fails when one of them is named by no row (op or uses).
// Adding an op to the interface without a row therefore fails ctest; a pure virtual op also stops this file
// from compiling until RecordingBackend forwards it.
//
// Tolerances, from float32 arithmetic (unit roundoff u = 2^-24, round to nearest). A value computed from exact
// float32 inputs through a sum of n products, in any order, with or without FMA, is within
//   gamma_n * (the same sum over absolute values),   gamma_n = n u / (1 - n u)
// of the exact value (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). Every "sum" row checks that
// bound elementwise with its own n (the reduction length plus the extra roundings of scaling and addends): the
// magnitude is the reference evaluated on absolute values. Data movement (copies, permutations, MaxMin, layout
// conversions) must be exact. bf16 passes: the reference takes the inputs rounded to bfloat16 (round_to_bf16) and
// the same gamma_n applies to the float32 accumulation (a product of two bf16 numbers is exact in float32); the
// CUDA bf16 forward rounds its result to bf16 once more (+ 2^-8). tf32 passes: inputs rounded to 10-bit
// significands in an unspecified mode, so (1 + 2^-10)^2 (1 + gamma_n) - 1 against the unrounded reference. Power
// iteration and softmax have their own derivations next to their runners.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <limits>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "orthoconv/cuda_options.hpp"
#include "reference.hpp"

namespace ref = orthoconv::reference;
using namespace orthoconv;
using ref::Vec;

namespace {

// ---- arithmetic of the tolerances ----------------------------------------------------------------------------
constexpr double kUnit = 0x1p-24;      // float32 unit roundoff
constexpr double kBf16Unit = 0x1p-8;   // bfloat16: 8-bit significand, round to nearest
constexpr double kTf32Unit = 0x1p-10;  // tf32: 10 stored bits; rounding mode unspecified (truncation at worst)
constexpr double kDoubleUnit = 0x1p-53;

double gamma(int64_t n) { return static_cast<double>(n) * kUnit / (1.0 - static_cast<double>(n) * kUnit); }

enum class Check {
  exact,            // bit for bit
  sum,              // |got - exact| <= gamma(terms) * magnitude, elementwise
  power_iteration,  // a-posteriori bound along the reference's trajectory (see run_power_iteration)
  softmax,          // see run_softmax_cross_entropy
  contract,         // a query or a setting: its stated contract is checked
};

struct Tolerance {
  Check check = Check::exact;
  int64_t terms = 0;
  std::string reason;
};

Tolerance exact(std::string reason) { return {Check::exact, 0, std::move(reason)}; }
Tolerance sum(int64_t terms, std::string reason) { return {Check::sum, terms, std::move(reason)}; }
Tolerance derived(Check check, int64_t terms, std::string reason) { return {check, terms, std::move(reason)}; }

// ---- a Backend that forwards to the backend under test and notes which members were called ------------------
class RecordingBackend final : public Backend {
 public:
  explicit RecordingBackend(std::shared_ptr<Backend> inner) : inner_(std::move(inner)) {}
  const std::set<std::string>& calls() const { return calls_; }
  void clear_calls() { calls_.clear(); }

  Device device() const override { return note("device"), inner_->device(); }
  std::string name() const override { return note("name"), inner_->name(); }
  void check_precision(ConvPrecision precision) const override {
    note("check_precision");
    inner_->check_precision(precision);
  }
  ConvPrecision conv_precision(const ConvShape& shape, ConvPass pass) override {
    return note("conv_precision"), inner_->conv_precision(shape, pass);
  }
  void set_precision_choice(PrecisionChoice choice) override {
    note("set_precision_choice");
    inner_->set_precision_choice(choice);
  }
  int64_t conv_input_size(const ConvShape& shape) override {
    return note("conv_input_size"), inner_->conv_input_size(shape);
  }
  void to_conv_input(const ConvShape& shape, const float* src, float* dst) override {
    note("to_conv_input");
    inner_->to_conv_input(shape, src, dst);
  }
  int64_t conv_buffer_size(const ConvShape& shape) override {
    return note("conv_buffer_size"), inner_->conv_buffer_size(shape);
  }
  void to_conv_layout(const ConvShape& shape, const float* nchw, float* dst) override {
    note("to_conv_layout");
    inner_->to_conv_layout(shape, nchw, dst);
  }
  void from_conv_layout(const ConvShape& shape, const float* src, float* nchw) override {
    note("from_conv_layout");
    inner_->from_conv_layout(shape, src, nchw);
  }
  int64_t conv_weights_size(const ConvShape& shape, ConvPass pass) override {
    return note("conv_weights_size"), inner_->conv_weights_size(shape, pass);
  }
  void weights_to_conv_layout(const ConvShape& shape, ConvPass pass, const float* plain, float* dst) override {
    note("weights_to_conv_layout");
    inner_->weights_to_conv_layout(shape, pass, plain, dst);
  }
  void conv_forward(const ConvShape& shape, const float* src, const float* weights, float* dst,
                    bool accumulate) override {
    note("conv_forward");
    inner_->conv_forward(shape, src, weights, dst, accumulate);
  }
  void conv_backward_data(const ConvShape& shape, const float* diff_dst, const float* weights,
                          float* diff_src) override {
    note("conv_backward_data");
    inner_->conv_backward_data(shape, diff_dst, weights, diff_src);
  }
  void conv_backward_weights(const ConvShape& shape, const float* src, const float* diff_dst,
                             float* diff_weights) override {
    note("conv_backward_weights");
    inner_->conv_backward_weights(shape, src, diff_dst, diff_weights);
  }
  void conv_forward_scaled(const ConvShape& shape, const float* src, const float* weights, float alpha,
                           const float* addend, float* dst) override {
    note("conv_forward_scaled");
    inner_->conv_forward_scaled(shape, src, weights, alpha, addend, dst);
  }
  void conv_forward_scaled_to_input(const ConvShape& shape, const float* src, const float* weights, float alpha,
                                    const float* addend, float* scratch, float* dst_input) override {
    note("conv_forward_scaled_to_input");
    inner_->conv_forward_scaled_to_input(shape, src, weights, alpha, addend, scratch, dst_input);
  }
  void fill(float* dst, int64_t count, float value) override {
    note("fill");
    inner_->fill(dst, count, value);
  }
  void copy(const float* src, float* dst, int64_t count) override {
    note("copy");
    inner_->copy(src, dst, count);
  }
  void axpby(float alpha, const float* x, float beta, float* y, int64_t count) override {
    note("axpby");
    inner_->axpby(alpha, x, beta, y, count);
  }
  void weighted_sum(const float* const* sources, const float* scales, int inputs, float* dst, int64_t count) override {
    note("weighted_sum");
    inner_->weighted_sum(sources, scales, inputs, dst, count);
  }
  void copy_channels(const float* src, int64_t src_channels, float* dst, int64_t dst_channels, int64_t batch,
                     int64_t plane, bool accumulate) override {
    note("copy_channels");
    inner_->copy_channels(src, src_channels, dst, dst_channels, batch, plane, accumulate);
  }
  void permute_channels(const float* src, float* dst, const int32_t* destination, int64_t batch, int64_t channels,
                        int64_t plane) override {
    note("permute_channels");
    inner_->permute_channels(src, dst, destination, batch, channels, plane);
  }
  void pixel_unshuffle(const float* src, float* dst, int64_t batch, int64_t channels, int64_t height, int64_t width,
                       int64_t stride, bool inverse) override {
    note("pixel_unshuffle");
    inner_->pixel_unshuffle(src, dst, batch, channels, height, width, stride, inverse);
  }
  void maxmin_forward(const float* src, float* dst, int64_t batch, int64_t channels, int64_t plane,
                      bool paired) override {
    note("maxmin_forward");
    inner_->maxmin_forward(src, dst, batch, channels, plane, paired);
  }
  void maxmin_backward(const float* src, const float* diff_dst, float* diff_src, int64_t batch, int64_t channels,
                       int64_t plane, bool paired) override {
    note("maxmin_backward");
    inner_->maxmin_backward(src, diff_dst, diff_src, batch, channels, plane, paired);
  }
  void add_bias(float* dst, const float* bias, int64_t batch, int64_t channels, int64_t plane) override {
    note("add_bias");
    inner_->add_bias(dst, bias, batch, channels, plane);
  }
  void bias_backward(const float* diff_dst, float* diff_bias, int64_t batch, int64_t channels, int64_t plane) override {
    note("bias_backward");
    inner_->bias_backward(diff_dst, diff_bias, batch, channels, plane);
  }
  void skew_symmetrize(const float* src, float* dst, int64_t groups, int64_t channels, int64_t kernel) override {
    note("skew_symmetrize");
    inner_->skew_symmetrize(src, dst, groups, channels, kernel);
  }
  void power_iteration(const float* filter, PowerIterationState& state, int64_t groups, int64_t channels,
                       int64_t kernel, int iterations, float* sigma, int32_t* which) override {
    note("power_iteration");
    inner_->power_iteration(filter, state, groups, channels, kernel, iterations, sigma, which);
  }
  void scale_groups(const float* filter, const float* scale, float* scaled, int64_t groups,
                    int64_t group_size) override {
    note("scale_groups");
    inner_->scale_groups(filter, scale, scaled, groups, group_size);
  }
  void add_sigma_gradient(const PowerIterationState& state, const int32_t* which, const float* coefficient,
                          float* diff_filter, int64_t groups, int64_t channels, int64_t kernel) override {
    note("add_sigma_gradient");
    inner_->add_sigma_gradient(state, which, coefficient, diff_filter, groups, channels, kernel);
  }
  void group_dot(const float* a, const float* b, float* out, int64_t groups, int64_t group_size) override {
    note("group_dot");
    inner_->group_dot(a, b, out, groups, group_size);
  }
  void matmul(const MatmulShape& shape, float alpha, const float* a, const float* b, float beta, float shift,
              float* c) override {
    note("matmul");
    inner_->matmul(shape, alpha, a, b, beta, shift, c);
  }
  void softmax_cross_entropy(const float* logits, const int32_t* labels, int64_t batch, int64_t classes,
                             float* diff_logits, double* loss_sum, int64_t* correct) override {
    note("softmax_cross_entropy");
    inner_->softmax_cross_entropy(logits, labels, batch, classes, diff_logits, loss_sum, correct);
  }
  void sgd_momentum(float* param, const float* grad, float* momentum, int64_t count, float lr, float momentum_coef,
                    float weight_decay, bool first_step) override {
    note("sgd_momentum");
    inner_->sgd_momentum(param, grad, momentum, count, lr, momentum_coef, weight_decay, first_step);
  }
  void to_host(const float* src, float* host_dst, int64_t count) override {
    note("to_host");
    inner_->to_host(src, host_dst, count);
  }
  void from_host(const float* host_src, float* dst, int64_t count) override {
    note("from_host");
    inner_->from_host(host_src, dst, count);
  }
  void synchronize() override {
    note("synchronize");
    inner_->synchronize();
  }

 private:
  void note(const char* member) const { calls_.insert(member); }
  std::shared_ptr<Backend> inner_;
  mutable std::set<std::string> calls_;
};

// ---- guarded buffers ------------------------------------------------------------------------------------------
// Guard values. An input's guards hold a NaN: an op that reads past the input's end mixes NaN into its result,
// which then fails the comparison. The guards of outputs (and of buffers that are both) hold a huge finite value
// of their own (a different one per buffer): a write past the end stores something else there (a NaN, a copy of
// another buffer's value, a sum with the guard), which the bitwise check finds. A NaN there would hide a write of
// a NaN computed from an input's guard (NaN + NaN keeps the payload on x86).
constexpr int64_t kGuard = 64;                    // elements before and after: 256 bytes, four AVX-512 vectors
constexpr uint32_t kInputGuardBits = 0x7fc0dead;  // a quiet NaN with a payload
const float kPoison = std::numeric_limits<float>::quiet_NaN();  // initial value of outputs

float input_guard() {
  float value;
  std::memcpy(&value, &kInputGuardBits, sizeof value);
  return value;
}
// -(1 + id/64) 2^100, id cycling through 64 values: distinct for the buffers of one row.
float output_guard() {
  static int id = 0;
  id = (id + 1) % 64;
  return -std::ldexp(1.0f + float(id) / 64.0f, 100);
}
int32_t index_guard() { return -123456789; }

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Checks that the guard blocks of `storage` (kGuard elements at each end) still hold `guard`; names the first
// element that does not.
template <typename T>
void check_guards(const std::string& name, const std::vector<T>& storage, T guard) {
  const int64_t total = static_cast<int64_t>(storage.size()), count = total - 2 * kGuard;
  for (int64_t i = 0; i < total; ++i) {
    if (i == kGuard) i = kGuard + count;
    if (!same_bits(storage[static_cast<size_t>(i)], guard)) {
      const bool before = i < kGuard;
      FAIL_CHECK("buffer '" << name << "' (" << count << " elements): written "
                            << (before ? kGuard - i : i - kGuard - count + 1) << " element(s) "
                            << (before ? "before its start" : "past its end"));
      return;
    }
  }
}

template <typename T>
std::vector<T> with_guards(const std::vector<T>& values, T guard) {
  std::vector<T> storage(values.size() + 2 * kGuard, guard);
  std::copy(values.begin(), values.end(), storage.begin() + kGuard);
  return storage;
}

// A buffer of `count` floats in the backend's memory between guard blocks.
class DeviceBuffer {
 public:
  DeviceBuffer(Backend& backend, std::string name, const std::vector<float>& values, bool input)
      : backend_(backend),
        name_(std::move(name)),
        count_(static_cast<int64_t>(values.size())),
        input_(input),
        guard_(input ? input_guard() : output_guard()),
        initial_(values),
        storage_(Shape{count_ + 2 * kGuard}, backend.device()) {
    const auto host = with_guards(values, guard_);
    backend_.from_host(host.data(), storage_.data(), storage_.numel());
  }
  float* data() { return storage_.data() + kGuard; }
  int64_t count() const { return count_; }
  // The values, after checking the guards.
  std::vector<float> read() {
    std::vector<float> host(static_cast<size_t>(storage_.numel()));
    backend_.to_host(storage_.data(), host.data(), storage_.numel());
    check_guards(name_, host, guard_);
    return {host.begin() + kGuard, host.end() - kGuard};
  }
  // Guards intact and, for inputs, the values unchanged bit for bit.
  void verify() {
    const auto values = read();
    if (!input_) return;
    for (size_t i = 0; i < values.size(); ++i)
      if (!same_bits(values[i], initial_[i])) {
        FAIL_CHECK("input buffer '" << name_ << "' was changed at element " << i);
        return;
      }
  }

 private:
  Backend& backend_;
  std::string name_;
  int64_t count_;
  bool input_;
  float guard_;
  std::vector<float> initial_;
  Tensor storage_;
};

// A host array (scales, labels, sigma, which, ...) between guard blocks.
template <typename T>
class HostBuffer {
 public:
  HostBuffer(std::string name, const std::vector<T>& values, bool input)
      : name_(std::move(name)),
        input_(input),
        guard_(guard_for(input)),
        initial_(values),
        storage_(with_guards(values, guard_)) {}
  T* data() { return storage_.data() + kGuard; }
  std::vector<T> read() const {
    check_guards(name_, storage_, guard_);
    return {storage_.begin() + kGuard, storage_.end() - kGuard};
  }
  void verify() const {
    const auto values = read();
    if (input_)
      for (size_t i = 0; i < values.size(); ++i)
        if (!same_bits(values[i], initial_[i])) {
          FAIL_CHECK("input array '" << name_ << "' was changed at element " << i);
          return;
        }
  }

 private:
  static T guard_for(bool input) {
    if constexpr (std::is_same_v<T, float>)
      return input ? input_guard() : output_guard();
    else
      return index_guard();
  }
  std::string name_;
  bool input_;
  T guard_;
  std::vector<T> initial_;
  std::vector<T> storage_;
};

// Everything one row allocates; verify() checks every guard and every input at the end of the row.
class Buffers {
 public:
  explicit Buffers(Backend& backend) : backend_(backend) {}
  float* input(const std::string& name, const std::vector<float>& values) {
    return device_.emplace_back(backend_, name, values, true).data();
  }
  DeviceBuffer& output(const std::string& name, int64_t count) {
    return device_.emplace_back(backend_, name, std::vector<float>(static_cast<size_t>(count), kPoison), false);
  }
  DeviceBuffer& inout(const std::string& name, const std::vector<float>& values) {
    return device_.emplace_back(backend_, name, values, false);
  }
  template <typename T>
  T* host_input(const std::string& name, const std::vector<T>& values) {
    return host<T>().emplace_back(name, values, true).data();
  }
  template <typename T>
  HostBuffer<T>& host_output(const std::string& name, const std::vector<T>& initial) {
    return host<T>().emplace_back(name, initial, false);
  }
  void verify() {
    backend_.synchronize();
    for (auto& b : device_) b.verify();
    for (auto& b : host_floats_) b.verify();
    for (auto& b : host_ints_) b.verify();
  }

 private:
  template <typename T>
  std::deque<HostBuffer<T>>& host() {
    if constexpr (std::is_same_v<T, float>)
      return host_floats_;
    else
      return host_ints_;
  }
  Backend& backend_;
  std::deque<DeviceBuffer> device_;
  std::deque<HostBuffer<float>> host_floats_;
  std::deque<HostBuffer<int32_t>> host_ints_;
};

// ---- comparisons ----------------------------------------------------------------------------------------------
// |got[i] - exact[i]| <= relative * magnitude[i] for every i (false for NaN); names the worst element.
void expect_within(const std::string& what, const std::vector<float>& got, const Vec& exact, const Vec& magnitude,
                   double relative) {
  REQUIRE(got.size() == exact.size());
  REQUIRE(magnitude.size() == exact.size());
  int64_t bad = 0;
  size_t worst = 0;
  double worst_ratio = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double error = std::abs(static_cast<double>(got[i]) - exact[i]), bound = relative * magnitude[i];
    if (!(error <= bound)) {
      const double ratio = bound > 0.0 ? error / bound : std::numeric_limits<double>::infinity();
      if (bad++ == 0 || !(ratio <= worst_ratio)) worst = i, worst_ratio = ratio;
    }
  }
  if (bad == 0) return;
  FAIL_CHECK(what << ": " << bad << " of " << got.size() << " elements beyond the bound; worst element " << worst
                  << ": got " << got[worst] << ", reference " << exact[worst] << ", allowed +-"
                  << relative * magnitude[worst] << " (" << relative << " x magnitude " << magnitude[worst] << ")");
}

void expect_equal(const std::string& what, const std::vector<float>& got, const Vec& exact) {
  expect_within(what, got, exact, Vec(exact.size(), 0.0), 0.0);
}

Vec absolute(const Vec& values) {
  Vec out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = std::abs(values[i]);
  return out;
}

std::vector<float> random_floats(int64_t count, uint64_t seed, double stddev = 1.0) {
  return ref::to_float(ref::random_normal(static_cast<size_t>(count), seed, stddev));
}

// ---- the table ------------------------------------------------------------------------------------------------
struct OpCase;
using Runner = std::function<void(RecordingBackend&, Buffers&, const OpCase&)>;

struct OpCase {
  std::string op;                 // the Backend member whose result is compared with the reference
  std::vector<std::string> uses;  // members whose results feed that comparison
  std::string params;             // shapes and settings
  Tolerance tolerance;
  ConvPrecision precision = ConvPrecision::fp32;  // a reduced precision runs only where the backend runs it
  uint64_t seed = 1;
  Runner run;
};

// Called by every row through the guarded buffers and their final check.
const std::vector<std::string> kEveryRowUses = {"from_host", "to_host", "synchronize", "device"};

// ---- convolutions ----
struct ConvCase {
  int64_t batch, channels, height, width, kernel, groups;
};

enum class ConvOp { forward, accumulate, scaled_addend, scaled, scaled_to_input, backward_data, backward_weights };

const char* conv_op_name(ConvOp op) {
  switch (op) {
    case ConvOp::forward:
    case ConvOp::accumulate:
      return "conv_forward";
    case ConvOp::scaled_addend:
    case ConvOp::scaled:
      return "conv_forward_scaled";
    case ConvOp::scaled_to_input:
      return "conv_forward_scaled_to_input";
    case ConvOp::backward_data:
      return "conv_backward_data";
    default:
      return "conv_backward_weights";
  }
}

ConvPass conv_pass(ConvOp op) {
  return op == ConvOp::backward_data      ? ConvPass::backward_data
         : op == ConvOp::backward_weights ? ConvPass::backward_weights
                                          : ConvPass::forward;
}

ConvShape conv_shape(const ConvCase& c, ConvPrecision precision) {
  ConvShape s;
  s.batch = c.batch;
  s.in_channels = s.out_channels = c.channels;
  s.height = c.height;
  s.width = c.width;
  s.kernel = c.kernel;
  s.groups = c.groups;
  s.precision = precision;
  return s;
}

// Sets PrecisionChoice::always for a reduced-precision row (every shape with a reduced-precision kernel runs
// it) and the measured choice again afterwards.
struct PrecisionScope {
  PrecisionScope(Backend& backend, ConvPrecision precision)
      : backend_(backend), active_(precision != ConvPrecision::fp32) {
    if (active_) backend_.set_precision_choice(Backend::PrecisionChoice::always);
  }
  ~PrecisionScope() {
    if (active_) backend_.set_precision_choice(Backend::PrecisionChoice::measured);
  }
  Backend& backend_;
  bool active_;
};

void run_conv(const ConvCase& c, ConvOp op, RecordingBackend& be, Buffers& buffers, const OpCase& row) {
  PrecisionScope scope(be, row.precision);
  const ConvShape s = conv_shape(c, row.precision);
  const ConvPass pass = conv_pass(op);
  const ConvPrecision runs = be.conv_precision(s, pass);
  INFO("the pass runs in " << conv_precision_name(runs));
  const ref::ConvDims d{s.batch, s.in_channels, s.out_channels, s.height, s.width, s.kernel, s.groups};
  const auto x = random_floats(d.input_size(), row.seed);
  const auto w = random_floats(d.weight_size(), row.seed + 1, 1.0 / std::sqrt(double(d.weight_size() / c.channels)));
  const auto dy = random_floats(d.output_size(), row.seed + 2);
  const auto y0 = random_floats(d.output_size(), row.seed + 3);
  const int64_t conv_floats = be.conv_buffer_size(s);
  REQUIRE(conv_floats >= d.input_size());

  // An NCHW activation in the conv layout, and as a conv input where this pass runs bf16.
  auto conv_operand = [&](const std::string& name, const std::vector<float>& nchw, bool as_input) -> float* {
    float* conv = buffers.output(name + " (conv layout)", conv_floats).data();
    be.to_conv_layout(s, buffers.input(name, nchw), conv);
    if (!as_input || runs != ConvPrecision::bf16) return conv;
    float* rounded = buffers.output(name + " (bf16 conv input)", be.conv_input_size(s)).data();
    be.to_conv_input(s, conv, rounded);
    return rounded;
  };
  auto conv_weights = [&] {
    float* dst = buffers.output("w (conv layout)", be.conv_weights_size(s, pass)).data();
    be.weights_to_conv_layout(s, pass, buffers.input("w", w), dst);
    return dst;
  };
  auto plain_result = [&](const float* conv, const std::string& name) {
    DeviceBuffer& out = buffers.output(name, d.output_size());
    be.from_conv_layout(s, conv, out.data());
    return out.read();
  };
  // The reference's operands: rounded to bfloat16 where the pass runs bf16.
  auto operand = [&](const std::vector<float>& values) {
    return runs == ConvPrecision::bf16 ? ref::round_to_bf16(ref::to_double(values)) : ref::to_double(values);
  };
  const Vec xr = operand(x), wr = operand(w), dyr = operand(dy);

  std::vector<float> got;
  Vec exact, magnitude;
  if (pass == ConvPass::forward) {
    const float* src = conv_operand("x", x, true);
    const float* weights = conv_weights();
    float* dst = buffers.output("y (conv layout)", conv_floats).data();
    float alpha = 1.0f;
    const float* addend = nullptr;
    const bool with_addend = op == ConvOp::scaled_addend || op == ConvOp::scaled_to_input;
    if (op == ConvOp::accumulate) be.to_conv_layout(s, buffers.input("y0", y0), dst);
    if (with_addend) addend = conv_operand("y0", y0, false);
    if (op == ConvOp::forward || op == ConvOp::accumulate) {
      be.conv_forward(s, src, weights, dst, op == ConvOp::accumulate);
    } else if (op == ConvOp::scaled_to_input) {
      // The result as a bf16 conv input: its 2-byte values widened to float32 on the host (the conv layout's
      // element order), then back through from_conv_layout.
      alpha = -0.25f;
      DeviceBuffer& rounded = buffers.output("y (bf16 conv input)", be.conv_input_size(s));
      be.conv_forward_scaled_to_input(s, src, weights, alpha, addend, dst, rounded.data());
      const std::vector<float> packed = rounded.read();
      std::vector<uint16_t> halves(packed.size() * 2);
      std::memcpy(halves.data(), packed.data(), halves.size() * sizeof(uint16_t));
      std::vector<float> widened(static_cast<size_t>(conv_floats));
      for (size_t i = 0; i < widened.size(); ++i) {
        const uint32_t bits = uint32_t{halves[i]} << 16;
        std::memcpy(&widened[i], &bits, sizeof(bits));
      }
      dst = buffers.input("y (widened)", widened);
    } else {
      alpha = op == ConvOp::scaled ? 0.5f : -0.25f;
      be.conv_forward_scaled(s, src, weights, alpha, addend, dst);
    }
    got = plain_result(dst, "y");
    exact = ref::conv_forward(d, xr, wr);
    magnitude = ref::conv_forward(d, absolute(xr), absolute(wr));
    for (size_t i = 0; i < exact.size(); ++i) {
      const double add = op == ConvOp::accumulate || with_addend ? double(y0[i]) : 0.0;
      exact[i] = alpha * exact[i] + add;
      magnitude[i] = std::abs(alpha) * magnitude[i] + std::abs(add);
    }
  } else if (pass == ConvPass::backward_data) {
    const float* diff_dst = conv_operand("dy", dy, true);
    const float* weights = conv_weights();
    float* diff_src = buffers.output("dx (conv layout)", conv_floats).data();
    be.conv_backward_data(s, diff_dst, weights, diff_src);
    got = plain_result(diff_src, "dx");
    exact = ref::conv_backward_data(d, dyr, wr);
    magnitude = ref::conv_backward_data(d, absolute(dyr), absolute(wr));
  } else {
    const float* src = conv_operand("x", x, true);
    const float* diff_dst = conv_operand("dy", dy, true);
    DeviceBuffer& dw = buffers.output("dw", d.weight_size());
    be.conv_backward_weights(s, src, diff_dst, dw.data());
    got = dw.read();
    exact = ref::conv_backward_weights(d, xr, dyr);
    magnitude = ref::conv_backward_weights(d, absolute(xr), absolute(dyr));
  }
  double relative = gamma(row.tolerance.terms);
  if (runs == ConvPrecision::tf32) relative = (1 + kTf32Unit) * (1 + kTf32Unit) * (1 + relative) - 1;
  if (runs == ConvPrecision::bf16 && be.device() == Device::cuda && pass == ConvPass::forward) relative += kBf16Unit;
  if (op == ConvOp::scaled_to_input) relative = (1 + relative) * (1 + kBf16Unit) - 1;  // the result rounded once
  expect_within(row.op, got, exact, magnitude, relative);
}

void run_layout_roundtrip(const ConvCase& c, RecordingBackend& be, Buffers& buffers, const OpCase& row) {
  const ConvShape s = conv_shape(c, ConvPrecision::fp32);
  const auto x = random_floats(s.batch * s.in_channels * s.height * s.width, row.seed);
  const int64_t conv_floats = be.conv_buffer_size(s);
  REQUIRE(conv_floats >= static_cast<int64_t>(x.size()));
  DeviceBuffer& conv = buffers.output("x (conv layout)", conv_floats);
  be.to_conv_layout(s, buffers.input("x", x), conv.data());
  DeviceBuffer& back = buffers.output("x again", static_cast<int64_t>(x.size()));
  be.from_conv_layout(s, conv.data(), back.data());
  expect_equal("from_conv_layout(to_conv_layout(x))", back.read(), ref::to_double(x));
  // The padded slots are zeros (the layout's contract): the conv buffer holds x's values and zeros only.
  const auto layout = conv.read();
  int64_t zeros = 0;
  double sum_of_squares = 0.0;
  for (float v : layout) {
    zeros += v == 0.0f;
    sum_of_squares += double(v) * v;
  }
  CHECK(zeros == conv_floats - static_cast<int64_t>(x.size()));
  CHECK(sum_of_squares == Approx(ref::dot(ref::to_double(x), ref::to_double(x))).epsilon(1e-12));
}

void add_conv_cases(std::vector<OpCase>& table) {
  // Planes of 5x7 (not a multiple of any vector width), 12 channels (padded to 16 in oneDNN's nChw16c), depthwise,
  // k = 5, planes of 4 pixels (the small-plane GEMM backward-weights), a stacked batch of K = 5 terms x 4 images
  // (SocConv's one backward-weights call per layer), 64 channels.
  const ConvCase cases[] = {{3, 8, 5, 7, 1, 1},  {3, 12, 5, 7, 3, 4},  {2, 16, 6, 6, 3, 16}, {2, 24, 9, 5, 5, 2},
                            {4, 32, 2, 2, 3, 1}, {20, 16, 6, 6, 3, 2}, {1, 64, 8, 8, 3, 1}};
  const ConvOp ops[] = {ConvOp::forward,         ConvOp::accumulate,    ConvOp::scaled_addend,   ConvOp::scaled,
                        ConvOp::scaled_to_input, ConvOp::backward_data, ConvOp::backward_weights};
  const std::vector<std::string> conv_uses = {"to_conv_layout",    "from_conv_layout",       "conv_buffer_size",
                                              "conv_weights_size", "weights_to_conv_layout", "conv_precision"};
  uint64_t seed = 1000;
  for (const ConvCase& c : cases) {
    table.push_back(
        {"to_conv_layout",
         {"from_conv_layout", "conv_buffer_size"},
         conv_shape(c, ConvPrecision::fp32).str(),
         exact("a layout conversion moves values; the padded slots hold zeros"),
         ConvPrecision::fp32,
         seed += 10,
         [c](RecordingBackend& be, Buffers& b, const OpCase& row) { run_layout_roundtrip(c, be, b, row); }});
    for (ConvPrecision precision : {ConvPrecision::fp32, ConvPrecision::bf16, ConvPrecision::tf32})
      for (ConvOp op : ops) {
        if (precision == ConvPrecision::tf32 && op != ConvOp::forward && op != ConvOp::backward_weights) continue;
        if (op == ConvOp::scaled_to_input && precision != ConvPrecision::bf16) continue;  // a bf16 pass's input
        const ConvPass pass = conv_pass(op);
        const int64_t taps = (c.channels / c.groups) * c.kernel * c.kernel;
        const int64_t reduction = pass == ConvPass::backward_weights ? c.batch * c.height * c.width : taps;
        const int64_t extra = op == ConvOp::accumulate || op == ConvOp::scaled_addend || op == ConvOp::scaled_to_input
                                  ? 2
                              : op == ConvOp::scaled ? 1
                                                     : 0;
        std::ostringstream reason;
        reason << "each output sums " << reduction << " products"
               << (pass == ConvPass::backward_weights ? " (batch x plane)" : " (C/g k^2)");
        if (extra) reason << ", then " << (extra == 2 ? "alpha and the addend" : "alpha");
        reason << ": gamma_" << reduction + extra;
        if (precision == ConvPrecision::bf16) reason << " on bf16-rounded inputs";
        if (precision == ConvPrecision::tf32) reason << " and two tf32 input roundings";
        std::vector<std::string> uses = conv_uses;
        if (precision != ConvPrecision::fp32) {
          uses.insert(uses.end(), {"set_precision_choice", "check_precision"});
          if (precision == ConvPrecision::bf16 && pass != ConvPass::backward_data)
            uses.insert(uses.end(), {"to_conv_input", "conv_input_size"});
        }
        std::string params = conv_shape(c, precision).str();
        if (op == ConvOp::accumulate) params += ", accumulate";
        if (op == ConvOp::scaled_addend) params += ", alpha -0.25, addend";
        if (op == ConvOp::scaled) params += ", alpha 0.5, no addend";
        if (op == ConvOp::scaled_to_input) params += ", alpha -0.25, addend, result rounded to bf16 (+ 2^-8)";
        table.push_back(
            {conv_op_name(op), uses, params, sum(reduction + extra, reason.str()), precision, seed += 10,
             [c, op](RecordingBackend& be, Buffers& b, const OpCase& row) { run_conv(c, op, be, b, row); }});
      }
  }
}

// ---- elementwise and data movement ----
void add_elementwise_cases(std::vector<OpCase>& table) {
  const int64_t count = 1037;  // not a multiple of any vector width or block
  table.push_back({"fill",
                   {},
                   "1037 floats, 0.25",
                   exact("a store"),
                   ConvPrecision::fp32,
                   2001,
                   [count](RecordingBackend& be, Buffers& b, const OpCase&) {
                     DeviceBuffer& dst = b.output("dst", count);
                     be.fill(dst.data(), count, 0.25f);
                     expect_equal("fill", dst.read(), Vec(size_t(count), 0.25));
                   }});
  table.push_back({"copy",
                   {},
                   "1037 floats",
                   exact("a copy"),
                   ConvPrecision::fp32,
                   2002,
                   [count](RecordingBackend& be, Buffers& b, const OpCase& row) {
                     const auto x = random_floats(count, row.seed);
                     DeviceBuffer& dst = b.output("dst", count);
                     be.copy(b.input("src", x), dst.data(), count);
                     expect_equal("copy", dst.read(), ref::to_double(x));
                   }});
  table.push_back({"to_host",
                   {"from_host"},
                   "1037 floats",
                   exact("a copy between memories"),
                   ConvPrecision::fp32,
                   2003,
                   [count](RecordingBackend& be, Buffers& b, const OpCase& row) {
                     const auto x = random_floats(count, row.seed);
                     b.input("x", x);  // from_host of the guarded block; verify() reads it back with to_host
                     HostBuffer<float>& host =
                         b.host_output<float>("host copy", std::vector<float>(size_t(count), kPoison));
                     DeviceBuffer& device = b.inout("device", x);
                     be.to_host(device.data(), host.data(), count);
                     expect_equal("to_host", host.read(), ref::to_double(x));
                   }});
  // y = alpha x + beta y: two products and a sum, or an FMA and a product: gamma_2 of |alpha x| + |beta y|.
  struct Axpby {
    float alpha, beta;
    bool in_place;
  };
  for (const Axpby& a : {Axpby{1.5f, 0.0f, false}, Axpby{1.5f, 1.0f, false}, Axpby{1.5f, -0.5f, false},
                         Axpby{-0.75f, 0.5f, true}, Axpby{0.5f, 0.0f, true}}) {
    std::ostringstream params;
    params << count << " floats, alpha " << a.alpha << ", beta " << a.beta << (a.in_place ? ", x == y" : "")
           << (a.beta == 0.0f && !a.in_place ? ", y NaN (never read)" : "");
    table.push_back({"axpby",
                     {},
                     params.str(),
                     sum(2, "alpha x + beta y: two roundings"),
                     ConvPrecision::fp32,
                     2010,
                     [a, count](RecordingBackend& be, Buffers& b, const OpCase& row) {
                       const auto x = random_floats(count, row.seed), y = random_floats(count, row.seed + 1);
                       const bool y_unread = a.beta == 0.0f && !a.in_place;
                       DeviceBuffer& out = y_unread ? b.output("y", count) : b.inout("y", a.in_place ? x : y);
                       const float* src = a.in_place ? out.data() : b.input("x", x);
                       be.axpby(a.alpha, src, a.beta, out.data(), count);
                       Vec exact(static_cast<size_t>(count)), magnitude(static_cast<size_t>(count));
                       for (size_t i = 0; i < exact.size(); ++i) {
                         const double yi = a.in_place ? x[i] : y_unread ? 0.0 : y[i];
                         exact[i] = a.alpha * double(x[i]) + a.beta * yi;
                         magnitude[i] = std::abs(a.alpha * double(x[i])) + std::abs(a.beta * yi);
                       }
                       expect_within("axpby", out.read(), exact, magnitude, gamma(row.tolerance.terms));
                     }});
  }
  for (int inputs : {1, 3, 20}) {  // 20: more than one CUDA launch's worth of kernel parameters
    table.push_back({"weighted_sum",
                     {},
                     std::to_string(count) + " floats, " + std::to_string(inputs) + " sources",
                     sum(inputs, "a dot product of " + std::to_string(inputs) + " terms"),
                     ConvPrecision::fp32,
                     2020,
                     [inputs, count](RecordingBackend& be, Buffers& b, const OpCase& row) {
                       std::vector<std::vector<float>> sources;
                       std::vector<const float*> pointers;
                       std::vector<float> scales;
                       for (int i = 0; i < inputs; ++i) {
                         sources.push_back(random_floats(count, row.seed + uint64_t(i)));
                         pointers.push_back(b.input("source " + std::to_string(i), sources.back()));
                         scales.push_back(0.5f + 0.25f * float(i) * (i % 2 ? -1.0f : 1.0f));
                       }
                       DeviceBuffer& dst = b.output("dst", count);
                       be.weighted_sum(pointers.data(), b.host_input("scales", scales), inputs, dst.data(), count);
                       Vec exact(size_t(count), 0.0), magnitude(size_t(count), 0.0);
                       for (int i = 0; i < inputs; ++i)
                         for (size_t j = 0; j < exact.size(); ++j) {
                           exact[j] += double(scales[size_t(i)]) * sources[size_t(i)][j];
                           magnitude[j] += std::abs(double(scales[size_t(i)]) * sources[size_t(i)][j]);
                         }
                       expect_within("weighted_sum", dst.read(), exact, magnitude, gamma(row.tolerance.terms));
                     }});
  }
  for (auto [from, to] : {std::pair<int64_t, int64_t>{5, 8}, {8, 5}, {6, 6}})
    for (bool accumulate : {false, true}) {
      const int64_t batch = 3, plane = 35;
      table.push_back(
          {"copy_channels",
           {},
           std::to_string(from) + " -> " + std::to_string(to) + " channels, batch 3, plane 35" +
               (accumulate ? ", accumulate" : ""),
           accumulate ? sum(1, "one addition") : exact("a copy and zeros"),
           ConvPrecision::fp32,
           2030,
           [from = from, to = to, accumulate, batch, plane](RecordingBackend& be, Buffers& b, const OpCase& row) {
             const auto src = random_floats(batch * from * plane, row.seed);
             const auto dst0 = random_floats(batch * to * plane, row.seed + 1);
             DeviceBuffer& dst = accumulate ? b.inout("dst", dst0) : b.output("dst", batch * to * plane);
             be.copy_channels(b.input("src", src), from, dst.data(), to, batch, plane, accumulate);
             Vec exact = accumulate ? ref::to_double(dst0) : Vec(dst0.size(), 0.0);
             ref::copy_channels(ref::to_double(src), from, exact, to, batch, plane, accumulate);
             Vec magnitude = accumulate ? absolute(ref::to_double(dst0)) : Vec(dst0.size(), 0.0);
             ref::copy_channels(absolute(ref::to_double(src)), from, magnitude, to, batch, plane, accumulate);
             expect_within("copy_channels", dst.read(), exact, magnitude, gamma(row.tolerance.terms));
           }});
    }
  // Shuffles as ChannelShuffle builds them (from the reference's formula), including more channels than one CUDA
  // launch's chunk of the host permutation.
  for (auto [channels, groups, paired] :
       {std::tuple<int64_t, int64_t, bool>{16, 4, false}, {16, 4, true}, {1200, 8, false}, {1200, 6, true}}) {
    table.push_back(
        {"permute_channels",
         {},
         std::to_string(channels) + " channels, shuffle into " + std::to_string(groups) +
             (paired ? " groups, paired" : " groups") + ", batch 2, plane 6",
         exact("a permutation"),
         ConvPrecision::fp32,
         2040,
         [channels = channels, groups = groups, paired = paired](RecordingBackend& be, Buffers& b, const OpCase& row) {
           const int64_t batch = 2, plane = 6;
           const auto destination = ref::shuffle_destination(channels, groups, paired);
           const std::vector<int32_t> destination32(destination.begin(), destination.end());
           const auto src = random_floats(batch * channels * plane, row.seed);
           DeviceBuffer& dst = b.output("dst", batch * channels * plane);
           be.permute_channels(b.input("src", src), dst.data(), b.host_input("destination", destination32), batch,
                               channels, plane);
           expect_equal("permute_channels", dst.read(),
                        ref::permute_channels(ref::to_double(src), destination, batch, channels, plane));
         }});
  }
  struct Unshuffle {
    int64_t batch, channels, height, width, stride;
  };
  for (const Unshuffle& u : {Unshuffle{2, 3, 8, 6, 2}, Unshuffle{1, 2, 12, 8, 4}})
    for (bool inverse : {false, true}) {
      std::ostringstream params;
      params << u.channels << " x " << u.height << " x " << u.width << ", stride " << u.stride << ", batch " << u.batch
             << (inverse ? ", inverse" : "");
      table.push_back({"pixel_unshuffle",
                       {},
                       params.str(),
                       exact("a permutation"),
                       ConvPrecision::fp32,
                       2050,
                       [u, inverse](RecordingBackend& be, Buffers& b, const OpCase& row) {
                         const int64_t values = u.batch * u.channels * u.height * u.width;
                         const auto src = random_floats(values, row.seed);
                         DeviceBuffer& dst = b.output("dst", values);
                         be.pixel_unshuffle(b.input("src", src), dst.data(), u.batch, u.channels, u.height, u.width,
                                            u.stride, inverse);
                         const Vec x = ref::to_double(src);
                         expect_equal("pixel_unshuffle", dst.read(),
                                      inverse
                                          ? ref::pixel_shuffle(x, u.batch, u.channels, u.height, u.width, u.stride)
                                          : ref::pixel_unshuffle(x, u.batch, u.channels, u.height, u.width, u.stride));
                       }});
    }
  for (bool paired : {false, true})
    for (bool backward : {false, true}) {
      table.push_back(
          {backward ? "maxmin_backward" : "maxmin_forward",
           {},
           std::string("batch 4, 10 channels, plane 33, many ties") + (paired ? ", paired" : ""),
           exact(backward ? "gradient routing (ties: min from the first of the pair)" : "a selection"),
           ConvPrecision::fp32,
           2060,
           [paired, backward](RecordingBackend& be, Buffers& b, const OpCase& row) {
             const int64_t batch = 4, channels = 10, plane = 33, values = batch * channels * plane;
             auto x = random_floats(values, row.seed);
             for (float& v : x) v = std::round(v * 2.0f) / 2.0f;  // many ties
             const auto dy = random_floats(values, row.seed + 1);
             DeviceBuffer& out = b.output(backward ? "dx" : "y", values);
             if (backward) {
               be.maxmin_backward(b.input("x", x), b.input("dy", dy), out.data(), batch, channels, plane, paired);
               expect_equal(
                   "maxmin_backward", out.read(),
                   ref::maxmin_backward(ref::to_double(x), ref::to_double(dy), batch, channels, plane, paired));
             } else {
               be.maxmin_forward(b.input("x", x), out.data(), batch, channels, plane, paired);
               expect_equal("maxmin_forward", out.read(),
                            ref::maxmin(ref::to_double(x), batch, channels, plane, paired));
             }
           }});
    }
  {
    const int64_t batch = 5, channels = 7, plane = 1025;
    table.push_back({"add_bias",
                     {},
                     "batch 5, 7 channels, plane 1025",
                     sum(1, "one addition"),
                     ConvPrecision::fp32,
                     2070,
                     [=](RecordingBackend& be, Buffers& b, const OpCase& row) {
                       const auto x = random_floats(batch * channels * plane, row.seed);
                       const auto bias = random_floats(channels, row.seed + 1);
                       DeviceBuffer& dst = b.inout("dst", x);
                       be.add_bias(dst.data(), b.input("bias", bias), batch, channels, plane);
                       Vec exact = ref::to_double(x), magnitude = absolute(exact);
                       ref::add_bias(exact, ref::to_double(bias), batch, channels, plane);
                       ref::add_bias(magnitude, absolute(ref::to_double(bias)), batch, channels, plane);
                       expect_within("add_bias", dst.read(), exact, magnitude, gamma(row.tolerance.terms));
                     }});
    table.push_back({"bias_backward",
                     {},
                     "batch 5, 7 channels, plane 1025, added to diff_bias",
                     sum(batch * plane + 1, "a sum of batch x plane = 5125 terms and the old value"),
                     ConvPrecision::fp32,
                     2071,
                     [=](RecordingBackend& be, Buffers& b, const OpCase& row) {
                       const auto dy = random_floats(batch * channels * plane, row.seed);
                       const auto acc = random_floats(channels, row.seed + 1);
                       DeviceBuffer& diff_bias = b.inout("diff_bias", acc);
                       be.bias_backward(b.input("dy", dy), diff_bias.data(), batch, channels, plane);
                       Vec exact = ref::to_double(acc), magnitude = absolute(exact);
                       ref::bias_backward(ref::to_double(dy), exact, batch, channels, plane);
                       ref::bias_backward(absolute(ref::to_double(dy)), magnitude, batch, channels, plane);
                       expect_within("bias_backward", diff_bias.read(), exact, magnitude, gamma(row.tolerance.terms));
                     }});
  }
}

// ---- SOC filter preparation ----
struct FilterCase {
  int64_t groups, channels, kernel;
};
// 130 groups: more than one CUDA launch's chunk of per-group parameters (128).
const FilterCase kFilterCases[] = {{1, 16, 3}, {4, 8, 3}, {2, 12, 5}, {3, 10, 1}, {130, 2, 3}};

std::string filter_params(const FilterCase& c) {
  return std::to_string(c.groups) + " groups of " + std::to_string(c.channels) + " channels, kernel " +
         std::to_string(c.kernel);
}

// Random state vectors u_i, v_i (not normalised) in guarded device buffers, as Tensor views.
struct GuardedState {
  PowerIterationState state;
  std::array<Vec, 4> u, v;  // the initial values, in double
  DeviceBuffer* u_buffers[4];
  DeviceBuffer* v_buffers[4];
};

GuardedState guarded_state(Backend& be, Buffers& b, const FilterCase& c, uint64_t seed) {
  GuardedState s;
  for (int w = 0; w < 4; ++w) {
    const int64_t ul = PowerIterationState::u_length(w, c.channels, c.kernel);
    const int64_t vl = PowerIterationState::v_length(w, c.channels, c.kernel);
    const auto u = random_floats(c.groups * ul, seed + 2 * uint64_t(w));
    const auto v = random_floats(c.groups * vl, seed + 2 * uint64_t(w) + 1);
    s.u[w] = ref::to_double(u);
    s.v[w] = ref::to_double(v);
    s.u_buffers[w] = &b.inout("u" + std::to_string(w + 1), u);
    s.v_buffers[w] = &b.inout("v" + std::to_string(w + 1), v);
    s.state.u[w] = Tensor::view(s.u_buffers[w]->data(), Shape{c.groups, ul}, be.device());
    s.state.v[w] = Tensor::view(s.v_buffers[w]->data(), Shape{c.groups, vl}, be.device());
  }
  return s;
}

double norm2(const Vec& x) { return std::sqrt(ref::dot(x, x)); }

// Power iteration: a-posteriori error bounds along the exact trajectory. One half-round y = A x (x of unit norm
// with error e, ||delta x|| <= e) computes each entry as a sum of n products (n = the row length), so
// ||fl(A x^) - A x|| <= ||A||_F e + gamma_n || |A| (|x| + |delta x|) ||; normalising doubles a relative
// perturbation (||a/|a| - b/|b||| <= 2 ||a - b|| / |a|) and adds its own rounding (the norm: a sum of squares,
// gamma_len / 2; the division and the float store: 2u). sigma_i = <v_i, A_i u_i> sums n products of three
// factors (gamma_{n+1}) plus the vectors' errors times ||A||_F. sigma = min_i: its error is at most the largest of
// the four; `which` (the argmin) is checked where the two smallest estimates are further apart than their bounds.
// The bound can be loose by orders of magnitude where ||A x|| << ||A||_F (it uses the Frobenius norm for the
// spectral one), but an error in the algorithm (a wrong reshape, order or normalisation) moves the vectors by O(1).
// The exact path of one group's reshape w from its initial vectors, with the error bounds of a float32 run.
struct PowerPath {
  Vec u, v;                             // the vectors after `iterations` rounds
  double u_error = 0.0, v_error = 0.0;  // bounds on ||computed - exact||_2
  double sigma = 0.0, sigma_error = 0.0;
};

PowerPath power_path(const Vec& a, int64_t group, int64_t ch, int64_t k, int w, Vec u, Vec v, int iterations) {
  const Vec matrix = ref::power_reshape(a, group, ch, k, w);
  const int64_t cols = int64_t(u.size()), rows = int64_t(v.size());
  const double frobenius = norm2(matrix);
  PowerPath path;
  auto half_round = [&](const Vec& x, double x_error, Vec& y, bool transpose) {
    const int64_t n = transpose ? rows : cols;  // terms per entry
    const int64_t length = transpose ? cols : rows;
    Vec exact_y(size_t(length), 0.0), abs_y(size_t(length), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < cols; ++q) {
        const double m = matrix[size_t(r * cols + q)];
        const size_t to = size_t(transpose ? q : r), from = size_t(transpose ? r : q);
        exact_y[to] += m * x[from];
        abs_y[to] += std::abs(m * x[from]);
      }
    const double size = std::max(norm2(exact_y), 1e-12);
    const double product_error = frobenius * x_error + gamma(n) * (norm2(abs_y) + frobenius * x_error);
    for (double& value : exact_y) value /= size;
    y = exact_y;
    return 2.0 * product_error / size + gamma(length) / 2 + 2 * kUnit;
  };
  for (int it = 0; it < iterations; ++it) {
    path.v_error = half_round(u, path.u_error, v, false);
    path.u_error = half_round(v, path.v_error, u, true);
  }
  double magnitude = 0.0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < cols; ++q) {
      const double term = matrix[size_t(r * cols + q)] * v[size_t(r)] * u[size_t(q)];
      path.sigma += term;
      magnitude += std::abs(term);
    }
  path.sigma_error = gamma(rows * cols + 1) * magnitude +
                     frobenius * (path.u_error * norm2(v) + path.v_error * norm2(u) + path.u_error * path.v_error);
  path.u = std::move(u);
  path.v = std::move(v);
  return path;
}

// Power iteration: a-posteriori error bounds along the exact path (power_path). One half-round y = A x (x of unit
// norm with error e, ||delta x|| <= e) computes each entry as a sum of n products (n = the row length), so
// ||fl(A x^) - A x|| <= ||A||_F e + gamma_n || |A| (|x| + |delta x|) ||; normalising doubles a relative
// perturbation (||a/|a| - b/|b||| <= 2 ||a - b|| / |a|) and adds its own rounding (the norm: a sum of squares,
// gamma_len / 2; the division and the float store: 2u). sigma_i = <v_i, A_i u_i> sums n products of three
// factors (gamma_{n+1}) plus the vectors' errors times ||A||_F. sigma = min_i: its error is at most the largest of
// the four; `which` (the argmin) is checked where the two smallest estimates are further apart than their bounds.
// The bound is loose where ||A x|| << ||A||_F (the Frobenius norm stands in for the spectral one), but an error in
// the algorithm (a wrong reshape, order or normalisation) moves the vectors by O(1).
void run_power_iteration(const FilterCase& c, int iterations, RecordingBackend& be, Buffers& b, const OpCase& row) {
  const int64_t g = c.groups, ch = c.channels, k = c.kernel;
  const Vec a = ref::to_double(
      ref::to_float(ref::skew(ref::random_normal(size_t(g * ch * ch * k * k), row.seed, 0.3), g, ch, k)));
  GuardedState s = guarded_state(be, b, c, row.seed + 100);
  HostBuffer<float>& sigma = b.host_output<float>("sigma", std::vector<float>(size_t(g), kPoison));
  HostBuffer<int32_t>& which = b.host_output<int32_t>("which", std::vector<int32_t>(size_t(g), -1));
  be.power_iteration(b.input("filter", ref::to_float(a)), s.state, g, ch, k, iterations, sigma.data(), which.data());

  std::array<Vec, 4> u = s.u, v = s.v;
  ref::power_iterate(a, u, v, g, ch, k, iterations);
  const Vec exact_sigma = ref::power_sigma(a, u, v, g, ch, k);
  const auto got_sigma = sigma.read();
  const auto got_which = which.read();
  std::array<std::vector<float>, 4> got_u, got_v;
  for (int w = 0; w < 4; ++w) got_u[w] = s.u_buffers[w]->read(), got_v[w] = s.v_buffers[w]->read();
  auto distance = [](const std::vector<float>& got, const Vec& exact, int64_t at) {
    double d = 0.0;
    for (size_t i = 0; i < exact.size(); ++i) d += std::pow(double(got[size_t(at) + i]) - exact[i], 2);
    return std::sqrt(d);
  };
  for (int64_t group = 0; group < g; ++group) {
    double estimates[4], bounds[4];
    for (int w = 0; w < 4; ++w) {
      INFO("group " << group << ", u" << w + 1 << " / v" << w + 1 << " after " << iterations << " iterations");
      const int64_t ul = int64_t(u[w].size()) / g, vl = int64_t(v[w].size()) / g;
      const PowerPath path =
          power_path(a, group, ch, k, w, Vec(s.u[w].begin() + group * ul, s.u[w].begin() + (group + 1) * ul),
                     Vec(s.v[w].begin() + group * vl, s.v[w].begin() + (group + 1) * vl), iterations);
      // The path agrees with the reference's power_iterate (both double): the bounds follow the right path.
      REQUIRE(distance(ref::to_float(u[w]), path.u, group * ul) <= 1e-6);
      REQUIRE(distance(ref::to_float(v[w]), path.v, group * vl) <= 1e-6);
      if (iterations == 0) {  // nothing moves
        CHECK(distance(got_u[w], path.u, group * ul) == 0.0);
        CHECK(distance(got_v[w], path.v, group * vl) == 0.0);
      } else {
        CHECK(distance(got_u[w], path.u, group * ul) <= path.u_error);
        CHECK(distance(got_v[w], path.v, group * vl) <= path.v_error);
      }
      estimates[w] = path.sigma;
      bounds[w] = path.sigma_error;
    }
    INFO("group " << group << " sigma after " << iterations << " iterations");
    const int smallest = int(std::min_element(estimates, estimates + 4) - estimates);
    REQUIRE(std::abs(estimates[smallest] - exact_sigma[size_t(group)]) <= 1e-9 * (1 + std::abs(estimates[smallest])));
    CHECK(std::abs(double(got_sigma[size_t(group)]) - exact_sigma[size_t(group)]) <=
          *std::max_element(bounds, bounds + 4));
    bool clear = true;
    for (int w = 0; w < 4; ++w)
      if (w != smallest && estimates[w] - estimates[smallest] <= bounds[w] + bounds[smallest]) clear = false;
    if (clear) CHECK(got_which[size_t(group)] == smallest);
    CHECK((got_which[size_t(group)] >= 0 && got_which[size_t(group)] < 4));
  }
}

void add_filter_cases(std::vector<OpCase>& table) {
  for (const FilterCase& c : kFilterCases) {
    const int64_t group_size = c.channels * c.channels * c.kernel * c.kernel;
    table.push_back({"skew_symmetrize",
                     {},
                     filter_params(c),
                     sum(1, "(m - m^T) / 2: one subtraction, an exact halving"),
                     ConvPrecision::fp32,
                     3000,
                     [c](RecordingBackend& be, Buffers& b, const OpCase& row) {
                       const auto m =
                           random_floats(c.groups * c.channels * c.channels * c.kernel * c.kernel, row.seed, 0.3);
                       DeviceBuffer& a = b.output("a", int64_t(m.size()));
                       be.skew_symmetrize(b.input("m", m), a.data(), c.groups, c.channels, c.kernel);
                       const Vec md = ref::to_double(m), abs_m = absolute(md),
                                 skew_abs = ref::skew(abs_m, c.groups, c.channels, c.kernel);
                       Vec magnitude(md.size());  // (|m| + |m^T|) / 2 = |m| - skew(|m|)
                       for (size_t i = 0; i < md.size(); ++i) magnitude[i] = abs_m[i] - skew_abs[i];
                       expect_within("skew_symmetrize", a.read(), ref::skew(md, c.groups, c.channels, c.kernel),
                                     magnitude, gamma(row.tolerance.terms));
                     }});
    for (int iterations : {0, 1, 2})
      table.push_back(
          {"power_iteration",
           {},
           filter_params(c) + ", " + std::to_string(iterations) + " iterations",
           derived(
               Check::power_iteration, group_size,
               "matrix-vector products of rows of up to C k^2 terms, normalised; bounds carried along the exact path"),
           ConvPrecision::fp32,
           3010 + uint64_t(iterations),
           [c, iterations](RecordingBackend& be, Buffers& b, const OpCase& row) {
             run_power_iteration(c, iterations, be, b, row);
           }});
    table.push_back({"scale_groups",
                     {},
                     filter_params(c),
                     sum(1, "one product"),
                     ConvPrecision::fp32,
                     3020,
                     [c, group_size](RecordingBackend& be, Buffers& b, const OpCase& row) {
                       const auto f = random_floats(c.groups * group_size, row.seed);
                       std::vector<float> scale(size_t(c.groups));
                       for (int64_t i = 0; i < c.groups; ++i) scale[size_t(i)] = 0.5f + 0.01f * float(i);
                       DeviceBuffer& scaled = b.output("scaled", int64_t(f.size()));
                       be.scale_groups(b.input("filter", f), b.host_input("scale", scale), scaled.data(), c.groups,
                                       group_size);
                       Vec exact(f.size());
                       for (size_t i = 0; i < f.size(); ++i) exact[i] = double(scale[i / size_t(group_size)]) * f[i];
                       expect_within("scale_groups", scaled.read(), exact, absolute(exact), gamma(row.tolerance.terms));
                     }});
    table.push_back(
        {"add_sigma_gradient",
         {},
         filter_params(c) + ", which = 0..3 in turn",
         sum(3, "coefficient * u * v (two products) added to diff"),
         ConvPrecision::fp32,
         3030,
         [c](RecordingBackend& be, Buffers& b, const OpCase& row) {
           GuardedState s = guarded_state(be, b, c, row.seed);
           std::vector<int32_t> which(size_t(c.groups));
           std::vector<float> coefficient(size_t(c.groups));
           for (int64_t i = 0; i < c.groups; ++i) {
             which[size_t(i)] = static_cast<int32_t>((i + 1) % 4);
             coefficient[size_t(i)] = 0.3f - 0.1f * float(i % 7);
           }
           const auto diff0 = random_floats(c.groups * c.channels * c.channels * c.kernel * c.kernel, row.seed + 50);
           DeviceBuffer& diff = b.inout("diff_filter", diff0);
           be.add_sigma_gradient(s.state, b.host_input("which", which), b.host_input("coefficient", coefficient),
                                 diff.data(), c.groups, c.channels, c.kernel);
           Vec exact = ref::to_double(diff0), magnitude = absolute(exact);
           ref::add_sigma_gradient(s.u, s.v, which, ref::to_double(coefficient), exact, c.groups, c.channels, c.kernel);
           std::array<Vec, 4> abs_u, abs_v;
           for (int w = 0; w < 4; ++w) abs_u[w] = absolute(s.u[w]), abs_v[w] = absolute(s.v[w]);
           ref::add_sigma_gradient(abs_u, abs_v, which, absolute(ref::to_double(coefficient)), magnitude, c.groups,
                                   c.channels, c.kernel);
           expect_within("add_sigma_gradient", diff.read(), exact, magnitude, gamma(row.tolerance.terms));
         }});
    table.push_back({"group_dot",
                     {},
                     filter_params(c),
                     sum(group_size, "a dot product of C^2 k^2 terms"),
                     ConvPrecision::fp32,
                     3040,
                     [c, group_size](RecordingBackend& be, Buffers& b, const OpCase& row) {
                       const auto x = random_floats(c.groups * group_size, row.seed);
                       const auto y = random_floats(c.groups * group_size, row.seed + 1);
                       HostBuffer<float>& out =
                           b.host_output<float>("out", std::vector<float>(size_t(c.groups), kPoison));
                       be.group_dot(b.input("a", x), b.input("b", y), out.data(), c.groups, group_size);
                       Vec exact(size_t(c.groups), 0.0), magnitude(size_t(c.groups), 0.0);
                       for (size_t i = 0; i < x.size(); ++i) {
                         exact[i / size_t(group_size)] += double(x[i]) * y[i];
                         magnitude[i / size_t(group_size)] += std::abs(double(x[i]) * y[i]);
                       }
                       expect_within("group_dot", out.read(), exact, magnitude, gamma(row.tolerance.terms));
                     }});
  }
}

// ---- matmul ----
void add_matmul_cases(std::vector<OpCase>& table) {
  struct Case {
    int64_t batch, rows, cols, inner;
    bool ta, tb, no_b;
    int64_t stride_a, stride_b, stride_c;  // 0: packed; -1: stride 0 (A: broadcast; C: summed)
    float alpha, beta, shift;
  };
  const Case cases[] = {
      {1, 5, 5, 5, false, false, false, 0, 0, 0, 1.0f, 0.0f, 0.0f},
      {3, 7, 7, 7, true, false, false, 0, 0, 0, 0.5f, 0.0f, 1.0f},  // a Horner step of the matrix path
      {2, 6, 6, 6, true, true, false, 0, 0, 0, 0.25f, 0.0f, 0.0f},
      {2, 6, 6, 18, true, false, false, 0, 0, 0, 1.0f, 1.0f, 0.0f},     // the stacked product (inner 3C)
      {2, 3, 5, 4, false, true, false, 0, 0, 0, -2.0f, 0.5f, 0.0f},     // rectangular
      {3, 5, 5, 5, false, false, false, -1, 0, 40, 1.0f, 0.0f, -1.5f},  // A broadcast, C strided with gaps
      {2, 6, 6, 6, true, false, true, 0, 0, 0, 0.2f, 0.0f, 1.0f},       // B = I
      {1, 96, 96, 96, false, false, false, 0, 0, 0, 1.0f, 1.0f, 1.0f},
      {6, 4, 9, 4, false, false, false, -1, 40, 45, 1.0f, 0.0f, 0.0f},    // the 1x1 conv on NCHW: Y_n = P X_n
      {5, 4, 4, 9, false, true, false, 40, 45, -1, 1.0f, 0.0f, 0.0f},     // summed: dP^T = sum_n X_n dY_n^T
      {3, 5, 5, 7, true, false, false, 0, 0, -1, 0.5f, 1.5f, 1.0f},       // summed, with beta and shift
      {37, 6, 6, 5, false, true, false, 0, 0, -1, -1.0f, 0.0f, 0.0f},     // summed over more matrices than threads
      {4, 3, 3, 3, false, false, true, 0, 0, -1, 2.0f, 0.0f, 0.0f},       // summed, B = I
      {1, 192, 192, 576, true, false, false, 0, 0, 0, 1.0f, 1.0f, 0.0f},  // a long inner dimension
      // summed with inner >= 16 rows and cols: on the CPU one oneDNN matmul primitive, then the sum in order
      {5, 4, 4, 64, false, true, false, 300, 280, -1, 1.0f, 0.0f, 0.0f},  // as dP^T = sum_n X_n dY_n^T, strided
      {3, 4, 3, 80, false, true, false, 0, 0, -1, -0.5f, 1.5f, 0.0f},     // rectangular, with beta
      {4, 5, 5, 96, false, true, false, 0, 0, -1, 0.5f, 1.0f, 2.0f}};     // with beta and shift
  for (const Case& c : cases) {
    const ref::MatmulDims d{c.batch,
                            c.rows,
                            c.cols,
                            c.inner,
                            c.ta,
                            c.tb,
                            c.stride_a < 0   ? 0
                            : c.stride_a > 0 ? c.stride_a
                                             : c.rows * c.inner,
                            c.stride_b > 0 ? c.stride_b : c.inner * c.cols,
                            c.stride_c < 0   ? 0
                            : c.stride_c > 0 ? c.stride_c
                                             : c.rows * c.cols};
    // Each entry: alpha times a dot product of `inner` terms (B = I: one term), summed over the batch when C's
    // stride is 0, plus beta C and the shift.
    const int64_t products = (c.no_b ? 1 : c.inner) * (d.stride_c == 0 ? c.batch : 1);
    std::ostringstream params, reason;
    params << d.shape().str() << (c.no_b ? ", B = I" : "") << ", alpha " << c.alpha << ", beta " << c.beta << ", shift "
           << c.shift << (c.beta == 0.0f ? ", C NaN (never read)" : "");
    reason << products << " products, then alpha, beta C and the shift: gamma_" << products + 3;
    table.push_back(
        {"matmul",
         {},
         params.str(),
         sum(products + 3, reason.str()),
         ConvPrecision::fp32,
         4000,
         [c, d](RecordingBackend& be, Buffers& buffers, const OpCase& row) {
           const MatmulShape s = d.shape();
           const auto a = random_floats(s.stride_a * (c.batch - 1) + c.rows * c.inner, row.seed);
           const auto b = random_floats(s.stride_b * (c.batch - 1) + c.inner * c.cols, row.seed + 1);
           const auto c0 = random_floats(s.stride_c * (c.batch - 1) + c.rows * c.cols, row.seed + 2);
           // beta == 0 must not read C: NaN there stays out of the result.
           std::vector<float> initial = c0;
           if (c.beta == 0.0f) std::fill(initial.begin(), initial.end(), kPoison);
           DeviceBuffer& out = buffers.inout("c", initial);
           be.matmul(s, c.alpha, buffers.input("a", a), c.no_b ? nullptr : buffers.input("b", b), c.beta, c.shift,
                     out.data());
           Vec exact = ref::to_double(c0), magnitude = absolute(exact);
           ref::matmul(d, c.alpha, ref::to_double(a), c.no_b ? Vec{} : ref::to_double(b), c.beta, c.shift, exact);
           ref::matmul(d, std::abs(c.alpha), absolute(ref::to_double(a)), c.no_b ? Vec{} : absolute(ref::to_double(b)),
                       std::abs(c.beta), std::abs(c.shift), magnitude);
           auto got = out.read();
           // Entries between strided C matrices are not C's: left as they were (NaN where beta == 0).
           for (int64_t n = 0; n + 1 < c.batch; ++n)
             for (int64_t i = c.rows * c.cols; i < s.stride_c; ++i) {
               const size_t at = size_t(n * s.stride_c + i);
               CHECK(same_bits(got[at], initial[at]));
               got[at] = float(exact[at]);
             }
           expect_within("matmul", got, exact, magnitude, gamma(row.tolerance.terms));
         }});
  }
}

// ---- loss and optimizer ----
// Softmax cross-entropy, elementwise: p_j = exp(z_j - m) / S with m the row maximum. Evaluating z_j - m in float
// perturbs the exponent by u |z_j - m|, exp adds at most 2u, so each exp(.) has relative error (|z_j - m| + 2) u
// and S (a sum of `classes` of them) (max_k |z_k - m| + 2) u + gamma_classes; p_j's error is their sum plus u for
// the division; (p - onehot) / batch adds u |p - onehot| and u. The loss is a double sum (the contract): its
// error is double rounding over classes + batch operations, plus exp/log, on magnitudes |lse| + |z_label|.
void run_softmax_cross_entropy(int64_t batch, RecordingBackend& be, Buffers& b, const OpCase& row) {
  const int64_t classes = 100;
  auto logits = random_floats(batch * classes, row.seed, 3.0);
  logits[5] = logits[6];  // a tie for the first arg-max of row 0 (when it is the maximum)
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) labels[size_t(i)] = static_cast<int32_t>((i * 37) % classes);
  // Some rows labelled with their first arg-max, so `correct` counts something.
  for (int64_t i = 0; i < batch; i += 3) {
    const auto* z = logits.data() + i * classes;
    labels[size_t(i)] = static_cast<int32_t>(std::max_element(z, z + classes) - z);
  }
  DeviceBuffer& diff = b.output("diff_logits", batch * classes);
  double loss = 0.5;
  int64_t correct = 2;
  be.softmax_cross_entropy(b.input("logits", logits), b.host_input("labels", labels), batch, classes, diff.data(),
                           &loss, &correct);
  Vec exact_diff;
  int64_t exact_correct = 2;
  const Vec z = ref::to_double(logits);
  const double exact_loss = 0.5 + ref::softmax_cross_entropy(z, labels, batch, classes, exact_diff, &exact_correct);
  CHECK(correct == exact_correct);
  Vec magnitude(exact_diff.size());
  double loss_magnitude = 0.5;
  for (int64_t i = 0; i < batch; ++i) {
    const double* zi = z.data() + i * classes;
    const double top = *std::max_element(zi, zi + classes);
    double spread = 0.0, sum_exp = 0.0;
    for (int64_t j = 0; j < classes; ++j) spread = std::max(spread, top - zi[j]), sum_exp += std::exp(zi[j] - top);
    const double row_error = (2 * spread + 5) * kUnit + gamma(classes);
    for (int64_t j = 0; j < classes; ++j) {
      const size_t at = size_t(i * classes + j);
      const double p = std::exp(zi[j] - top) / sum_exp;
      // |error| <= (row_error p + u |p - onehot| + u |exact|) / batch-normalised: as one relative bound on
      // the magnitude p / batch + |exact|.
      magnitude[at] = (row_error * p) / double(batch) + 2 * kUnit * std::abs(exact_diff[at]);
    }
    loss_magnitude += std::abs(top + std::log(sum_exp)) + std::abs(zi[labels[size_t(i)]]);
  }
  expect_within("softmax_cross_entropy diff_logits", diff.read(), exact_diff, magnitude, 1.0);
  CHECK(std::abs(loss - exact_loss) <= (classes + batch + 16) * kDoubleUnit * loss_magnitude);
}

void add_train_cases(std::vector<OpCase>& table) {
  for (int64_t batch : {int64_t{7}, int64_t{1000}})  // 1000 rows: two CUDA launches' chunks of labels
    table.push_back(
        {"softmax_cross_entropy",
         {},
         "batch " + std::to_string(batch) + ", 100 classes, logits N(0, 9)",
         derived(Check::softmax, 100, "exp of float differences and a sum of 100 terms; the loss in double"),
         ConvPrecision::fp32,
         5000,
         [batch](RecordingBackend& be, Buffers& b, const OpCase& row) {
           run_softmax_cross_entropy(batch, be, b, row);
         }});
  for (bool first : {true, false})
    table.push_back(
        {"sgd_momentum",
         {},
         std::string("4099 floats, lr 0.1, momentum 0.9, weight decay 5e-4") + (first ? ", first step" : ""),
         sum(6, "param and momentum are sums of at most 4 products reached through at most 6 roundings"),
         ConvPrecision::fp32,
         5010,
         [first](RecordingBackend& be, Buffers& b, const OpCase& row) {
           const int64_t count = 4099;
           const float lr = 0.1f, mom = 0.9f, wd = 5e-4f;
           const auto p0 = random_floats(count, row.seed), g = random_floats(count, row.seed + 1),
                      m0 = random_floats(count, row.seed + 2);
           DeviceBuffer& param = b.inout("param", p0);
           DeviceBuffer& momentum = first ? b.output("momentum", count) : b.inout("momentum", m0);
           be.sgd_momentum(param.data(), b.input("grad", g), momentum.data(), count, lr, mom, wd, first);
           Vec p = ref::to_double(p0), m = ref::to_double(m0);
           ref::sgd_momentum(p, ref::to_double(g), m, lr, mom, wd, first);
           Vec m_magnitude(static_cast<size_t>(count)), p_magnitude(static_cast<size_t>(count));
           for (size_t i = 0; i < m_magnitude.size(); ++i) {
             m_magnitude[i] =
                 std::abs(double(g[i])) + std::abs(double(wd) * p0[i]) + (first ? 0.0 : std::abs(double(mom) * m0[i]));
             p_magnitude[i] = std::abs(double(p0[i])) + double(lr) * m_magnitude[i];
           }
           expect_within("sgd_momentum momentum", momentum.read(), m, m_magnitude, gamma(row.tolerance.terms));
           expect_within("sgd_momentum param", param.read(), p, p_magnitude, gamma(row.tolerance.terms));
         }});
}

// ---- queries and settings ----
void add_contract_cases(std::vector<OpCase>& table) {
  table.push_back({"name",
                   {"device"},
                   "-",
                   derived(Check::contract, 0, "names its device"),
                   ConvPrecision::fp32,
                   6000,
                   [](RecordingBackend& be, Buffers&, const OpCase&) {
                     const std::string name = be.name();
                     CHECK_FALSE(name.empty());
                     CHECK(name.rfind(be.device() == Device::cuda ? "cuda" : "cpu", 0) == 0);
                   }});
  table.push_back({"check_precision",
                   {"conv_precision"},
                   "fp32 on a 16-channel 3x3 shape",
                   derived(Check::contract, 0, "fp32 always runs, and runs in fp32"),
                   ConvPrecision::fp32,
                   6001,
                   [](RecordingBackend& be, Buffers&, const OpCase&) {
                     CHECK_NOTHROW(be.check_precision(ConvPrecision::fp32));
                     const ConvShape s = conv_shape({2, 16, 4, 4, 3, 1}, ConvPrecision::fp32);
                     for (ConvPass pass : {ConvPass::forward, ConvPass::backward_data, ConvPass::backward_weights})
                       CHECK(be.conv_precision(s, pass) == ConvPrecision::fp32);
                   }});
}

const std::vector<OpCase>& op_cases() {
  static const std::vector<OpCase> table = [] {
    std::vector<OpCase> t;
    add_conv_cases(t);
    add_elementwise_cases(t);
    add_filter_cases(t);
    add_matmul_cases(t);
    add_train_cases(t);
    add_contract_cases(t);
    return t;
  }();
  return table;
}

bool runs_precision(Backend& backend, ConvPrecision precision) {
  try {
    backend.check_precision(precision);
    return true;
  } catch (const ConfigError&) {
    return false;
  }
}

// Runs every row on `backend`; returns how many ran.
void run_table(const std::shared_ptr<Backend>& backend) {
  RecordingBackend be(backend);
  std::set<std::string> declared, called;
  int ran = 0, skipped = 0;
  for (const OpCase& row : op_cases()) {
    if (row.precision != ConvPrecision::fp32 && !runs_precision(*backend, row.precision)) {
      ++skipped;
      continue;
    }
    INFO(backend->name() << ": " << row.op << " [" << row.params << "], tolerance: " << row.tolerance.reason);
    be.clear_calls();
    {
      Buffers buffers(be);
      row.run(be, buffers, row);
      buffers.verify();
    }
    CHECK(be.calls().count(row.op) == 1);  // the row ran the op it names
    called.insert(be.calls().begin(), be.calls().end());
    declared.insert(row.op);
    declared.insert(row.uses.begin(), row.uses.end());
    ++ran;
  }
  for (const std::string& member : declared) {
    INFO("Backend::" << member << " is declared by rows that ran but none of them called it");
    CHECK(called.count(member) == 1);
  }
  WARN(backend->name() << ": " << ran << " backend-op cases run, " << skipped
                       << " skipped (a reduced precision this device does not run)");
  CHECK(ran > 0);
}

// The names of the virtual members of class Backend in include/orthoconv/backend.hpp (comments removed).
std::set<std::string> backend_members_in_header() {
  std::ifstream file(std::string(ORTHOCONV_SOURCE_DIR) + "/include/orthoconv/backend.hpp");
  REQUIRE(file.good());
  std::stringstream text;
  std::string line;
  while (std::getline(file, line)) text << line.substr(0, line.find("//")) << '\n';
  const std::string header = text.str();
  const size_t begin = header.find("class Backend {");
  REQUIRE(begin != std::string::npos);
  const size_t end = header.find("\n};", begin);
  REQUIRE(end != std::string::npos);
  const std::string body = header.substr(begin, end - begin);
  const std::regex member(R"(virtual\s+[^;{}()]*?(~?\w+)\s*\()");
  std::set<std::string> names;
  for (auto it = std::sregex_iterator(body.begin(), body.end(), member); it != std::sregex_iterator(); ++it)
    if ((*it)[1].str()[0] != '~') names.insert((*it)[1].str());
  return names;
}

}  // namespace

TEST_CASE("every Backend member (include/orthoconv/backend.hpp) has a case in the backend-op table",
          "[backend][ops][coverage]") {
  const auto members = backend_members_in_header();
  // The parser found the interface (these have been there from the start), not an empty or partial list.
  for (const char* known :
       {"conv_forward", "conv_backward_weights", "fill", "matmul", "power_iteration", "synchronize"})
    REQUIRE(members.count(known) == 1);
  REQUIRE(members.size() >= 30);
  std::set<std::string> covered(kEveryRowUses.begin(), kEveryRowUses.end());
  for (const OpCase& row : op_cases()) {
    covered.insert(row.op);
    covered.insert(row.uses.begin(), row.uses.end());
  }
  for (const std::string& member : members) {
    INFO("Backend::" << member << " has no row in tests/test_backend_ops.cpp (op or uses)");
    CHECK(covered.count(member) == 1);
  }
  // And no row names a member the interface does not have (a typo would cover nothing).
  for (const std::string& name : covered) {
    INFO("a row names Backend::" << name << ", which include/orthoconv/backend.hpp does not declare");
    CHECK(members.count(name) == 1);
  }
}

TEST_CASE("every Backend op matches the double reference on the CPU (oneDNN), with guards around every buffer",
          "[backend][ops]") {
  run_table(cpu_backend());
}

TEST_CASE("every Backend op matches the double reference on the GPU, with guards around every buffer",
          "[.gpu][cuda][backend][ops]") {
  if (!cuda_available()) {
    WARN("ORTHOCONV_GPU_SKIPPED: no usable CUDA device, GPU test not run");
    return;
  }
  CudaOptions options = cuda_options();
  options.check_pointers = true;  // a host pointer where a device one belongs fails loudly
  options.allow_tf32 = false;     // fp32 rows in float32 (tf32 rows ask for it through the shape)
  set_cuda_options(options);
  run_table(cuda_backend());
}
