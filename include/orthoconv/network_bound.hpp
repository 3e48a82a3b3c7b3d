// orthoconv/network_bound.hpp: certificates that do not assume every layer is exactly 1-Lipschitz.
//
// verify_network bounds, for a LipConvnet in evaluation mode with `terms` series terms:
//  1. its Lipschitz constant L = product over its SocConvs of soc_layer_bound(...).bound (bounds.hpp; MaxMin,
//     shuffles, pixel-unshuffle, channel padding and truncation are 1-Lipschitz). With the lln head, L covers
//     the body only and the head enters through the pairwise norms ||q_c - q_j||.
//  2. the float32 rounding of the whole forward pass, by standard floating-point error analysis (u = 2^-24,
//     gamma_n = n u / (1 - n u); a dot product of n terms, in any order, with or without FMA, errs by at most
//     gamma_n sum |a_i b_i|). Per Horner step of a SocConv with n = C*k*k products plus the added x0:
//        E_j <= gamma_{n+1} (||x0|| + |A|/j P_{j+1}) + 2.01 u |A|/j P_{j+1} + rho/j E_{j+1},
//     where |A| >= the norm of the convolution by the elementwise |A_n| (attained at frequency 0: a real SVD of
//     sum_{y,x} |A_n[:, :, y, x]|), P_{j+1} >= ||computed p_{j+1}||, and the 2.01 u covers the rounded weights
//     A_n / j. The bias adds u per element. Chaining the layers (errors propagate through each later layer's
//     bound) gives ||computed output - exact output|| <= error_per_input_norm * ||x0|| + error_constant, with
//     ||x0|| the norm of the normalized input image (its own rounding, 2 operations per pixel, is included).
//     The norm of a bias map enters the constant. oneDNN's reorders, the shuffles and MaxMin are exact.
// certify_verified then certifies with the margin reduced by the rounding bound and the radius divided by L.
#pragma once

#include <string>
#include <vector>

#include "orthoconv/bounds.hpp"
#include "orthoconv/certify.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

struct NamedLayerBound {
  std::string name;          // "stage1.block0.conv", "head", ...
  SocLayerBound bound;
  double abs_norm = 0.0;     // >= norm of the convolution by |A_n|
  double rounding = 0.0;     // float32 error of the series <= rounding * ||x0||
};

struct NetworkBound {
  std::vector<NamedLayerBound> layers;
  int terms = 0;
  double lipschitz = 1.0;              // product of the layer bounds (the body only with the lln head)
  double error_per_input_norm = 0.0;   // rounding of the logits (soc head) / of the head's input (lln head)
  double error_constant = 0.0;
  double activation_per_input_norm = 1.0;  // ||computed head input|| <= this * ||x0|| + activation_constant
  double activation_constant = 0.0;
  bool lln = false;
  double lln_row_error = 0.0;          // lln: |own rounding of logit i| <= lln_row_error * ||head input|| + u |y_i|
};

NetworkBound verify_network(LipConvnet& model, int terms);

// >= the norm of the zero-padded convolution by the elementwise |filter| ([g, C, C, k, k]).
double abs_filter_norm_bound(const std::vector<float>& filter, int64_t groups, int64_t channels, int64_t kernel);
// The float32 error of a K-term Horner series per unit ||x0|| (see above): rho >= ||A_n||, abs_norm >= || |A_n| ||,
// accumulation = C * k * k products per output.
double series_rounding_bound(double rho, double abs_norm, int64_t accumulation, int terms);

// The rounding bound on the logits for an image whose normalized input has norm input_norm: the bound on
// ||computed - exact|| (soc head), or on each |computed_i - exact_i| (lln head; u|y_i| not included).
double logit_error_bound(const NetworkBound& bound, double input_norm);

// A certificate with the verified constant and the rounding bound. pair_norms: for the lln head, as in
// certify_lln (else ignored). A prediction whose margin does not exceed the rounding bound is not certified
// (radius 0, but still counted correct or not by its computed arg-max).
ImageCertificate certify_verified(const NetworkBound& bound, const float* logits, int64_t classes, int32_t label,
                                  double input_norm, double input_lipschitz,
                                  const std::vector<double>* pair_norms = nullptr);

}  // namespace orthoconv

namespace orthoconv {

// Certificates of every image of split[indices], both as the reference computes them (L = L_in, no rounding:
// `nominal`) and with the verified bound (`verified`), from one evaluation-mode pass.
struct VerifiedEvaluation {
  CertifyReport nominal;    // L = L_in, float32 ignored (the reference)
  CertifyReport verified;   // the verified L and the worst-case float32 rounding bound
  CertifyReport lipschitz;  // the verified L only (exact arithmetic assumed)
  std::vector<ImageCertificate> nominal_images, verified_images, lipschitz_images;  // in the order of indices
  std::vector<double> input_norms;                                 // ||normalized image||
};
VerifiedEvaluation evaluate_verified(LipConvnet& model, const NetworkBound& bound, const CifarSplit& split,
                                     const std::vector<int64_t>& indices, const Normalization& norm,
                                     const std::vector<int>& eps_numerators, int64_t batch_size = 256);

}  // namespace orthoconv
