// orthoconv/certify.hpp: certified robustness of a 1-Lipschitz classifier from its logits.
//
// For an image with logits f (classes entries) the prediction c is the FIRST arg-max. With L_in the Lipschitz
// constant of the input normalization (Normalization::lipschitz() = 1 / min(std)):
//   soc head (orthogonal, the logits are 1-Lipschitz in l2):
//       margin m = f_c - max_{j != c} f_j,   radius r = m / (sqrt(2) * L_in)
//   lln head (rows q_j of unit norm): f_c - f_j is ||q_c - q_j||-Lipschitz, so
//       r = min_{j != c} (f_c - f_j) / (||q_c - q_j|| * L_in)
//   (a pair with q_c == q_j exactly has a constant difference: it never binds when f_c > f_j, and gives
//   r = 0 when f_c == f_j).
// The margins are computed in double from the float logits. An image is certified at eps iff it is correctly
// classified AND r > eps (strict: a tie at the boundary is not certified). Any NaN or infinite logit makes the
// image incorrect and never certified (its radius is NaN and is left out of every mean).
// eps values are given by their numerator over 255 (36 -> 36/255), as in the papers' tables.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <vector>

#include "orthoconv/communicator.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

struct ImageCertificate {
  int32_t predicted = -1;  // -1 when the logits are not all finite
  bool correct = false;
  double radius = 0.0;  // NaN when not finite
};

// Margin certificate (orthogonal head), from float32 or float64 logits.
ImageCertificate certify_margin(const float* logits, int64_t classes, int32_t label, double input_lipschitz);
ImageCertificate certify_margin(const double* logits, int64_t classes, int32_t label, double input_lipschitz);
// LLN certificate. pair_norms[c * classes + j] = ||q_c - q_j|| (see lln_pair_norms).
ImageCertificate certify_lln(const float* logits, int64_t classes, int32_t label, const std::vector<double>& pair_norms,
                             double input_lipschitz);
ImageCertificate certify_lln(const double* logits, int64_t classes, int32_t label,
                             const std::vector<double>& pair_norms, double input_lipschitz);
// ||q_i - q_j|| for all pairs, from normalized rows q [classes, features] (double).
std::vector<double> lln_pair_norms(const std::vector<double>& rows, int64_t classes, int64_t features);

bool certified_at(const ImageCertificate& certificate, int eps_numerator);

struct CertifyReport {
  int64_t images = 0;
  int64_t correct = 0;
  double loss_sum = 0.0;             // cross-entropy sum, when computed by evaluate_model
  double radius_sum_correct = 0.0;   // sum of r over correct images
  std::map<int, int64_t> certified;  // eps numerator -> certified count

  double clean_accuracy() const { return images ? static_cast<double>(correct) / images : 0.0; }
  double certified_accuracy(int eps) const;
  double mean_radius() const { return correct ? radius_sum_correct / correct : 0.0; }
  double mean_loss() const { return images ? loss_sum / images : 0.0; }
  void add(const ImageCertificate& certificate);
};

// Accumulates certificates over a batch of host logits [n, classes].
class Certifier {
 public:
  Certifier(std::vector<int> eps_numerators, double input_lipschitz);
  // For the lln head: rows q (see LinearNormalized::normalized_rows()).
  void use_lln(const std::vector<double>& rows, int64_t classes, int64_t features);
  void add_batch(const float* logits, int64_t n, int64_t classes, const int32_t* labels);
  const CertifyReport& report() const { return report_; }

 private:
  std::vector<int> eps_;
  double lipschitz_;
  bool lln_ = false;
  std::vector<double> pair_norms_;
  CertifyReport report_;
};

// Runs `model` in evaluation mode on split[indices] (no augmentation) in batches of `batch_size` and calls
// visit(batch, host_logits [n, classes]) for each; restores the model's previous mode (also when it throws). The
// one evaluation loop behind evaluate_model and evaluate_verified (network_bound.hpp). When given, stop_requested
// is polled after each batch; once it returns true the loop throws Interrupted.
void for_each_evaluation_batch(LipConvnet& model, const CifarSplit& split, const std::vector<int64_t>& indices,
                               const Normalization& norm, int64_t batch_size,
                               const std::function<void(const Batch&, const std::vector<float>&)>& visit,
                               const std::function<bool()>& stop_requested = {});

// Runs `model` in evaluation mode on split[indices] (no augmentation) in batches and certifies every image;
// restores the model's previous mode. Also sums the cross-entropy of each image into loss_sum. stop_requested:
// as for_each_evaluation_batch.
CertifyReport evaluate_model(LipConvnet& model, const CifarSplit& split, const std::vector<int64_t>& indices,
                             const Normalization& norm, const std::vector<int>& eps_numerators,
                             int64_t batch_size = 256, const std::function<bool()>& stop_requested = {});
// The same, sharded over the ranks of `communicator` (every rank calls it with the same arguments): each rank
// evaluates whole batches (batch_range: each image in the batch it has in one process), the per-image results are
// gathered, and every rank returns the report of one process, bit for bit (the sums taken in index order).
// stop_requested is polled only when the job has one rank (a rank that stopped alone would leave the others
// waiting).
CertifyReport evaluate_model(LipConvnet& model, const CifarSplit& split, const std::vector<int64_t>& indices,
                             const Normalization& norm, const std::vector<int>& eps_numerators, int64_t batch_size,
                             const std::function<bool()>& stop_requested, Communicator& communicator);

}  // namespace orthoconv
