// DDN (Rony et al., CVPR 2019), a minimum-norm attack: cross-entropy ascent on the sphere of a radius that shrinks
// by (1 - gamma) while the iterate is adversarial and grows by (1 + gamma) while it is not. See
// include/orthoconv/attack.hpp.
#include <algorithm>

#include "certify/attack_batch.hpp"

namespace orthoconv {

namespace {

// Image b moved by alpha along its normalized gradient, then put at distance r from x0 (clamped to [0, 1]).
void step_to_radius(float* xb, const float* x0b, const float* gb, double alpha, double r) {
  const int64_t dim = kCifarPixels;
  double gn = norm_of(gb, dim);
  std::vector<double> delta(static_cast<size_t>(dim));
  double dn = 0.0;
  for (int64_t i = 0; i < dim; ++i) {
    double d = xb[i] - x0b[i] + (gn > 0.0 ? alpha * gb[i] / gn : 0.0);
    delta[static_cast<size_t>(i)] = d;
    dn += d * d;
  }
  dn = std::sqrt(dn);
  double scale = dn > 0.0 ? r / dn : 0.0;
  for (int64_t i = 0; i < dim; ++i)
    xb[i] = std::clamp(static_cast<float>(x0b[i] + delta[static_cast<size_t>(i)] * scale), 0.0f, 1.0f);
}

}  // namespace

void ddn_attack(AttackBatch& batch, const AttackOptions& options, const std::vector<bool>& correct,
                std::vector<double>& best) {
  const int64_t n = batch.images, classes = batch.classes, dim = kCifarPixels;
  const float* x0 = batch.clean.data();
  Tensor x = Tensor::from_vector(batch.clean.to_vector(), batch.clean.shape());
  std::vector<int64_t> active;
  for (int64_t b = 0; b < n; ++b)
    if (correct[static_cast<size_t>(b)]) active.push_back(b);
  std::vector<double> radius(static_cast<size_t>(n), options.initial_radius);
  const double alpha0 = 1.0;
  std::vector<bool> is_adv(static_cast<size_t>(n));
  const AttackBatch::Visit cross_entropy_gradient = [&](int64_t b, const float* f, float* d) {
    const int32_t y = batch.labels[static_cast<size_t>(b)];
    is_adv[static_cast<size_t>(b)] = adversarial(f, classes, y);
    if (is_adv[static_cast<size_t>(b)])
      best[static_cast<size_t>(b)] = std::min(best[static_cast<size_t>(b)], batch.perturbation_norm(x, b));
    // Gradient of the cross-entropy of the true label: softmax - onehot (ascent increases the loss).
    if (!d || !finite_row(f, classes)) return;
    double mx = f[0];
    for (int64_t j = 1; j < classes; ++j) mx = std::max(mx, static_cast<double>(f[j]));
    double z = 0.0;
    for (int64_t j = 0; j < classes; ++j) z += std::exp(f[j] - mx);
    for (int64_t j = 0; j < classes; ++j) d[j] = static_cast<float>(std::exp(f[j] - mx) / z - (j == y ? 1.0 : 0.0));
  };
  for (int it = 0; it <= options.steps && !active.empty(); ++it) {
    if (it == options.steps) {
      batch.pass_on(x, active, false, cross_entropy_gradient);
      break;
    }
    batch.pass_on(x, active, true, cross_entropy_gradient);
    const double alpha = 0.01 + (alpha0 - 0.01) * (1.0 + std::cos(M_PI * it / options.steps)) / 2.0;
    for (int64_t b : active) {
      double& r = radius[static_cast<size_t>(b)];
      r *= is_adv[static_cast<size_t>(b)] ? (1.0 - options.gamma) : (1.0 + options.gamma);
      r = std::min(r, best[static_cast<size_t>(b)]);  // never search beyond the best found
      step_to_radius(x.data() + b * dim, x0 + b * dim, batch.grad.data() + b * dim, alpha, r);
    }
  }
}

}  // namespace orthoconv
