// orthoconv/network_bound.hpp: certificates that do not assume every layer is exactly 1-Lipschitz.
//
// verify_network bounds, for a LipConvnet in evaluation mode with `terms` series terms:
//  1. its Lipschitz constant L = product over its SocConvs of soc_layer_bound(...).bound (bounds.hpp; MaxMin,
//     shuffles, pixel-unshuffle, channel padding and truncation are 1-Lipschitz). With the lln head, L covers
//     the body only and the head enters through the pairwise norms ||q_c - q_j||.
//  2. the rounding of a forward pass in the given precision, by standard floating-point error analysis (u the
//     unit roundoff, 2^-24 or 2^-53; gamma_n = n u / (1 - n u); a dot product of n terms, in any order, with or
//     without FMA, errs by at most gamma_n sum |a_i b_i|). Per Horner step of a SocConv with n = C*k*k
//     products plus the added x0:
//        E_j <= gamma_{n+1} (||x0|| + |A|/j P_{j+1}) + 2.01 u |A|/j P_{j+1} + rho/j E_{j+1},
//     where |A| >= the norm of the convolution by the elementwise |A_n| (attained at frequency 0: a real SVD of
//     sum_{y,x} |A_n[:, :, y, x]|), P_{j+1} >= ||computed p_{j+1}||, and the 2.01 u covers either the rounded
//     weights A_n / j (the float32 layer) or the division of the product by j (the float64 pass). The bias adds
//     u per element. Chaining the layers (errors propagate through each later layer's bound) gives
//     ||computed output - exact output|| <= error_per_input_norm * ||x0|| + error_constant, with ||x0|| the norm
//     of the normalized input image. The input's own rounding: float32 (the reference's arithmetic,
//     (fl(p/255) - mean)/std) errs by <= 2.01 u |x0| + 1.01 u (p/255) / std per pixel; the float64 pass rounds
//     once (certifying_pass.hpp), <= u |x0|. Reorders, shuffles, MaxMin and the channel copies are exact.
//     A float32 1x1 SocConv may run the matrix path instead (soc_conv.hpp): P^T by Horner's rule on the C x C
//     matrices, then one convolution of C products; matrix_rounding_bound covers it, and the float32 bound of
//     a 1x1 layer is the larger of the two (the path is chosen per input shape). The float64 pass is a series.
// certify_verified then certifies with the margin reduced by the rounding bound and the radius divided by L.
// The certificate that holds is the one from the float64 pass (certifying_pass.hpp) with the float64 bound; the
// float32 bound is kept to show why a float32 margin cannot be trusted at depth (it is several logits).
#pragma once

#include <string>
#include <vector>

#include "orthoconv/bounds.hpp"
#include "orthoconv/certify.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

struct NamedLayerBound {
  std::string name;  // "stage1.block0.conv", "head", ...
  SocLayerBound bound;
  double abs_norm = 0.0;  // >= norm of the convolution by |A_n|
  double rounding = 0.0;  // rounding error of the series <= rounding * ||x0||
};

// The forward pass whose rounding a bound covers.
enum class Precision { float32, float64 };
constexpr double kFloat32Unit = 1.0 / 16777216.0;          // 2^-24
constexpr double kFloat64Unit = 1.0 / 9007199254740992.0;  // 2^-53
double unit_roundoff(Precision precision);
const char* precision_name(Precision precision);  // "float32", "float64"

struct NetworkBound {
  Precision precision = Precision::float32;
  double unit = kFloat32Unit;  // unit roundoff of that precision
  std::vector<NamedLayerBound> layers;
  int terms = 0;
  double lipschitz = 1.0;             // product of the layer bounds (the body only with the lln head)
  double error_per_input_norm = 0.0;  // rounding of the logits (soc head) / of the head's input (lln head)
  double error_constant = 0.0;
  double activation_per_input_norm = 1.0;  // ||computed head input|| <= this * ||x0|| + activation_constant
  double activation_constant = 0.0;
  bool lln = false;
  double lln_row_error = 0.0;  // lln: |own rounding of logit i| <= lln_row_error * ||head input|| + u |y_i|
};

// norm: the input normalization (its smallest std enters the float32 input rounding). The SocConvs are those of
// model.steps(), each on its step's input shape; terms: the model's evaluation terms unless given.
NetworkBound verify_network(LipConvnet& model, Precision precision, const Normalization& norm);
NetworkBound verify_network(LipConvnet& model, int terms, Precision precision, const Normalization& norm);

// >= the norm of the zero-padded convolution by the elementwise |filter| ([g, C, C, k, k]).
double abs_filter_norm_bound(const std::vector<float>& filter, int64_t groups, int64_t channels, int64_t kernel);
// The rounding error of a K-term Horner series per unit ||x0|| (see above): rho >= ||A_n||, abs_norm >=
// || |A_n| ||, accumulation = C * k * k products per output, unit = the unit roundoff.
double series_rounding_bound(double rho, double abs_norm, int64_t accumulation, int terms, double unit);
// The rounding error of a 1x1 layer's matrix path per unit ||x0||, with abs_norm >= || |A_n| ||. Elementwise,
// |fl(T_j) - T_j| <= gamma_{C+1} (I + |A_n| |fl(T_{j+1})| / j) + 2.01 u |A_n| |fl(T_{j+1})| / j
// + |A_n| |fl(T_{j+1}) - T_{j+1}| / j, so in the 2-norm the error e of P^T follows the series recurrence with
// rho = abs_norm and ||x0|| = ||I|| = 1 (series_rounding_bound(abs_norm, abs_norm, C, ...)); the convolution
// adds gamma_C || |fl(P)| || <= gamma_C (q + e), q = sum_{i<=K} abs_norm^i / i! >= || |P| ||:
//   e + gamma_C (q + e).
double matrix_rounding_bound(double abs_norm, int64_t channels, int terms, double unit);

// The rounding bound on the logits for an image whose normalized input has norm input_norm: the bound on
// ||computed - exact|| (soc head), or on each |computed_i - exact_i| (lln head; u|y_i| not included).
double logit_error_bound(const NetworkBound& bound, double input_norm);

// A certificate with the verified constant and the rounding bound, from logits computed in bound.precision
// (float32 logits are exact in double). pair_norms: for the lln head, as in certify_lln (else ignored). A
// prediction whose margin does not exceed the rounding bound is not certified (radius 0, but still counted
// correct or not by its computed arg-max). The certificate's own few double operations (a difference, a
// product, a quotient) are covered by shaving 4u (of the bound's precision) off the margin and the radius.
ImageCertificate certify_verified(const NetworkBound& bound, const double* logits, int64_t classes, int32_t label,
                                  double input_norm, double input_lipschitz,
                                  const std::vector<double>* pair_norms = nullptr);

}  // namespace orthoconv

namespace orthoconv {

// Certificates of every image of split[indices] three ways: as the reference computes them (`nominal`: the
// float32 logits, L = L_in), with the verified L on the float32 logits (`lipschitz`: exact arithmetic assumed),
// and the certificate that holds (`verified`: the float64 certifying pass, the verified L and the float64
// rounding bound). `bound` must be verify_network(model, terms, Precision::float64, norm) for the model's
// evaluation terms. The model runs in evaluation mode; its previous mode is restored.
struct VerifiedEvaluation {
  CertifyReport nominal, lipschitz, verified;
  std::vector<ImageCertificate> nominal_images, lipschitz_images, verified_images;  // in the order of indices
  std::vector<double> input_norms;                      // ||x0||, the normalized image (float64 pass)
  std::vector<double> logit_deviation;                  // max_i |float32 logit i - float64 logit i|, per image
  double float32_seconds = 0.0, float64_seconds = 0.0;  // wall time of the two passes
};
VerifiedEvaluation evaluate_verified(LipConvnet& model, const NetworkBound& bound, const CifarSplit& split,
                                     const std::vector<int64_t>& indices, const Normalization& norm,
                                     const std::vector<int>& eps_numerators, int64_t batch_size = 256);
// The same, sharded over the ranks of `communicator` as evaluate_model's sharded form: every rank runs whole
// batches of both passes and returns the evaluation of one process (the reports and per-image vectors bit for
// bit); the two seconds are the slowest rank's.
VerifiedEvaluation evaluate_verified(LipConvnet& model, const NetworkBound& bound, const CifarSplit& split,
                                     const std::vector<int64_t>& indices, const Normalization& norm,
                                     const std::vector<int>& eps_numerators, int64_t batch_size,
                                     Communicator& communicator);

}  // namespace orthoconv
