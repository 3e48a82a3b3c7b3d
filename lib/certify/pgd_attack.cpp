// PGD, L2 (Madry et al.): margin-loss ascent projected onto the ball ||delta|| <= eps and the box [0, 1], with
// random restarts; each step runs only on the images not yet broken. See include/orthoconv/attack.hpp.
#include <algorithm>

#include "certify/attack_batch.hpp"

namespace orthoconv {

namespace {

// Every image of x moved to a point drawn uniformly in the ball of radius eps around it (direction * eps * U^(1/d)),
// clamped to [0, 1].
void random_start(Tensor& x, const float* x0, int64_t images, double eps, std::mt19937_64& rng,
                  std::normal_distribution<double>& normal) {
  const int64_t dim = kCifarPixels;
  for (int64_t b = 0; b < images; ++b) {
    std::vector<double> d(static_cast<size_t>(dim));
    double s = 0.0;
    for (double& v : d) {
      v = normal(rng);
      s += v * v;
    }  // (v = ...) * v is unsequenced
    double radius = eps * std::pow(std::uniform_real_distribution<double>(0, 1)(rng), 1.0 / dim);
    for (int64_t i = 0; i < dim; ++i) {
      float v = x0[b * dim + i] + static_cast<float>(d[static_cast<size_t>(i)] / std::sqrt(s) * radius);
      x.data()[b * dim + i] = std::clamp(v, 0.0f, 1.0f);
    }
  }
}

// One step of image b along its normalized gradient g, projected back onto the eps-ball around x0 and [0, 1].
void projected_step(float* xb, const float* x0b, const float* gb, double step, double eps) {
  const int64_t dim = kCifarPixels;
  double gn = norm_of(gb, dim);
  if (!(gn > 0.0)) return;
  std::vector<double> delta(static_cast<size_t>(dim));
  double dn = 0.0;
  for (int64_t i = 0; i < dim; ++i) {
    double d = xb[i] - x0b[i] + step * gb[i] / gn;
    delta[static_cast<size_t>(i)] = d;
    dn += d * d;
  }
  dn = std::sqrt(dn);
  double shrink = dn > eps ? eps / dn : 1.0;
  for (int64_t i = 0; i < dim; ++i)
    xb[i] = std::clamp(static_cast<float>(x0b[i] + delta[static_cast<size_t>(i)] * shrink), 0.0f, 1.0f);
}

}  // namespace

void pgd_attack(AttackBatch& batch, double eps, const AttackOptions& options, std::mt19937_64& rng,
                std::normal_distribution<double>& normal, std::vector<bool>& hit, std::vector<double>& hit_norm) {
  const int64_t n = batch.images, classes = batch.classes, dim = kCifarPixels;
  const float* x0 = batch.clean.data();
  const double step = 2.5 * eps / options.steps;
  for (int restart = 0; restart < options.restarts; ++restart) {
    Tensor x = Tensor::from_vector(batch.clean.to_vector(), batch.clean.shape());
    if (restart > 0) random_start(x, x0, n, eps, rng, normal);
    const AttackBatch::Visit margin_gradient = [&](int64_t b, const float* f, float* d) {
      const int32_t y = batch.labels[static_cast<size_t>(b)];
      if (!hit[static_cast<size_t>(b)] && adversarial(f, classes, y)) {
        hit[static_cast<size_t>(b)] = true;
        hit_norm[static_cast<size_t>(b)] = batch.perturbation_norm(x, b);
      }
      if (!d) return;
      int32_t other = y == 0 ? 1 : 0;
      for (int64_t j = 0; j < classes; ++j)
        if (j != y && f[j] > f[other]) other = static_cast<int32_t>(j);
      d[other] = 1.0f;  // d(f_other - f_y)
      d[y] = -1.0f;
    };
    for (int it = 0; it <= options.steps; ++it) {
      std::vector<int64_t> active;
      for (int64_t b = 0; b < n; ++b)
        if (!hit[static_cast<size_t>(b)]) active.push_back(b);
      if (active.empty()) break;
      if (it == options.steps) {  // last iterate: only check it
        batch.pass_on(x, active, false, margin_gradient);
        break;
      }
      batch.pass_on(x, active, true, margin_gradient);
      for (int64_t b : active)
        if (!hit[static_cast<size_t>(b)])
          projected_step(x.data() + b * dim, x0 + b * dim, batch.grad.data() + b * dim, step, eps);
    }
  }
}

}  // namespace orthoconv
