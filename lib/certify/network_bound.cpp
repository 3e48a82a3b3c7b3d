#include "orthoconv/network_bound.hpp"

#include <Eigen/Dense>
#include <Eigen/Eigenvalues>
#include <cmath>
#include <limits>
#include <map>

namespace orthoconv {

namespace {

constexpr double kUnit = 1.0 / 16777216.0;  // 2^-24

double gamma(double n) {
  double nu = n * kUnit;
  require(nu < 0.5, "rounding bound: accumulation length ", n, " is too long for float32 analysis");
  return nu / (1.0 - nu);
}

}  // namespace

// >= the norm of the zero-padded convolution by |filter| (nonnegative: the circular norm peaks at frequency 0).
double abs_filter_norm_bound(const std::vector<float>& filter, int64_t groups, int64_t c, int64_t k) {
  double worst = 0.0;
  for (int64_t g = 0; g < groups; ++g) {
    Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(c, c);
    const float* a = filter.data() + g * c * c * k * k;
    for (int64_t o = 0; o < c; ++o)
      for (int64_t i = 0; i < c; ++i)
        for (int64_t t = 0; t < k * k; ++t) sum(o, i) += std::abs(static_cast<double>(a[(o * c + i) * k * k + t]));
    Eigen::MatrixXd gram = sum.transpose() * sum;
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(gram, Eigen::EigenvaluesOnly);
    require<Error>(solver.info() == Eigen::Success, "abs filter bound: eigen-solver failed");
    worst = std::max(worst, std::sqrt(std::max(0.0, solver.eigenvalues().maxCoeff())));
  }
  return worst * (1.0 + 1e-9);
}

// Relative float32 error of the truncated series (Horner, see the header), per unit ||x0||.
double series_rounding_bound(double rho, double abs_norm, int64_t accumulation, int terms) {
  const double g = gamma(static_cast<double>(accumulation + 1));
  const double w = 2.01 * kUnit;
  double exact_norm = 1.0, error = 0.0;  // ||p_{j+1}|| and E_{j+1} for j = K (p_{K+1} = x0, exact)
  for (int j = terms; j >= 1; --j) {
    const double computed = exact_norm + error;
    const double next_error = g * (1.0 + (1.0 + w) * abs_norm / j * computed) + w * abs_norm / j * computed +
                              rho / j * error;
    exact_norm = 1.0 + rho / j * exact_norm;
    error = next_error;
  }
  return error * (1.0 + 1e-9);
}

namespace {

double bias_map_norm(SocConv& soc, int64_t output_side) {
  if (!soc.config().bias) return 0.0;
  double sum = 0.0;
  for (float b : soc.bias().value.to_vector()) sum += static_cast<double>(b) * b;
  return std::sqrt(sum) * static_cast<double>(output_side) * (1.0 + 1e-9);
}

}  // namespace

NetworkBound verify_network(LipConvnet& model, int terms) {
  require(terms > 0, "verify_network: terms must be positive, got ", terms);
  NetworkBound out;
  out.terms = terms;
  out.lln = model.lln_head() != nullptr;

  // Input side of each SocConv, from the layer table: "X.conv" / "X.conv.first" read block X's input,
  // "X.conv.second" its output (after the stride), "head" runs on 1 x 1.
  std::map<std::string, std::pair<int64_t, int64_t>> sides;  // block -> (input side, output side)
  for (const LayerRow& row : model.layer_table()) sides[row.name] = {row.input[2], row.output[2]};

  // Affine forms a * ||x0|| + b for the computed activation norm (X) and the accumulated error (D).
  // The normalized input itself: 2 roundings per pixel.
  double xa = 1.0, xb = 0.0, da = 2.01 * kUnit, db = 0.0;
  for (NamedSoc& named : model.soc_layers()) {
    SocConv& soc = *named.soc;
    const SocConfig& config = soc.config();
    int64_t side = 1;
    if (named.name != "head") {
      std::string block = named.name.substr(0, named.name.find(".conv"));
      auto it = sides.find(block);
      require<Error>(it != sides.end(), "verify_network: no layer-table row for ", named.name);
      side = named.name.size() > 7 && named.name.compare(named.name.size() - 7, 7, ".second") == 0
                 ? it->second.second
                 : it->second.first;
    }
    NamedLayerBound layer;
    layer.name = named.name;
    layer.bound = soc_layer_bound(soc, side, terms);
    Tensor scaled = soc.scaled_filter();
    layer.abs_norm = abs_filter_norm_bound(scaled.to_vector(), config.groups, config.group_channels(), config.kernel);
    const int64_t accumulation = config.group_channels() * config.kernel * config.kernel;
    layer.rounding = series_rounding_bound(layer.bound.rho, layer.abs_norm, accumulation, terms);
    out.lipschitz *= layer.bound.bound;

    const double lip = layer.bound.bound, c = layer.rounding;
    const double bias = bias_map_norm(soc, side / config.stride);
    // Computed output before the bias: <= (lip + c) X; after: + B, then one rounding u.
    const double ya = (lip + c) * xa, yb = (lip + c) * xb + bias;
    da = lip * da + c * xa + kUnit * ya;
    db = lip * db + c * xb + kUnit * yb;
    xa = (1.0 + kUnit) * ya;
    xb = (1.0 + kUnit) * yb;
    out.layers.push_back(layer);
  }
  out.error_per_input_norm = da;
  out.error_constant = db;
  out.activation_per_input_norm = xa;
  out.activation_constant = xb;
  if (out.lln) {
    // y_i = q_i . x + b_i with q_i = w_i / ||w_i|| formed in float (<= F + 4 roundings) and a dot product of F.
    const double features = static_cast<double>(model.features());
    out.lln_row_error = gamma(features + 1) + gamma(features + 4);
  }
  return out;
}

double logit_error_bound(const NetworkBound& bound, double input_norm) {
  const double body = bound.error_per_input_norm * input_norm + bound.error_constant;
  if (!bound.lln) return body;
  const double activation = bound.activation_per_input_norm * input_norm + bound.activation_constant;
  // Each logit: the body's error through a unit row, plus the head's own rounding.
  return body + bound.lln_row_error * activation;
}

ImageCertificate certify_verified(const NetworkBound& bound, const float* logits, int64_t classes, int32_t label,
                                  double input_norm, double input_lipschitz, const std::vector<double>* pair_norms) {
  ImageCertificate out = bound.lln ? certify_lln(logits, classes, label, *pair_norms, input_lipschitz)
                                   : certify_margin(logits, classes, label, input_lipschitz);
  if (out.predicted < 0) return out;
  const double error = logit_error_bound(bound, input_norm);
  const int32_t c = out.predicted;
  double radius = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < classes; ++j) {
    if (j == c) continue;
    const double computed = static_cast<double>(logits[c]) - static_cast<double>(logits[j]);
    double safe, lipschitz;
    if (bound.lln) {
      // |e_c - e_j| <= 2 * per-logit bound + u (|y_c| + |y_j|).
      safe = computed - 2.0 * error - kUnit * (std::abs(logits[c]) + std::abs(logits[j]));
      lipschitz = (*pair_norms)[static_cast<size_t>(c * classes + j)] * bound.lipschitz * input_lipschitz;
    } else {
      safe = computed - std::sqrt(2.0) * error;
      lipschitz = std::sqrt(2.0) * bound.lipschitz * input_lipschitz;
    }
    double r = safe <= 0.0 ? 0.0 : (lipschitz > 0.0 ? safe / lipschitz : std::numeric_limits<double>::infinity());
    radius = std::min(radius, r);
  }
  out.radius = radius;
  return out;
}

}  // namespace orthoconv

namespace orthoconv {

VerifiedEvaluation evaluate_verified(LipConvnet& model, const NetworkBound& bound, const CifarSplit& split,
                                     const std::vector<int64_t>& indices, const Normalization& norm,
                                     const std::vector<int>& eps_numerators, int64_t batch_size) {
  const int64_t classes = model.config().classes;
  std::vector<double> pair_norms;
  if (LinearNormalized* lln = model.lln_head())
    pair_norms = lln_pair_norms(lln->normalized_rows(), classes, model.features());
  VerifiedEvaluation out;
  for (int e : eps_numerators) out.nominal.certified[e] = out.verified.certified[e] = out.lipschitz.certified[e] = 0;
  NetworkBound exact = bound;  // the same L, no rounding allowance
  exact.error_per_input_norm = exact.error_constant = exact.lln_row_error = 0.0;
  for_each_evaluation_batch(model, split, indices, norm, batch_size,
                            [&](const Batch& batch, const std::vector<float>& host_logits) {
    const int64_t n = static_cast<int64_t>(batch.labels.size());
    const int64_t pixels = batch.images.numel() / n;
    for (int64_t i = 0; i < n; ++i) {
      const float* row = host_logits.data() + i * classes;
      const int32_t label = batch.labels[static_cast<size_t>(i)];
      double sum = 0.0;
      for (int64_t p = 0; p < pixels; ++p) {
        double v = batch.images.data()[i * pixels + p];
        sum += v * v;
      }
      const double input_norm = std::sqrt(sum) * (1.0 + 1e-12);
      ImageCertificate nominal = bound.lln ? certify_lln(row, classes, label, pair_norms, norm.lipschitz())
                                           : certify_margin(row, classes, label, norm.lipschitz());
      ImageCertificate verified = certify_verified(bound, row, classes, label, input_norm, norm.lipschitz(),
                                                   bound.lln ? &pair_norms : nullptr);
      ImageCertificate lipschitz = certify_verified(exact, row, classes, label, input_norm, norm.lipschitz(),
                                                    bound.lln ? &pair_norms : nullptr);
      out.nominal.add(nominal);
      out.verified.add(verified);
      out.lipschitz.add(lipschitz);
      out.nominal_images.push_back(nominal);
      out.verified_images.push_back(verified);
      out.lipschitz_images.push_back(lipschitz);
      out.input_norms.push_back(input_norm);
    }
  });
  return out;
}

}  // namespace orthoconv
