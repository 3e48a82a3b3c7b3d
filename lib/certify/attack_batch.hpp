// One batch under attack: what PGD (pgd_attack.cpp) and DDN (ddn_attack.cpp) share. Internal to the library; see
// include/orthoconv/attack.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "orthoconv/attack.hpp"

namespace orthoconv {

constexpr double kAttackNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kAttackInf = std::numeric_limits<double>::infinity();

inline int32_t arg_max(const float* f, int64_t classes) {
  int32_t best = 0;
  for (int64_t j = 1; j < classes; ++j)
    if (f[j] > f[best]) best = static_cast<int32_t>(j);
  return best;
}

inline bool finite_row(const float* f, int64_t classes) {
  for (int64_t j = 0; j < classes; ++j)
    if (!std::isfinite(f[j])) return false;
  return true;
}

// Misclassified (a non-finite row counts as misclassified: the certificate never covers it anyway).
inline bool adversarial(const float* f, int64_t classes, int32_t label) {
  return !finite_row(f, classes) || arg_max(f, classes) != label;
}

inline double norm_of(const float* v, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(v[i]) * v[i];
  return std::sqrt(s);
}

// The clean images of one batch, their labels, and a pass of the model over some of their perturbed copies.
struct AttackBatch {
  // visit(b, logits of row b, dL/dlogits of row b to fill, or null).
  using Visit = std::function<void(int64_t, const float*, float*)>;

  AttackBatch(LipConvnet& model, const Normalization& norm, const CifarSplit& split,
              const std::vector<int64_t>& indices);
  // One pass over the rows `active` of x only (the others are finished: misclassified, already broken, or not
  // attacked), gathered into a compact batch; with_gradient: dL/dpixels of those rows into grad.
  void pass_on(const Tensor& x, const std::vector<int64_t>& active, bool with_gradient, const Visit& visit);
  // ||x_b - clean_b||_2.
  double perturbation_norm(const Tensor& x, int64_t b) const;

  LipConvnet& model;
  const Normalization& norm;
  int64_t images, classes;
  Tensor clean;  // pixels in [0, 1], [n, 3, 32, 32]
  std::vector<int32_t> labels;
  std::vector<float> logits;  // of the last pass
  Tensor grad;                // dL/dpixels of the rows of the last pass with a gradient
};

// PGD (L2 ball of radius eps > 0, margin loss, options.restarts restarts drawn from rng and normal): marks
// hit[b] and sets hit_norm[b] for each image it misclassifies; images already hit are not attacked.
void pgd_attack(AttackBatch& batch, double eps, const AttackOptions& options, std::mt19937_64& rng,
                std::normal_distribution<double>& normal, std::vector<bool>& hit, std::vector<double>& hit_norm);
// DDN (minimum norm) on the images with correct[b]: lowers best[b] to the smallest adversarial norm it finds.
void ddn_attack(AttackBatch& batch, const AttackOptions& options, const std::vector<bool>& correct,
                std::vector<double>& best);

}  // namespace orthoconv
