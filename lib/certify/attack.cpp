#include "orthoconv/attack.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>

namespace orthoconv {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

int32_t arg_max(const float* f, int64_t classes) {
  int32_t best = 0;
  for (int64_t j = 1; j < classes; ++j)
    if (f[j] > f[best]) best = static_cast<int32_t>(j);
  return best;
}

bool finite_row(const float* f, int64_t classes) {
  for (int64_t j = 0; j < classes; ++j)
    if (!std::isfinite(f[j])) return false;
  return true;
}

// Misclassified (a non-finite row counts as misclassified: the certificate never covers it anyway).
bool adversarial(const float* f, int64_t classes, int32_t label) {
  return !finite_row(f, classes) || arg_max(f, classes) != label;
}

double norm_of(const float* v, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(v[i]) * v[i];
  return std::sqrt(s);
}

}  // namespace

Tensor pixel_batch(const CifarSplit& split, const std::vector<int64_t>& indices) {
  const int64_t n = static_cast<int64_t>(indices.size());
  Tensor out(Shape{n, 3, kCifarSide, kCifarSide});
  for (int64_t b = 0; b < n; ++b) {
    const int64_t index = indices[static_cast<size_t>(b)];
    require<ShapeError>(index >= 0 && index < split.size(), "pixel_batch: index ", index, " out of range");
    const uint8_t* src = split.pixels.data() + index * kCifarPixels;
    float* dst = out.data() + b * kCifarPixels;
    for (int64_t i = 0; i < kCifarPixels; ++i) dst[i] = static_cast<float>(src[i]) / 255.0f;
  }
  return out;
}

void pixel_space_pass(LipConvnet& model, const Normalization& norm, const Tensor& pixels, std::vector<float>& logits,
                      const DiffFromLogits& make_diff, Tensor* diff_pixels) {
  Backend& be = model.backend();
  const int64_t n = pixels.dim(0), plane = pixels.dim(2) * pixels.dim(3);
  std::vector<float> host = pixels.to_vector();
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t i = 0; i < plane; ++i) {
        float& v = host[static_cast<size_t>((b * 3 + c) * plane + i)];
        v = (v - norm.mean[static_cast<size_t>(c)]) / norm.std[static_cast<size_t>(c)];
      }
  Tensor input(pixels.shape(), be.device());
  be.from_host(host.data(), input.data(), input.numel());
  Tensor out;
  model.forward(input, out);
  logits = out.to_vector();
  if (!make_diff) return;
  std::vector<float> diff_host(logits.size(), 0.0f);
  make_diff(logits, diff_host);
  Tensor diff(out.shape(), be.device());
  be.from_host(diff_host.data(), diff.data(), diff.numel());
  Tensor diff_input;
  model.backward(diff, &diff_input);
  std::vector<float> grad = diff_input.to_vector();
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t i = 0; i < plane; ++i)
        grad[static_cast<size_t>((b * 3 + c) * plane + i)] /= norm.std[static_cast<size_t>(c)];
  *diff_pixels = Tensor::from_vector(grad, pixels.shape());
}

AttackResult attack_model(LipConvnet& model, const Normalization& norm, const CifarSplit& split,
                          const std::vector<int64_t>& indices, double eps, const AttackOptions& options) {
  require(eps >= 0.0 && std::isfinite(eps), "attack radius must be finite and >= 0, got ", eps);
  require(options.steps > 0, "attack steps must be positive, got ", options.steps);
  require(options.restarts > 0, "attack restarts must be positive, got ", options.restarts);
  require(options.batch_size > 0, "attack batch size must be positive, got ", options.batch_size);
  require(options.gamma > 0.0 && options.gamma < 1.0, "DDN gamma must be in (0, 1), got ", options.gamma);
  const bool was_training = model.training(), had_parameter_gradients = model.parameter_gradients();
  model.set_training(false);
  model.set_parameter_gradients(false);  // the attacks need dL/dimages only
  const int64_t classes = model.config().classes, dim = kCifarPixels;
  AttackResult result;
  std::mt19937_64 rng(options.seed);
  std::normal_distribution<double> normal(0.0, 1.0);

  for (size_t first = 0; first < indices.size(); first += static_cast<size_t>(options.batch_size)) {
    const size_t last = std::min(indices.size(), first + static_cast<size_t>(options.batch_size));
    std::vector<int64_t> batch(indices.begin() + static_cast<std::ptrdiff_t>(first),
                               indices.begin() + static_cast<std::ptrdiff_t>(last));
    const int64_t n = static_cast<int64_t>(batch.size());
    Tensor clean = pixel_batch(split, batch);
    std::vector<int32_t> labels(static_cast<size_t>(n));
    for (int64_t b = 0; b < n; ++b) labels[static_cast<size_t>(b)] = split.fine_labels[static_cast<size_t>(batch[b])];

    std::vector<float> logits;
    pixel_space_pass(model, norm, clean, logits, nullptr, nullptr);
    std::vector<bool> correct(static_cast<size_t>(n)), pgd_hit(static_cast<size_t>(n), false);
    std::vector<double> pgd_norm(static_cast<size_t>(n), kNaN), best(static_cast<size_t>(n), kInf);
    for (int64_t b = 0; b < n; ++b) {
      correct[static_cast<size_t>(b)] = !adversarial(&logits[static_cast<size_t>(b * classes)], classes, labels[b]);
      if (!correct[static_cast<size_t>(b)]) {
        pgd_hit[static_cast<size_t>(b)] = true;
        pgd_norm[static_cast<size_t>(b)] = 0.0;
        best[static_cast<size_t>(b)] = 0.0;
      }
    }
    const float* x0 = clean.data();
    Tensor grad(clean.shape());

    // One pass over the rows `active` of x only (the others are finished: misclassified, already broken, or not
    // attacked), gathered into a compact batch. visit(b, logits of row b, dL/dlogits of row b or null).
    using Visit = std::function<void(int64_t, const float*, float*)>;
    auto pass_on = [&](const Tensor& x, const std::vector<int64_t>& active, bool with_gradient, const Visit& visit) {
      const int64_t m = static_cast<int64_t>(active.size());
      Tensor compact(Shape{m, 3, kCifarSide, kCifarSide});
      for (int64_t k = 0; k < m; ++k)
        std::copy_n(x.data() + active[static_cast<size_t>(k)] * dim, dim, compact.data() + k * dim);
      if (!with_gradient) {
        pixel_space_pass(model, norm, compact, logits, nullptr, nullptr);
        for (int64_t k = 0; k < m; ++k) visit(active[static_cast<size_t>(k)], &logits[static_cast<size_t>(k * classes)], nullptr);
        return;
      }
      Tensor compact_grad;
      pixel_space_pass(model, norm, compact, logits, [&](const std::vector<float>& f, std::vector<float>& d) {
        for (int64_t k = 0; k < m; ++k)
          visit(active[static_cast<size_t>(k)], &f[static_cast<size_t>(k * classes)], &d[static_cast<size_t>(k * classes)]);
      }, &compact_grad);
      for (int64_t k = 0; k < m; ++k)
        std::copy_n(compact_grad.data() + k * dim, dim, grad.data() + active[static_cast<size_t>(k)] * dim);
    };
    auto perturbation_norm = [&](const Tensor& x, int64_t b) {
      double s = 0.0;
      for (int64_t i = 0; i < dim; ++i) {
        const double d = static_cast<double>(x.data()[b * dim + i]) - x0[b * dim + i];
        s += d * d;
      }
      return std::sqrt(s);
    };

    // ---- PGD, L2 ball of radius eps, margin loss; each step runs only on the images not yet broken ----
    if (eps > 0.0) {
      const double step = 2.5 * eps / options.steps;
      for (int restart = 0; restart < options.restarts; ++restart) {
        Tensor x = Tensor::from_vector(clean.to_vector(), clean.shape());
        if (restart > 0)
          for (int64_t b = 0; b < n; ++b) {  // uniform in the ball: direction * eps * U^(1/d)
            std::vector<double> d(static_cast<size_t>(dim));
            double s = 0.0;
            for (double& v : d) { v = normal(rng); s += v * v; }  // (v = ...) * v is unsequenced
            double radius = eps * std::pow(std::uniform_real_distribution<double>(0, 1)(rng), 1.0 / dim);
            for (int64_t i = 0; i < dim; ++i) {
              float v = x0[b * dim + i] + static_cast<float>(d[static_cast<size_t>(i)] / std::sqrt(s) * radius);
              x.data()[b * dim + i] = std::clamp(v, 0.0f, 1.0f);
            }
          }
        const Visit margin_gradient = [&](int64_t b, const float* f, float* d) {
          const int32_t y = labels[static_cast<size_t>(b)];
          if (!pgd_hit[static_cast<size_t>(b)] && adversarial(f, classes, y)) {
            pgd_hit[static_cast<size_t>(b)] = true;
            pgd_norm[static_cast<size_t>(b)] = perturbation_norm(x, b);
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
            if (!pgd_hit[static_cast<size_t>(b)]) active.push_back(b);
          if (active.empty()) break;
          if (it == options.steps) {  // last iterate: only check it
            pass_on(x, active, false, margin_gradient);
            break;
          }
          pass_on(x, active, true, margin_gradient);
          for (int64_t b : active) {
            if (pgd_hit[static_cast<size_t>(b)]) continue;
            float* xb = x.data() + b * dim;
            const float* gb = grad.data() + b * dim;
            double gn = norm_of(gb, dim);
            if (!(gn > 0.0)) continue;
            std::vector<double> delta(static_cast<size_t>(dim));
            double dn = 0.0;
            for (int64_t i = 0; i < dim; ++i) {
              double d = xb[i] - x0[b * dim + i] + step * gb[i] / gn;
              delta[static_cast<size_t>(i)] = d;
              dn += d * d;
            }
            dn = std::sqrt(dn);
            double shrink = dn > eps ? eps / dn : 1.0;
            for (int64_t i = 0; i < dim; ++i)
              xb[i] = std::clamp(static_cast<float>(x0[b * dim + i] + delta[static_cast<size_t>(i)] * shrink), 0.0f, 1.0f);
          }
        }
      }
    }

    // ---- DDN, minimum norm, on the correctly classified images ----
    {
      Tensor x = Tensor::from_vector(clean.to_vector(), clean.shape());
      std::vector<int64_t> active;
      for (int64_t b = 0; b < n; ++b)
        if (correct[static_cast<size_t>(b)]) active.push_back(b);
      std::vector<double> radius(static_cast<size_t>(n), options.initial_radius);
      const double alpha0 = 1.0;
      std::vector<bool> is_adv(static_cast<size_t>(n));
      const Visit cross_entropy_gradient = [&](int64_t b, const float* f, float* d) {
        const int32_t y = labels[static_cast<size_t>(b)];
        is_adv[static_cast<size_t>(b)] = adversarial(f, classes, y);
        if (is_adv[static_cast<size_t>(b)])
          best[static_cast<size_t>(b)] = std::min(best[static_cast<size_t>(b)], perturbation_norm(x, b));
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
          pass_on(x, active, false, cross_entropy_gradient);
          break;
        }
        pass_on(x, active, true, cross_entropy_gradient);
        const double alpha = 0.01 + (alpha0 - 0.01) * (1.0 + std::cos(M_PI * it / options.steps)) / 2.0;
        for (int64_t b : active) {
          double& r = radius[static_cast<size_t>(b)];
          r *= is_adv[static_cast<size_t>(b)] ? (1.0 - options.gamma) : (1.0 + options.gamma);
          r = std::min(r, best[static_cast<size_t>(b)]);  // never search beyond the best found
          float* xb = x.data() + b * dim;
          const float* gb = grad.data() + b * dim;
          double gn = norm_of(gb, dim);
          std::vector<double> delta(static_cast<size_t>(dim));
          double dn = 0.0;
          for (int64_t i = 0; i < dim; ++i) {
            double d = xb[i] - x0[b * dim + i] + (gn > 0.0 ? alpha * gb[i] / gn : 0.0);
            delta[static_cast<size_t>(i)] = d;
            dn += d * d;
          }
          dn = std::sqrt(dn);
          double scale = dn > 0.0 ? r / dn : 0.0;
          for (int64_t i = 0; i < dim; ++i)
            xb[i] = std::clamp(static_cast<float>(x0[b * dim + i] + delta[static_cast<size_t>(i)] * scale), 0.0f, 1.0f);
        }
      }
    }

    for (int64_t b = 0; b < n; ++b) {
      result.labels.push_back(labels[static_cast<size_t>(b)]);
      result.clean_correct.push_back(correct[static_cast<size_t>(b)]);
      result.pgd_success.push_back(pgd_hit[static_cast<size_t>(b)]);
      result.pgd_norm.push_back(pgd_norm[static_cast<size_t>(b)]);
      result.min_norm.push_back(best[static_cast<size_t>(b)]);
    }
  }
  model.set_training(was_training);
  model.set_parameter_gradients(had_parameter_gradients);
  return result;
}

}  // namespace orthoconv
