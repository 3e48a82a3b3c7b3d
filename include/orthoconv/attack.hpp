// orthoconv/attack.hpp: L2 attacks in pixel space, to cross-check certificates.
//
// The attacked function is the whole classifier on pixels in [0, 1]: logits = model(normalize(x)), evaluated by
// the real model (evaluation mode, its series terms) with exact gradients through LipConvnet::backward.
//  - PGD (L2, Madry et al.): maximise the margin loss max_{j != y} f_j - f_y inside the ball ||delta|| <= eps
//    intersected with the box [0, 1]; several random restarts; success as soon as any iterate is misclassified.
//  - DDN (Rony et al., CVPR 2019), a minimum-norm attack: gradient steps on the cross-entropy with a radius that
//    shrinks by (1 - gamma) while the iterate is adversarial and grows by (1 + gamma) while it is not; returns
//    the smallest adversarial perturbation norm it found.
// A certified image must survive both at every radius up to its certified radius: PGD at eps must fail on
// images certified at eps, and DDN's minimum norm must exceed the certified radius.
// Each step runs the model only on the images still in play (PGD: correct and not yet broken; DDN: correctly
// classified), gathered into a compact batch, so the cost follows the clean and robust accuracy.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "orthoconv/data.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

struct AttackOptions {
  int steps = 100;
  int restarts = 3;             // PGD random restarts (the first starts at the clean image)
  double gamma = 0.05;          // DDN radius factor
  double initial_radius = 1.0;  // DDN starting radius (pixel space)
  uint64_t seed = 0;
  int64_t batch_size = 128;
};

struct AttackResult {
  std::vector<int32_t> labels;
  std::vector<bool> clean_correct;  // correctly classified without perturbation
  std::vector<bool> pgd_success;    // PGD found a misclassified point within eps
  std::vector<double> pgd_norm;     // the successful perturbation's norm (NaN when none)
  std::vector<double> min_norm;     // DDN's smallest adversarial norm (+inf when none was found;
                                    // 0 when the clean image is already misclassified)
};

// Pixels of split[indices] in [0, 1] (no augmentation), NCHW.
Tensor pixel_batch(const CifarSplit& split, const std::vector<int64_t>& indices);

// Runs both attacks on split[indices] at pixel-space radius eps.
AttackResult attack_model(LipConvnet& model, const Normalization& norm, const CifarSplit& split,
                          const std::vector<int64_t>& indices, double eps, const AttackOptions& options);

// One forward pass on pixels: logits (host, [n, classes]); then, when make_diff is given, it turns the logits
// into dL/dlogits and the pass continues backward into dL/dpixels (diff_pixels).
using DiffFromLogits = std::function<void(const std::vector<float>& logits, std::vector<float>& diff)>;
void pixel_space_pass(LipConvnet& model, const Normalization& norm, const Tensor& pixels, std::vector<float>& logits,
                      const DiffFromLogits& make_diff, Tensor* diff_pixels);

}  // namespace orthoconv
