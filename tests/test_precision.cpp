// Mixed precision (--precision bf16): what the bf16 series convolutions may change in a training step, and what
// they must not. Models run with Backend::PrecisionChoice::always, so that every shape with a oneDNN bf16 kernel
// runs it (the measured choice would depend on the machine's timings).
//
// 1x1 layers run the series here (SocPath::series, set_series_path), where the cost model would mostly take the
// matrix path, which is float32 whatever the precision (tested last).
//
// 1. The identity path stays float32, exactly. With every filter M = 0 we get A_n = 0, and each SocConv is, in
//    float32 as in exact arithmetic, its identity part (unshuffle, zero channels, keep c_out, bias): the series
//    convolutions contribute exact zeros whatever the precision of their inputs. A bf16 LipConvnet-5 step must
//    then give the float32 step's logits, loss and input gradient BIT FOR BIT. Rounding Horner's addend x0, the
//    output, h_1 = dL/dy or the weighted sum dL/dx0 to bf16 (which the rounding of the convolution inputs does
//    not allow to see in a comparison with float32 at A_n != 0: see 2.) changes them by up to u |x|, u = 2^-8.
//    The weight gradient of a zero filter is the backward-weights of the rounded x0 and dy alone, accumulated in
//    float32: the double reference on the rounded inputs, within float32's 1e-5; rounding the gradient to bf16
//    would be off by up to 3.9e-3.
//    With a real filter, a SocConv's output and input gradient equal a double emulation of the specified
//    arithmetic (each convolution's input and filter rounded once, everything else exact) within 2e-4, while
//    each forbidden rounding (x0, h_1, a term of the weighted sum dL/dx0) is off by ~1e-3.
//
// 2. A LipConvnet-5 step at its random initialisation, bf16 against float32, within tolerances derived from bf16
//    rounding and the series depth. Rounding model (the probabilistic analysis of Higham and Mary, 2019): every
//    rounding to bf16 is v (1 + d), |d| <= u = 2^-8, E d = 0, E d^2 <= u^2 / 3 (the 16 discarded bits uniformly
//    distributed), independent across elements and roundings. Float32 rounding (6e-8) is neglected, up to a 1e-5
//    allowance. For a SocConv with scaled filter A = A_n, kappa = the largest column norm of its convolution
//    operator (max over input channels i of the 2-norm of A[:, i, :, :] within the group), rho >= ||A||_2
//    (conv_spectral_norm_bound) and K terms:
//    - one product (A / j) v with both factors rounded: E ||error||^2 <= 2 (u^2 / 3) (kappa / j)^2 ||v||^2, since
//      E ||A (d o v)||^2 = sum_i E d_i^2 v_i^2 ||A e_i||^2 and likewise for (d o A) v;
//    - forward (Horner, p_{K+1} = x0, p_j = x0 + (A / j) p_{j+1}): ||p_j|| <= P_j ||x0|| with P_{K+1} = 1,
//      P_j = 1 + (rho / j) P_{j+1}; RMS error R_{K+1} = 0, R_j = (rho / j) R_{j+1} + sqrt(2/3) u (kappa / j)
//      P_{j+1} ||x0|| (errors of different terms added in norm: the rounded filter is shared by the terms);
//    - backward (h_1 = dy, h_{j+1} = -(A / (j+1)) h_j, and A^T h_K): ||h_j|| <= Q_j ||dy||, Q_1 = 1; E_1 = 0,
//      E_{j+1} = (rho / m) E_j + sqrt(2/3) u (kappa / m) Q_j ||dy|| with m = j + 1 (m = 1 for the last product);
//      dL/dx0 = sum_j j h_j + A^T h_K: RMS error <= sum_j j E_j + E_{K+1};
//    - the weight gradient dA_n = sum_j h_j (x) p_{j+1} (one backward-weights): each of its products carries the
//      rounding of both factors (relative RMS sqrt(2/3) u) and their upstream errors (relative
//      R_{j+1} / (P_{j+1} ||x0||) and E_j / (Q_j ||dy||)). Assuming the gradient does not cancel below the
//      incoherent sum of its products (true for the gradients of a step on random-like data), its relative
//      error is at most that of the products; the sigma path and the skew-symmetrisation are linear and carry
//      it to dM.
//    A GS-SOC block chains two SocConvs (shuffles are exact): errors add in norm, each scaled by the other
//    stage's Lipschitz bound 1 + sum_{i > K} rho^i / i! (bounds.hpp). Layers after a block are 1-Lipschitz
//    (up to those bounds), so the logits' error is at most the sum of the blocks' errors, and the mean
//    cross-entropy, sqrt(2)-Lipschitz in each image's logits, changes by at most sqrt(2 / N) ||d logits||.
//    Tolerances are twice the RMS bounds: each is a norm over >= 10^4 independent roundings, whose square
//    concentrates at its mean. The SGD update after the step differs by lr times the gradient difference.
//    What these tolerances do NOT catch: rounding x0 or h_1 (0.42 u |x| RMS) is the same size as the allowed
//    errors at rho ~ 1, and the tests in 1. are there for it.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "orthoconv/bounds.hpp"
#include "orthoconv/model.hpp"
#include "orthoconv/trainer.hpp"
#include "reference.hpp"

using namespace orthoconv;
namespace ref = orthoconv::reference;
using ref::Vec;

namespace {

const double kUnit = std::ldexp(1.0, -8);  // bf16 unit roundoff
constexpr double kFloat32Slack = 1e-5;     // float32 rounding of the two computations, relative
constexpr double kFluctuation = 2.0;       // tolerance / RMS bound

#define REQUIRE_BF16()                                                        \
  if (!ref::cpu_has_bf16()) {                                                 \
    WARN("no AVX512-BF16 on this CPU (oneDNN's ISA query): bf16 not tested"); \
    return;                                                                   \
  }

ModelConfig lipconvnet5(const std::string& conv) {
  ModelConfig m;
  m.conv = parse_conv_kind(conv);
  if (conv == "soc") {
    m.groups = GroupCounts{1, std::nullopt};
  }
  m.depth = 5;
  m.init_channels = 8;  // stages 16..256 channels: the spectral-norm bounds below stay cheap
  m.seed = 11;
  return m;
}

Tensor random_images(int64_t n, uint64_t seed) {
  return ref::to_tensor(ref::random_normal(static_cast<size_t>(n * 3 * 32 * 32), seed), Shape{n, 3, 32, 32});
}

// Every 1x1 SocConv on the series (the only path that runs bf16).
void set_series_path(LipConvnet& model) {
  for (NamedSoc& s : model.soc_layers())
    if (s.soc->config().kernel == 1) s.soc->set_path(SocPath::series);
}

std::vector<int32_t> labels_for(int64_t n) {
  std::vector<int32_t> labels(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) labels[static_cast<size_t>(i)] = static_cast<int32_t>((i * 37) % 100);
  return labels;
}

double norm_of(const Tensor& t) { return ref::norm(ref::to_double(t)); }
double distance(const Tensor& a, const Tensor& b) {
  Vec x = ref::to_double(a), y = ref::to_double(b);
  for (size_t i = 0; i < x.size(); ++i) x[i] -= y[i];
  return ref::norm(x);
}

// ---------------------------------------------------------------- 1. the identity path

void zero_filters(LipConvnet& model) {
  for (NamedSoc& s : model.soc_layers())
    model.backend().fill(s.soc->weight().value.data(), s.soc->weight().value.numel(), 0.0f);
}

struct StepResult {
  Tensor logits, diff_input;
  double loss = 0.0;
};

StepResult forward_backward(LipConvnet& model, const Tensor& images, const std::vector<int32_t>& labels) {
  StepResult r;
  model.forward(images, r.logits);
  const int64_t n = images.dim(0), classes = model.config().classes;
  Tensor diff_logits(Shape{n, classes});
  int64_t correct = 0;
  model.backend().softmax_cross_entropy(r.logits.data(), labels.data(), n, classes, diff_logits.data(), &r.loss,
                                        &correct);
  model.zero_grad();
  model.backward(diff_logits, &r.diff_input);
  return r;
}

}  // namespace

TEST_CASE(
    "bf16 LipConvnet-5 with zero filters: logits, loss and input gradient equal the float32 step bit for "
    "bit (x0 and h_1 stay float32)",
    "[precision][bf16]") {
  REQUIRE_BF16();
  ref::AlwaysBf16 always;
  const std::string conv = GENERATE(std::string("soc"), std::string("gs-soc"));
  INFO("LipConvnet-5 " << conv);
  LipConvnet fp32(lipconvnet5(conv)), bf16(lipconvnet5(conv));
  bf16.set_precision(ConvPrecision::bf16);
  set_series_path(fp32);
  set_series_path(bf16);
  zero_filters(fp32);
  zero_filters(bf16);
  const Tensor images = random_images(4, 5);
  const auto labels = labels_for(4);
  const StepResult a = forward_backward(fp32, images, labels), b = forward_backward(bf16, images, labels);
  for (NamedSoc& s : bf16.soc_layers()) {
    INFO(s.name);
    REQUIRE(s.soc->sigma()[0] == 0.0f);  // A_n = 0
  }
  CHECK(a.logits.to_vector() == b.logits.to_vector());
  CHECK(a.loss == b.loss);
  CHECK(a.diff_input.to_vector() == b.diff_input.to_vector());
  CHECK(norm_of(a.diff_input) > 0.0);
}

TEST_CASE(
    "bf16 SocConv with a zero filter: the weight gradient is the float32 backward-weights of the rounded x0 "
    "and dy (double reference)",
    "[precision][bf16]") {
  REQUIRE_BF16();
  ref::AlwaysBf16 always;
  struct Case {
    int64_t channels, kernel, groups, side;
  };
  for (const Case& c : {Case{32, 3, 1, 6}, Case{64, 3, 4, 4}, Case{32, 1, 1, 5}}) {
    SocConfig config;
    config.in_channels = config.out_channels = c.channels;
    config.kernel = c.kernel;
    config.groups = c.groups;
    config.seed = 3;
    config.precision = ConvPrecision::bf16;
    config.path = SocPath::series;
    SocConv layer(config);
    cpu_backend()->fill(layer.weight().value.data(), layer.weight().value.numel(), 0.0f);
    const Shape in{3, c.channels, c.side, c.side};
    INFO(layer.describe() << ", input " << in.str());
    const Vec x = ref::to_double(ref::to_float(ref::random_normal(static_cast<size_t>(in.numel()), 17)));
    const Vec dy = ref::to_double(ref::to_float(ref::random_normal(static_cast<size_t>(in.numel()), 18)));
    Tensor y, dx;
    layer.zero_grad();
    layer.forward(ref::to_tensor(x, in), y);
    layer.backward(ref::to_tensor(dy, in), dx);
    ConvShape shape;
    shape.batch = 3 * config.train_terms;
    shape.in_channels = shape.out_channels = c.channels;
    shape.height = shape.width = c.side;
    shape.kernel = c.kernel;
    shape.groups = c.groups;
    shape.precision = ConvPrecision::bf16;
    REQUIRE(cpu_backend()->conv_precision(shape, ConvPass::backward_weights) == ConvPrecision::bf16);
    // dM = skew(s dA_n) with s = correction / (0 + 1e-12) (the sigma path vanishes with A = 0), dA_n = h_1 (x) x0.
    const ref::ConvDims d{3, c.channels, c.channels, c.side, c.side, c.kernel, c.groups};
    const float scale = config.effective_correction() / (0.0f + 1e-12f);
    Vec da = ref::conv_backward_weights(d, ref::round_to_bf16(x), ref::round_to_bf16(dy));
    for (double& v : da) v *= static_cast<double>(scale);
    const Vec expected = ref::skew(da, c.groups, c.channels / c.groups, c.kernel);
    const Vec actual = ref::to_double(layer.weight().grad);
    CHECK(ref::max_relative_error(actual, expected) < 1e-5);
    // The identity path, exactly: y = x + bias, dx = dy.
    Vec bias = ref::to_double(layer.bias().value), want = x;
    const int64_t plane = c.side * c.side;
    for (size_t i = 0; i < want.size(); ++i) want[i] = static_cast<float>(x[i] + bias[(i / plane) % c.channels]);
    CHECK(ref::to_double(y) == want);
    CHECK(ref::to_double(dx) == dy);
  }
}

namespace {

// A tensor of `values` rounded to bfloat16 (the reference's rounding).
Vec rounded_filter(const Vec& filter, double scale) {
  Vec out(filter.size());
  for (size_t i = 0; i < filter.size(); ++i)
    out[i] = ref::round_to_bf16(static_cast<float>(static_cast<float>(filter[i]) * static_cast<float>(scale)));
  return out;
}

}  // namespace

TEST_CASE(
    "bf16 SocConv computes exactly the specified arithmetic: float32 terms, each convolution's input and "
    "filter rounded once (double emulation)",
    "[precision][bf16]") {
  // The emulation: Horner's p_{K+1} = x0, p_j = x0 + conv(bf16(p_{j+1}), bf16(A_n / j)) (the filter copies A_n / j
  // are scaled in float32 first where the layer keeps them, else the 1/j scales the float32 result), backward
  // h_1 = dy, h_{j+1} = -conv(bf16(h_j), bf16(A_n)) / (j + 1), dx = sum_j j h_j - conv(bf16(h_K), bf16(A_n)),
  // with every sum exact (double). The layer's float32 terms differ from these by float32 rounding (~1e-7
  // relative); where such a difference straddles a bf16 rounding boundary (probability ~1e-7 / 2u ~ 1e-5 per
  // element, so rarely more than one in these buffers of ~10^4 elements), the next convolution sees one bf16
  // spacing (2u |v|) more or less in that element, which moves the result by about 2u kappa / sqrt(elements)
  // < 1e-4 of its norm. Tolerance 2e-4. Rounding anything else - x0, the output, h_1, a term of the weighted
  // sum - is off by ~0.4 u = 1.6e-3 (RMS, times its weight in the sum).
  REQUIRE_BF16();
  ref::AlwaysBf16 always;
  struct Case {
    int64_t channels, kernel, groups, side, batch;
  };
  int with_copies = 0, with_scales = 0;
  for (const Case& c : {Case{32, 3, 1, 8, 2}, Case{32, 3, 1, 16, 4}, Case{64, 3, 4, 6, 2}, Case{64, 1, 1, 16, 2},
                        Case{128, 3, 1, 4, 2}}) {
    SocConfig config;
    config.in_channels = config.out_channels = c.channels;
    config.kernel = c.kernel;
    config.groups = c.groups;
    config.bias = false;
    config.seed = 5;
    config.precision = ConvPrecision::bf16;
    config.path = SocPath::series;
    SocConv layer(config);
    const int64_t n = c.batch, K = config.train_terms;
    const Shape in{n, c.channels, c.side, c.side};
    INFO(layer.describe() << ", input " << in.str());
    const Vec x = ref::to_double(ref::to_float(ref::random_normal(static_cast<size_t>(in.numel()), 31)));
    const Vec dy = ref::to_double(ref::to_float(ref::random_normal(static_cast<size_t>(in.numel()), 32)));
    Tensor y, dx;
    layer.forward(ref::to_tensor(x, in), y);
    layer.backward(ref::to_tensor(dy, in), dx);
    const Vec a = ref::to_double(layer.scaled_filter());

    ConvShape shape;
    shape.batch = n;
    shape.in_channels = shape.out_channels = c.channels;
    shape.height = shape.width = c.side;
    shape.kernel = c.kernel;
    shape.groups = c.groups;
    shape.precision = ConvPrecision::bf16;
    Backend& be = *cpu_backend();
    REQUIRE(be.conv_precision(shape, ConvPass::forward) == ConvPrecision::bf16);
    // The layer keeps K scaled filter copies where they are small next to the activations (soc_conv.cpp).
    const bool copies = K * be.conv_weights_size(shape, ConvPass::forward) <= be.conv_buffer_size(shape);
    ++(copies ? with_copies : with_scales);
    const ref::ConvDims d{n, c.channels, c.channels, c.side, c.side, c.kernel, c.groups};
    const Vec a_rounded = rounded_filter(a, 1.0);

    Vec p = x;
    for (int64_t j = K; j >= 1; --j) {
      const double scale = 1.0f / static_cast<float>(j);
      const Vec& filter = copies && j > 1 ? rounded_filter(a, scale) : a_rounded;
      const Vec term = ref::conv_forward(d, ref::round_to_bf16(p), filter);
      for (size_t i = 0; i < p.size(); ++i) p[i] = x[i] + (copies ? 1.0 : scale) * term[i];
    }
    Vec h = dy, want_dx = dy;
    for (int64_t j = 1; j <= K; ++j) {
      const Vec next = ref::conv_forward(d, ref::round_to_bf16(h), a_rounded);
      const double scale = j < K ? -1.0 / static_cast<double>(static_cast<float>(j + 1)) : -1.0;
      for (size_t i = 0; i < h.size(); ++i) {
        h[i] = static_cast<double>(static_cast<float>(scale)) * next[i];
        want_dx[i] += (j < K ? static_cast<double>(j + 1) : 1.0) * h[i];
      }
    }
    const double forward_error = ref::norm_relative_error(ref::to_double(y), p);
    const double grad_error = ref::norm_relative_error(ref::to_double(dx), want_dx);
    INFO("filter copies " << copies << "; output error " << forward_error << ", input-gradient error " << grad_error);
    CHECK(forward_error < 2e-4);
    CHECK(grad_error < 2e-4);
  }
  CHECK(with_copies > 0);  // both ways of applying A_n / j were emulated
  CHECK(with_scales > 0);
}

namespace {

// ---------------------------------------------------------------- 2. the derived tolerances

// What the bounds need of one SocConv's scaled filter, taken after its forward (then it is the filter the series
// used): kappa, rho, the Lipschitz bound of the truncated series, K.
struct SeriesFilter {
  double kappa = 0.0, rho = 0.0, lipschitz = 1.0;
  int terms = 0;
};

SeriesFilter series_filter(SocConv& layer, int64_t series_side) {
  const SocConfig& c = layer.config();
  const int64_t g = c.groups, ch = c.group_channels(), k = c.kernel;
  const std::vector<float> a = layer.scaled_filter().to_vector();
  SeriesFilter f;
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t i = 0; i < ch; ++i) {
      double column = 0.0;
      for (int64_t o = 0; o < ch; ++o)
        for (int64_t t = 0; t < k * k; ++t) {
          const double v = a[static_cast<size_t>(((gi * ch + o) * ch + i) * k * k + t)];
          column += v * v;
        }
      f.kappa = std::max(f.kappa, std::sqrt(column));
    }
  f.rho = conv_spectral_norm_bound(a, g, ch, k, series_side);
  f.terms = c.train_terms;
  f.lipschitz = 1.0 + series_tail_bound(f.rho, f.terms);
  return f;
}

// The RMS bounds of one SocConv's errors (file comment, 2.) for an input of norm input_norm and an output
// gradient of norm grad_norm.
struct SeriesBound {
  double forward = 0.0;          // output error
  double input_grad = 0.0;       // input-gradient error
  double weight_relative = 0.0;  // relative weight-gradient error
};

SeriesBound series_bound(const SeriesFilter& f, double input_norm, double grad_norm) {
  const int terms = f.terms;
  const double rho = f.rho, kappa = f.kappa, fresh = std::sqrt(2.0 / 3.0) * kUnit;
  SeriesBound b;
  std::vector<double> P(static_cast<size_t>(terms + 2), 1.0), R(static_cast<size_t>(terms + 2), 0.0);
  for (int j = terms; j >= 1; --j) {
    P[j] = 1.0 + rho / j * P[j + 1];
    R[j] = rho / j * R[j + 1] + fresh * kappa / j * P[j + 1] * input_norm;
  }
  b.forward = R[1];
  std::vector<double> Q(static_cast<size_t>(terms + 2), 1.0), E(static_cast<size_t>(terms + 2), 0.0);
  for (int j = 1; j <= terms; ++j) {
    const double m = j < terms ? j + 1.0 : 1.0;
    Q[j + 1] = rho / m * Q[j];
    E[j + 1] = rho / m * E[j] + fresh * kappa / m * Q[j] * grad_norm;
  }
  double upstream = 0.0;
  for (int j = 1; j <= terms; ++j) {
    b.input_grad += j * E[j];
    upstream = std::max(upstream, R[j + 1] / (P[j + 1] * input_norm) + E[j] / (Q[j] * grad_norm));
  }
  b.input_grad += E[terms + 1];
  b.weight_relative = fresh + upstream;
  return b;
}

// A block (one conv layer of the network, or the head) driven on the float32 step's own input and output
// gradient in both models.
struct BlockRun {
  std::string name;
  Layer* fp32;
  Layer* bf16;
  std::vector<SocConv*> fp32_stages, bf16_stages;  // SocConvs in order
  Tensor input, diff_output;
};

}  // namespace

TEST_CASE(
    "a bf16 LipConvnet-5 training step matches the float32 step within tolerances derived from bf16 "
    "rounding and the series depth",
    "[precision][bf16]") {
  REQUIRE_BF16();
  ref::AlwaysBf16 always;
  const std::string conv = GENERATE(std::string("soc"), std::string("gs-soc"));
  INFO("LipConvnet-5 " << conv);
  // fp32 and bf16 run the same calls in lockstep (same power-iteration state); `chain` (float32 too) supplies
  // every block's input and output gradient.
  LipConvnet fp32(lipconvnet5(conv)), bf16(lipconvnet5(conv)), chain(lipconvnet5(conv));
  bf16.set_precision(ConvPrecision::bf16);
  for (LipConvnet* m : {&fp32, &bf16, &chain}) set_series_path(*m);
  const int64_t n = 8, classes = fp32.config().classes;
  const Tensor images = random_images(n, 21);
  const auto labels = labels_for(n);

  // The whole step in both models: logits and loss.
  const StepResult a = forward_backward(fp32, images, labels), b = forward_backward(bf16, images, labels);

  // The blocks' inputs and output gradients in a float32 step.
  // The blocks from the model's steps: each block's convolution layer and its SocConvs in order.
  struct BlockLayers {
    std::string name;
    Layer* conv;
    std::vector<SocConv*> stages;
  };
  auto blocks_of = [](LipConvnet& m) {
    std::vector<BlockLayers> out;
    for (const NetworkStep& s : m.steps()) {
      if (s.block == "head" || s.kind == StepKind::maxmin || s.kind == StepKind::flatten) continue;
      if (out.empty() || out.back().name != s.block) out.push_back({s.block, s.block_layer, {}});
      if (s.soc) out.back().stages.push_back(s.soc);
    }
    return out;
  };
  std::vector<BlockRun> blocks;
  auto cb = blocks_of(chain), fb = blocks_of(fp32), bb = blocks_of(bf16);
  std::vector<MaxMin> activations(cb.size());
  std::vector<Tensor> outputs(cb.size());
  Tensor x = images;
  for (size_t i = 0; i < cb.size(); ++i) {
    blocks.push_back({fb[i].name, fb[i].conv, bb[i].conv, fb[i].stages, bb[i].stages, x, {}});
    Tensor y;
    cb[i].conv->forward(x, y);
    activations[i].forward(y, outputs[i]);
    x = outputs[i];
  }
  SocConv* head_chain = chain.soc_layers().back().soc;
  blocks.push_back({"head",
                    fp32.soc_layers().back().soc,
                    bf16.soc_layers().back().soc,
                    {fp32.soc_layers().back().soc},
                    {bf16.soc_layers().back().soc},
                    x.reshaped(Shape{n, fp32.features(), 1, 1}),
                    {}});
  {
    Tensor logits, diff_input;
    head_chain->forward(blocks.back().input, logits);
    Tensor diff_logits(Shape{n, classes, 1, 1});
    double loss = 0.0;
    int64_t correct = 0;
    chain.backend().softmax_cross_entropy(logits.data(), labels.data(), n, classes, diff_logits.data(), &loss,
                                          &correct);
    blocks.back().diff_output = diff_logits;
    head_chain->backward(diff_logits, diff_input);
    Tensor grad = diff_input.reshaped(x.shape());
    for (size_t i = cb.size(); i-- > 0;) {
      activations[i].backward(grad, blocks[i].diff_output);
      cb[i].conv->backward(blocks[i].diff_output, grad);
    }
  }

  fp32.zero_grad();
  bf16.zero_grad();
  std::vector<double> forward_tolerances, lipschitz;  // per block
  double largest_weight_tolerance = 0.0;
  for (BlockRun& block : blocks) {
    INFO("block " << block.name);
    Tensor y32, y16, dx32, dx16;
    block.fp32->forward(block.input, y32);
    block.bf16->forward(block.input, y16);
    block.fp32->backward(block.diff_output, dx32);
    block.bf16->backward(block.diff_output, dx16);
    std::vector<SeriesFilter> filters;
    for (SocConv* layer : block.fp32_stages)
      filters.push_back(series_filter(*layer, block.input.dim(2) / layer->config().stride));
    // Stage norms: the second stage's input through the first (and its bias), the first's output gradient
    // through the second.
    const double in_norm = norm_of(block.input), grad_norm = norm_of(block.diff_output);
    double forward = 0.0, input_grad = 0.0, block_lipschitz = 1.0;
    std::vector<SeriesBound> stage;
    if (filters.size() == 1) {
      stage.push_back(series_bound(filters[0], in_norm, grad_norm));
      forward = stage[0].forward;
      input_grad = stage[0].input_grad;
      block_lipschitz = filters[0].lipschitz;
    } else {
      SocConv& first = *block.fp32_stages[0];
      const int64_t side = block.input.dim(2) / first.config().stride;
      const double middle =
          filters[0].lipschitz * in_norm + norm_of(first.bias().value) * double(side) * std::sqrt(double(n));
      stage.push_back(series_bound(filters[0], in_norm, filters[1].lipschitz * grad_norm));
      stage.push_back(series_bound(filters[1], middle, grad_norm));
      forward = filters[1].lipschitz * stage[0].forward + stage[1].forward;
      input_grad = filters[0].lipschitz * stage[1].input_grad + stage[0].input_grad;
      // Each stage's weight gradient also sees the other stage's errors in its inputs.
      stage[1].weight_relative += stage[0].forward / middle;
      stage[0].weight_relative += stage[1].input_grad / grad_norm;
      block_lipschitz = filters[0].lipschitz * filters[1].lipschitz;
    }
    const double forward_tolerance = kFluctuation * forward + kFloat32Slack * norm_of(y32);
    const double grad_tolerance = kFluctuation * input_grad + kFloat32Slack * norm_of(dx32);
    const double forward_error = distance(y16, y32), grad_error = distance(dx16, dx32);
    INFO("output error " << forward_error / kUnit / in_norm << " u |x| (tolerance "
                         << forward_tolerance / kUnit / in_norm << "), input-gradient error "
                         << grad_error / kUnit / grad_norm << " u |dy| (tolerance "
                         << grad_tolerance / kUnit / grad_norm << ")");
    if (std::getenv("ORTHOCONV_TEST_VERBOSE"))
      WARN(conv << " " << block.name << ": output error " << forward_error / kUnit / in_norm << " u |x| (tolerance "
                << forward_tolerance / kUnit / in_norm << "), input-gradient error " << grad_error / kUnit / grad_norm
                << " u |dy| (tolerance " << grad_tolerance / kUnit / grad_norm << ")");
    CHECK(forward_error > 0.0);  // bf16 did run
    CHECK(forward_error < forward_tolerance);
    CHECK(grad_error < grad_tolerance);
    forward_tolerances.push_back(forward_tolerance);
    lipschitz.push_back(block_lipschitz);
    for (size_t s = 0; s < stage.size(); ++s) {
      const Tensor &g32 = block.fp32_stages[s]->weight().grad, &g16 = block.bf16_stages[s]->weight().grad;
      const double relative = distance(g16, g32) / norm_of(g32);
      const double tolerance = kFluctuation * stage[s].weight_relative + kFloat32Slack;
      largest_weight_tolerance = std::max(largest_weight_tolerance, tolerance);
      INFO("stage " << s << ": weight-gradient error " << relative / kUnit << " u (tolerance " << tolerance / kUnit
                    << " u)");
      if (std::getenv("ORTHOCONV_TEST_VERBOSE"))
        WARN(conv << " " << block.name << " stage " << s << ": weight-gradient error " << relative / kUnit
                  << " u (tolerance " << tolerance / kUnit << " u)");
      CHECK(relative < tolerance);
    }
  }

  // The whole step: each block's error carried through the (1 + tail)-Lipschitz blocks after it.
  double logit_bound = 0.0, after = 1.0;
  for (size_t i = forward_tolerances.size(); i-- > 0;) {
    logit_bound += after * forward_tolerances[i];
    after *= lipschitz[i];
  }
  const double logit_error = distance(a.logits, b.logits);
  INFO("logit error " << logit_error << ", bound " << logit_bound << "; mean loss " << a.loss / n << " vs "
                      << b.loss / n);
  CHECK(logit_error > 0.0);
  CHECK(logit_error < logit_bound);
  CHECK(std::abs(a.loss - b.loss) / n < std::sqrt(2.0 / n) * logit_bound);

  // The SGD update (PyTorch semantics, first step: the momentum buffer is the gradient plus weight decay) moves
  // each parameter by lr times its gradient; float32 master weights and momentum make the two updates differ by
  // lr times the gradients' difference, plus one float32 rounding of each result (2^-23 of |W| + |update|).
  std::vector<Vec> before;
  for (NamedParameter& p : fp32.parameters()) before.push_back(ref::to_double(p.parameter->value));
  std::vector<Vec> grad32, grad16;
  for (NamedParameter& p : fp32.parameters()) grad32.push_back(ref::to_double(p.parameter->grad));
  for (NamedParameter& p : bf16.parameters()) grad16.push_back(ref::to_double(p.parameter->grad));
  const float lr = 0.1f;
  Sgd sgd32(fp32), sgd16(bf16);
  sgd32.step(lr, 0.9f, 5e-4f);
  sgd16.step(lr, 0.9f, 5e-4f);
  auto p32 = fp32.parameters(), p16 = bf16.parameters();
  for (size_t i = 0; i < p32.size(); ++i) {
    INFO(p32[i].name);
    const Vec w32 = ref::to_double(p32[i].parameter->value), w16 = ref::to_double(p16[i].parameter->value);
    double step_difference = 0.0, gradient_difference = 0.0, update = 0.0;
    for (size_t e = 0; e < w32.size(); ++e) {
      step_difference += (w16[e] - w32[e]) * (w16[e] - w32[e]);
      gradient_difference += (grad16[i][e] - grad32[i][e]) * (grad16[i][e] - grad32[i][e]);
      update += (w32[e] - before[i][e]) * (w32[e] - before[i][e]);
    }
    const double slack = std::ldexp(1.0, -23) * (ref::norm(before[i]) + std::sqrt(update));
    CHECK(std::sqrt(step_difference) <= lr * std::sqrt(gradient_difference) * (1.0 + 1e-6) + slack);
    CHECK(std::sqrt(gradient_difference) <= largest_weight_tolerance * ref::norm(grad32[i]) + 1e-30);
  }
}

TEST_CASE(
    "the matrix path of a 1x1 SocConv stays float32 in bf16 training: output, input and weight gradients "
    "equal the float32 layer's bit for bit",
    "[precision][bf16]") {
  REQUIRE_BF16();
  ref::AlwaysBf16 always;
  for (SocPath path : {SocPath::matrix_conv, SocPath::matrix_gemm, SocPath::automatic}) {
    SocConfig config;
    config.in_channels = config.out_channels = 64;
    config.kernel = 1;
    config.seed = 9;
    config.path = path;
    SocConv fp32(config);
    config.precision = ConvPrecision::bf16;
    SocConv bf16(config);
    const Shape in{4, 64, 8, 8};  // 256 pixels > 64 channels: automatic takes the matrix path too
    const Tensor x = ref::to_tensor(ref::random_normal(static_cast<size_t>(in.numel()), 41), in);
    const Tensor dy = ref::to_tensor(ref::random_normal(static_cast<size_t>(in.numel()), 42), in);
    Tensor y32, y16, dx32, dx16;
    fp32.zero_grad();
    bf16.zero_grad();
    fp32.forward(x, y32);
    bf16.forward(x, y16);
    fp32.backward(dy, dx32);
    bf16.backward(dy, dx16);
    INFO(bf16.describe());
    REQUIRE(is_matrix_path(bf16.last_path()));
    if (path != SocPath::automatic) REQUIRE(bf16.last_path() == path);
    CHECK(y16.to_vector() == y32.to_vector());
    CHECK(dx16.to_vector() == dx32.to_vector());
    CHECK(bf16.weight().grad.to_vector() == fp32.weight().grad.to_vector());
    CHECK(norm_of(bf16.weight().grad) > 0.0);
  }
}
