// The certifying pass: a LipConvnet in evaluation mode on the host, in Real (double, or float for tests), from the
// raw image bytes. See include/orthoconv/certifying_pass.hpp for what is computed and why.
#include "orthoconv/certifying_pass.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <array>
#include <cmath>

namespace orthoconv {

namespace {

template <class Real>
using RowMatrix = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// One SocConv, snapshotted.
template <class Real>
struct SocStep {
  int64_t in_channels = 0, out_channels = 0, kernel = 1, stride = 1, groups = 1, c = 0;  // c: channels per group
  bool keep_per_group = false;
  int terms = 0;
  std::vector<Real> filter;  // A_n [g, C, C * k * k]
  std::vector<Real> bias;    // [out_channels] or empty
};

// One step of the network on a [channels, side, side] activation.
template <class Real>
struct Step {
  enum class Kind { shuffle, soc, maxmin, flatten, lln };
  explicit Step(Kind k) : kind(k) {}
  Kind kind;
  std::vector<int32_t> destination;  // shuffle
  bool paired = false;               // maxmin
  SocStep<Real> soc;                 // soc
  std::vector<Real> rows;            // lln: q [classes, F], q_i = w_i / ||w_i|| in Real
  std::vector<Real> bias;            // lln
};

// Per-thread buffers.
template <class Real>
struct Workspace {
  std::vector<Real> a, b, x0, p, product, cols;
};

template <class Real>
SocStep<Real> snapshot(SocConv& soc, int terms) {
  const SocConfig& config = soc.config();
  SocStep<Real> s;
  s.in_channels = config.in_channels;
  s.out_channels = config.out_channels;
  s.kernel = config.kernel;
  s.stride = config.stride;
  s.groups = config.groups;
  s.c = config.group_channels();
  s.keep_per_group = config.keep == KeepChannels::per_group;
  s.terms = terms;
  for (float v : soc.scaled_filter().to_vector()) s.filter.push_back(static_cast<Real>(v));
  if (config.bias)
    for (float v : soc.bias().value.to_vector()) s.bias.push_back(static_cast<Real>(v));
  return s;
}

// y = SocConv(x); x [in_channels, side, side] -> y [out_channels, side / stride, side / stride]; side updated.
template <class Real>
void apply_soc(const SocStep<Real>& s, const std::vector<Real>& x, std::vector<Real>& y, int64_t& side,
               Workspace<Real>& w) {
  const int64_t h = side / s.stride, plane = h * h, channels = s.c * s.groups, k = s.kernel, r = k / 2;
  // x0: pixel-unshuffle (channel c, offset (p, q) -> c s^2 + p s + q), zero channels up to C g.
  w.x0.assign(static_cast<size_t>(channels * plane), Real(0));
  for (int64_t c = 0; c < s.in_channels; ++c)
    for (int64_t p = 0; p < s.stride; ++p)
      for (int64_t q = 0; q < s.stride; ++q) {
        const int64_t oc = (c * s.stride + p) * s.stride + q;
        for (int64_t i = 0; i < h; ++i)
          for (int64_t j = 0; j < h; ++j)
            w.x0[static_cast<size_t>((oc * h + i) * h + j)] =
                x[static_cast<size_t>((c * side + s.stride * i + p) * side + s.stride * j + q)];
      }
  // Horner: p = x0; p = x0 + (A_n p) / j for j = K..1.
  w.p = w.x0;
  w.product.resize(w.p.size());
  const int64_t depth = s.c * k * k;
  if (k > 1) w.cols.resize(static_cast<size_t>(depth * plane));
  for (int j = s.terms; j >= 1; --j) {
    for (int64_t g = 0; g < s.groups; ++g) {
      const Real* in = w.p.data() + g * s.c * plane;
      const Real* cols = in;
      if (k > 1) {  // im2col, rows (ci, dy, dx), zero outside the image
        Real* col = w.cols.data();
        for (int64_t ci = 0; ci < s.c; ++ci)
          for (int64_t dy = 0; dy < k; ++dy)
            for (int64_t dx = 0; dx < k; ++dx, col += plane)
              for (int64_t yy = 0; yy < h; ++yy) {
                const int64_t sy = yy + dy - r;
                Real* dst = col + yy * h;
                if (sy < 0 || sy >= h) {
                  std::fill(dst, dst + h, Real(0));
                  continue;
                }
                const Real* src = in + (ci * h + sy) * h;
                for (int64_t xx = 0; xx < h; ++xx) {
                  const int64_t sx = xx + dx - r;
                  dst[xx] = (sx < 0 || sx >= h) ? Real(0) : src[sx];
                }
              }
        cols = w.cols.data();
      }
      Eigen::Map<const RowMatrix<Real>> filter(s.filter.data() + g * s.c * depth, s.c, depth);
      Eigen::Map<const RowMatrix<Real>> columns(cols, depth, plane);
      Eigen::Map<RowMatrix<Real>> out(w.product.data() + g * s.c * plane, s.c, plane);
      out.noalias() = filter * columns;
    }
    const Real divisor = static_cast<Real>(j);
    for (size_t i = 0; i < w.p.size(); ++i) w.p[i] = w.x0[i] + w.product[i] / divisor;
  }
  // Keep channels, add the bias.
  y.resize(static_cast<size_t>(s.out_channels * plane));
  const int64_t per_group = s.out_channels / s.groups;
  for (int64_t o = 0; o < s.out_channels; ++o) {
    const int64_t source = s.keep_per_group ? (o / per_group) * s.c + o % per_group : o;
    const Real b = s.bias.empty() ? Real(0) : s.bias[static_cast<size_t>(o)];  // + 0 is exact
    for (int64_t i = 0; i < plane; ++i)
      y[static_cast<size_t>(o * plane + i)] = w.p[static_cast<size_t>(source * plane + i)] + b;
  }
  side = h;
}

}  // namespace

template <class Real>
struct HostNetwork<Real>::Impl {
  int64_t side = 0, classes = 0;
  double flops = 0.0;
  std::array<double, 3> offset{}, divisor{};  // 255 mean_c, 255 std_c (exact in double)
  std::vector<Step<Real>> steps;
};

template <class Real>
HostNetwork<Real>::HostNetwork(LipConvnet& model, const Normalization& norm, std::optional<int> terms)
    : impl_(std::make_unique<Impl>()) {
  require(!terms || *terms > 0, "certifying pass: terms must be positive, got ", terms.value_or(0));
  // The model's evaluation terms (which its constructor and set_terms give every SocConv), as verify_network.
  const int series_terms = terms.value_or(model.config().eval_terms);
  norm.lipschitz();  // validates the stds
  impl_->side = model.config().input_side;
  impl_->classes = model.config().classes;
  for (int c = 0; c < 3; ++c) {
    impl_->offset[c] = 255.0 * static_cast<double>(norm.mean[c]);
    impl_->divisor[c] = 255.0 * static_cast<double>(norm.std[c]);
  }
  // The model's own steps, snapshotted in order.
  for (const NetworkStep& network_step : model.steps()) {
    switch (network_step.kind) {
      case StepKind::shuffle: {
        Step<Real> step(Step<Real>::Kind::shuffle);
        step.destination = network_step.shuffle->destination();
        impl_->steps.push_back(std::move(step));
        break;
      }
      case StepKind::soc: {
        Step<Real> step(Step<Real>::Kind::soc);
        step.soc = snapshot<Real>(*network_step.soc, series_terms);
        impl_->steps.push_back(std::move(step));
        break;
      }
      case StepKind::maxmin: {
        Step<Real> step(Step<Real>::Kind::maxmin);
        step.paired = network_step.maxmin->paired();
        impl_->steps.push_back(std::move(step));
        break;
      }
      case StepKind::flatten:
        impl_->steps.emplace_back(Step<Real>::Kind::flatten);
        break;
      case StepKind::lln: {
        Step<Real> head(Step<Real>::Kind::lln);
        const std::vector<float> weight = network_step.lln->weight().value.to_vector();
        const int64_t features = network_step.input[1];
        head.rows.resize(weight.size());
        for (int64_t i = 0; i < impl_->classes; ++i) {
          Real sum = 0;
          for (int64_t f = 0; f < features; ++f) {
            const Real v = static_cast<Real>(weight[static_cast<size_t>(i * features + f)]);
            sum += v * v;
          }
          const Real norm_i = std::sqrt(sum);
          for (int64_t f = 0; f < features; ++f)
            head.rows[static_cast<size_t>(i * features + f)] =
                static_cast<Real>(weight[static_cast<size_t>(i * features + f)]) / norm_i;
        }
        for (float b : network_step.lln->bias().value.to_vector()) head.bias.push_back(static_cast<Real>(b));
        impl_->steps.push_back(std::move(head));
        break;
      }
    }
  }
  int64_t side = impl_->side;
  for (const Step<Real>& step : impl_->steps) {
    if (step.kind == Step<Real>::Kind::flatten) side = 1;
    if (step.kind == Step<Real>::Kind::lln) impl_->flops += 2.0 * static_cast<double>(step.rows.size());
    if (step.kind != Step<Real>::Kind::soc) continue;
    const SocStep<Real>& s = step.soc;
    side /= s.stride;
    impl_->flops += 2.0 * s.terms * static_cast<double>(s.filter.size()) * static_cast<double>(side * side);
  }
}

template <class Real>
double HostNetwork<Real>::flops_per_image() const {
  return impl_->flops;
}

template <class Real>
HostNetwork<Real>::~HostNetwork() = default;

template <class Real>
int64_t HostNetwork<Real>::classes() const {
  return impl_->classes;
}

template <class Real>
int64_t HostNetwork<Real>::image_bytes() const {
  return 3 * impl_->side * impl_->side;
}

template <class Real>
std::vector<Real> HostNetwork<Real>::normalize(const uint8_t* pixels) const {
  const int64_t plane = impl_->side * impl_->side;
  std::vector<Real> x(static_cast<size_t>(3 * plane));
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t i = 0; i < plane; ++i)
      x[static_cast<size_t>(c * plane + i)] =
          static_cast<Real>((static_cast<double>(pixels[c * plane + i]) - impl_->offset[c]) / impl_->divisor[c]);
  return x;
}

namespace {

// MaxMin on [channels, plane]: pairs (c, c + channels/2), or (2c, 2c+1) when paired; min first, then max.
template <class Real>
void apply_maxmin(bool paired, int64_t channels, int64_t plane, const std::vector<Real>& x, std::vector<Real>& y) {
  y.resize(x.size());
  const int64_t half = channels / 2;
  for (int64_t c = 0; c < half; ++c) {
    const int64_t ca = paired ? 2 * c : c, cb = paired ? 2 * c + 1 : c + half;
    const int64_t lo = paired ? 2 * c : c, hi = paired ? 2 * c + 1 : c + half;
    for (int64_t i = 0; i < plane; ++i) {
      const Real u = x[static_cast<size_t>(ca * plane + i)], v = x[static_cast<size_t>(cb * plane + i)];
      y[static_cast<size_t>(lo * plane + i)] = std::min(u, v);
      y[static_cast<size_t>(hi * plane + i)] = std::max(u, v);
    }
  }
}

}  // namespace

template <class Real>
void HostNetwork<Real>::forward(const uint8_t* pixels, int64_t n, Real* logits) const {
  require(n >= 0, "certifying pass: negative image count ", n);
  const Impl& m = *impl_;
#pragma omp parallel
  {
    Workspace<Real> w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t image = 0; image < n; ++image) {
      w.a = normalize(pixels + image * image_bytes());
      int64_t side = m.side, channels = 3;
      for (const Step<Real>& step : m.steps) {
        const int64_t plane = side * side;
        switch (step.kind) {
          case Step<Real>::Kind::shuffle:
            w.b.resize(w.a.size());
            for (int64_t c = 0; c < channels; ++c)
              std::copy_n(w.a.data() + c * plane, plane, w.b.data() + step.destination[static_cast<size_t>(c)] * plane);
            break;
          case Step<Real>::Kind::flatten:  // [C, H, W] -> [C H W, 1, 1]: the same values in the same order
            channels *= plane;
            side = 1;
            continue;
          case Step<Real>::Kind::soc:
            apply_soc(step.soc, w.a, w.b, side, w);
            channels = step.soc.out_channels;
            break;
          case Step<Real>::Kind::maxmin:
            apply_maxmin(step.paired, channels, plane, w.a, w.b);
            break;
          case Step<Real>::Kind::lln: {
            const int64_t features = channels * plane;
            w.b.resize(static_cast<size_t>(m.classes));
            Eigen::Map<const RowMatrix<Real>> q(step.rows.data(), m.classes, features);
            Eigen::Map<const Eigen::Matrix<Real, Eigen::Dynamic, 1>> x(w.a.data(), features);
            Eigen::Map<Eigen::Matrix<Real, Eigen::Dynamic, 1>> y(w.b.data(), m.classes);
            y.noalias() = q * x;
            for (int64_t i = 0; i < m.classes; ++i) w.b[static_cast<size_t>(i)] += step.bias[static_cast<size_t>(i)];
            channels = m.classes;
            side = 1;
            break;
          }
        }
        std::swap(w.a, w.b);
      }
      std::copy_n(w.a.data(), m.classes, logits + image * m.classes);
    }
  }
}

template class HostNetwork<float>;
template class HostNetwork<double>;

}  // namespace orthoconv
