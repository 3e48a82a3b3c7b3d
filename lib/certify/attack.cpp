// The attacks' common ground: pixel batches, the pass of the classifier on pixels, the batch loop. PGD is in
// pgd_attack.cpp, DDN in ddn_attack.cpp. See include/orthoconv/attack.hpp.
#include "orthoconv/attack.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>

#include "certify/attack_batch.hpp"

namespace orthoconv {

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

AttackBatch::AttackBatch(LipConvnet& model_, const Normalization& norm_, const CifarSplit& split,
                         const std::vector<int64_t>& indices)
    : model(model_),
      norm(norm_),
      images(static_cast<int64_t>(indices.size())),
      classes(model_.config().classes),
      clean(pixel_batch(split, indices)),
      labels(static_cast<size_t>(images)),
      grad(clean.shape()) {
  for (int64_t b = 0; b < images; ++b)
    labels[static_cast<size_t>(b)] = split.fine_labels[static_cast<size_t>(indices[static_cast<size_t>(b)])];
}

void AttackBatch::pass_on(const Tensor& x, const std::vector<int64_t>& active, bool with_gradient, const Visit& visit) {
  const int64_t m = static_cast<int64_t>(active.size()), dim = kCifarPixels;
  Tensor compact(Shape{m, 3, kCifarSide, kCifarSide});
  for (int64_t k = 0; k < m; ++k)
    std::copy_n(x.data() + active[static_cast<size_t>(k)] * dim, dim, compact.data() + k * dim);
  if (!with_gradient) {
    pixel_space_pass(model, norm, compact, logits, nullptr, nullptr);
    for (int64_t k = 0; k < m; ++k)
      visit(active[static_cast<size_t>(k)], &logits[static_cast<size_t>(k * classes)], nullptr);
    return;
  }
  Tensor compact_grad;
  pixel_space_pass(
      model, norm, compact, logits,
      [&](const std::vector<float>& f, std::vector<float>& d) {
        for (int64_t k = 0; k < m; ++k)
          visit(active[static_cast<size_t>(k)], &f[static_cast<size_t>(k * classes)],
                &d[static_cast<size_t>(k * classes)]);
      },
      &compact_grad);
  for (int64_t k = 0; k < m; ++k)
    std::copy_n(compact_grad.data() + k * dim, dim, grad.data() + active[static_cast<size_t>(k)] * dim);
}

double AttackBatch::perturbation_norm(const Tensor& x, int64_t b) const {
  const int64_t dim = kCifarPixels;
  const float* x0 = clean.data();
  double s = 0.0;
  for (int64_t i = 0; i < dim; ++i) {
    const double d = static_cast<double>(x.data()[b * dim + i]) - x0[b * dim + i];
    s += d * d;
  }
  return std::sqrt(s);
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
  AttackResult result;
  std::mt19937_64 rng(options.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (size_t first = 0; first < indices.size(); first += static_cast<size_t>(options.batch_size)) {
    const size_t last = std::min(indices.size(), first + static_cast<size_t>(options.batch_size));
    AttackBatch batch(model, norm, split,
                      std::vector<int64_t>(indices.begin() + static_cast<std::ptrdiff_t>(first),
                                           indices.begin() + static_cast<std::ptrdiff_t>(last)));
    const size_t n = static_cast<size_t>(batch.images);
    // The clean pass: a misclassified image counts as broken by PGD, at norm 0, and DDN's minimum norm is 0.
    std::vector<float> logits;
    pixel_space_pass(model, norm, batch.clean, logits, nullptr, nullptr);
    std::vector<bool> correct(n), pgd_hit(n, false);
    std::vector<double> pgd_norm(n, kAttackNaN), best(n, kAttackInf);
    for (size_t b = 0; b < n; ++b) {
      correct[b] = !adversarial(&logits[b * static_cast<size_t>(batch.classes)], batch.classes, batch.labels[b]);
      if (!correct[b]) {
        pgd_hit[b] = true;
        pgd_norm[b] = 0.0;
        best[b] = 0.0;
      }
    }
    if (eps > 0.0) pgd_attack(batch, eps, options, rng, normal, pgd_hit, pgd_norm);
    ddn_attack(batch, options, correct, best);
    for (size_t b = 0; b < n; ++b) {
      result.labels.push_back(batch.labels[b]);
      result.clean_correct.push_back(correct[b]);
      result.pgd_success.push_back(pgd_hit[b]);
      result.pgd_norm.push_back(pgd_norm[b]);
      result.min_norm.push_back(best[b]);
    }
  }
  model.set_training(was_training);
  model.set_parameter_gradients(had_parameter_gradients);
  return result;
}

}  // namespace orthoconv
