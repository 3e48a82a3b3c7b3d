#include "orthoconv/network_bound.hpp"

#include "orthoconv/certifying_pass.hpp"

#include <Eigen/Dense>
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

namespace orthoconv {

namespace {

double gamma(double n, double unit) {
  double nu = n * unit;
  require(nu < 0.5, "rounding bound: accumulation length ", n, " is too long for the rounding analysis");
  return nu / (1.0 - nu);
}

}  // namespace

double unit_roundoff(Precision precision) { return precision == Precision::float64 ? kFloat64Unit : kFloat32Unit; }

const char* precision_name(Precision precision) { return precision == Precision::float64 ? "float64" : "float32"; }

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

// Relative rounding error of the truncated series (Horner, see the header), per unit ||x0||.
double series_rounding_bound(double rho, double abs_norm, int64_t accumulation, int terms, double unit) {
  const double g = gamma(static_cast<double>(accumulation + 1), unit);
  const double w = 2.01 * unit;
  double exact_norm = 1.0, error = 0.0;  // ||p_{j+1}|| and E_{j+1} for j = K (p_{K+1} = x0, exact)
  for (int j = terms; j >= 1; --j) {
    const double computed = exact_norm + error;
    const double next_error =
        g * (1.0 + (1.0 + w) * abs_norm / j * computed) + w * abs_norm / j * computed + rho / j * error;
    exact_norm = 1.0 + rho / j * exact_norm;
    error = next_error;
  }
  return error * (1.0 + 1e-9);
}

double matrix_rounding_bound(double abs_norm, int64_t channels, int terms, double unit) {
  const double e = series_rounding_bound(abs_norm, abs_norm, channels, terms, unit);
  double q = 1.0;  // || |T_j| || <= q_j = 1 + abs_norm / j q_{j+1}, q_{K+1} = 1
  for (int j = terms; j >= 1; --j) q = 1.0 + abs_norm / j * q;
  return (e + gamma(static_cast<double>(channels), unit) * (q + e)) * (1.0 + 1e-9);
}

namespace {

double bias_map_norm(SocConv& soc, int64_t output_side) {
  if (!soc.config().bias) return 0.0;
  double sum = 0.0;
  for (float b : soc.bias().value.to_vector()) sum += static_cast<double>(b) * b;
  return std::sqrt(sum) * static_cast<double>(output_side) * (1.0 + 1e-9);
}

}  // namespace

NetworkBound verify_network(LipConvnet& model, Precision precision, const Normalization& norm) {
  return verify_network(model, model.config().eval_terms, precision, norm);
}

NetworkBound verify_network(LipConvnet& model, int terms, Precision precision, const Normalization& norm) {
  require(terms > 0, "verify_network: terms must be positive, got ", terms);
  NetworkBound out;
  out.precision = precision;
  out.unit = unit_roundoff(precision);
  const double u = out.unit;
  out.terms = terms;
  out.lln = model.lln_head() != nullptr;

  // Affine forms a * ||x0|| + b for the computed activation norm (X) and the accumulated error (D), starting
  // with the input's own rounding (header): float64 u |x0|; float32 2.01 u |x0| + 1.01 u ||p/255|| / min std,
  // with ||p/255|| <= sqrt(3 side^2).
  const double image_side = static_cast<double>(model.config().input_side);
  double xa = 1.0, xb = 0.0, da = precision == Precision::float64 ? u : 2.01 * u;
  double db = precision == Precision::float64 ? 0.0 : 1.01 * u * std::sqrt(3.0) * image_side * norm.lipschitz();
  xa += da;
  xb += db;
  for (const NetworkStep& step : model.steps()) {
    if (step.kind != StepKind::soc) continue;  // shuffles, MaxMin and the flatten are exact and 1-Lipschitz
    SocConv& soc = *step.soc;
    const SocConfig& config = soc.config();
    const int64_t side = step.input[2];
    NamedLayerBound layer;
    layer.name = step.name;
    layer.bound = soc_layer_bound(soc, side, terms);
    Tensor scaled = soc.scaled_filter();
    layer.abs_norm = abs_filter_norm_bound(scaled.to_vector(), config.groups, config.group_channels(), config.kernel);
    const int64_t accumulation = config.group_channels() * config.kernel * config.kernel;
    layer.rounding = series_rounding_bound(layer.bound.rho, layer.abs_norm, accumulation, terms, u);
    if (precision == Precision::float32 && config.kernel == 1)  // either path may run (float64: a series)
      layer.rounding =
          std::max(layer.rounding, matrix_rounding_bound(layer.abs_norm, config.group_channels(), terms, u));
    out.lipschitz *= layer.bound.bound;

    const double lip = layer.bound.bound, c = layer.rounding;
    const double bias = bias_map_norm(soc, side / config.stride);
    // Computed output before the bias: <= (lip + c) X; after: + B, then one rounding u.
    const double ya = (lip + c) * xa, yb = (lip + c) * xb + bias;
    da = lip * da + c * xa + u * ya;
    db = lip * db + c * xb + u * yb;
    xa = (1.0 + u) * ya;
    xb = (1.0 + u) * yb;
    out.layers.push_back(layer);
  }
  out.error_per_input_norm = da;
  out.error_constant = db;
  out.activation_per_input_norm = xa;
  out.activation_constant = xb;
  if (out.lln) {
    // y_i = q_i . x + b_i with q_i = w_i / ||w_i|| formed in float (<= F + 4 roundings) and a dot product of F.
    const double features = static_cast<double>(model.features());
    out.lln_row_error = gamma(features + 1, u) + gamma(features + 4, u);
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

ImageCertificate certify_verified(const NetworkBound& bound, const double* logits, int64_t classes, int32_t label,
                                  double input_norm, double input_lipschitz, const std::vector<double>* pair_norms) {
  require(!bound.lln || pair_norms != nullptr, "certify_verified: the lln head needs its pair norms");
  ImageCertificate out = bound.lln ? certify_lln(logits, classes, label, *pair_norms, input_lipschitz)
                                   : certify_margin(logits, classes, label, input_lipschitz);
  if (out.predicted < 0) return out;
  const double u = bound.unit, error = logit_error_bound(bound, input_norm);
  const int32_t c = out.predicted;
  double radius = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < classes; ++j) {
    if (j == c) continue;
    const double computed = logits[c] - logits[j];
    double safe, lipschitz;
    if (bound.lln) {
      // |e_c - e_j| <= 2 * per-logit bound + u (|y_c| + |y_j|) (each logit's bias addition).
      safe = computed - 2.0 * error - u * (std::abs(logits[c]) + std::abs(logits[j]));
      lipschitz = (*pair_norms)[static_cast<size_t>(c * classes + j)] * bound.lipschitz * input_lipschitz;
    } else {
      safe = computed - std::sqrt(2.0) * error;
      lipschitz = std::sqrt(2.0) * bound.lipschitz * input_lipschitz;
    }
    safe -= 4.0 * u * (std::abs(computed) + std::abs(safe));  // the rounding of these few operations
    double r = safe <= 0.0 ? 0.0 : (lipschitz > 0.0 ? safe / lipschitz : std::numeric_limits<double>::infinity());
    radius = std::min(radius, r * (1.0 - 4.0 * u));
  }
  out.radius = radius;
  return out;
}

}  // namespace orthoconv

namespace orthoconv {

namespace {

// Every rank's per-image results, gathered in rank order (= index order: batch_range's shards are contiguous), and
// the three reports rebuilt from them in that order, as one process sums them. Per image: three certificates
// (predicted, correct, radius each), the input norm and the logit deviation.
constexpr size_t kVerifiedRecord = 11;

void gather_evaluation(VerifiedEvaluation& out, Communicator& communicator, int64_t images) {
  std::vector<double> mine;
  mine.reserve(out.input_norms.size() * kVerifiedRecord);
  for (size_t i = 0; i < out.input_norms.size(); ++i) {
    for (const ImageCertificate* c : {&out.nominal_images[i], &out.lipschitz_images[i], &out.verified_images[i]})
      mine.insert(mine.end(), {static_cast<double>(c->predicted), c->correct ? 1.0 : 0.0, c->radius});
    mine.push_back(out.input_norms[i]);
    mine.push_back(out.logit_deviation[i]);
  }
  const std::vector<double> all = communicator.allgather(mine);
  require(all.size() == static_cast<size_t>(images) * kVerifiedRecord, "evaluate_verified: gathered ", all.size(),
          " values for ", images, " images");
  for (CertifyReport* r : {&out.nominal, &out.lipschitz, &out.verified}) {
    CertifyReport empty;
    for (auto& [eps, count] : r->certified) empty.certified[eps] = 0;
    *r = empty;
  }
  out.nominal_images.clear();
  out.lipschitz_images.clear();
  out.verified_images.clear();
  out.input_norms.clear();
  out.logit_deviation.clear();
  for (size_t i = 0; i < all.size(); i += kVerifiedRecord) {
    const double* record = all.data() + i;
    ImageCertificate c[3];
    for (int k = 0; k < 3; ++k) {
      c[k].predicted = static_cast<int32_t>(record[3 * k]);
      c[k].correct = record[3 * k + 1] != 0.0;
      c[k].radius = record[3 * k + 2];
    }
    out.nominal.add(c[0]);
    out.lipschitz.add(c[1]);
    out.verified.add(c[2]);
    out.nominal_images.push_back(c[0]);
    out.lipschitz_images.push_back(c[1]);
    out.verified_images.push_back(c[2]);
    out.input_norms.push_back(record[9]);
    out.logit_deviation.push_back(record[10]);
  }
  // Wall time: the slowest rank's.
  const std::vector<double> seconds =
      communicator.allgather(std::vector<double>{out.float32_seconds, out.float64_seconds});
  for (size_t r = 0; r < seconds.size(); r += 2) {
    out.float32_seconds = std::max(out.float32_seconds, seconds[r]);
    out.float64_seconds = std::max(out.float64_seconds, seconds[r + 1]);
  }
}

}  // namespace

VerifiedEvaluation evaluate_verified(LipConvnet& model, const NetworkBound& bound, const CifarSplit& split,
                                     const std::vector<int64_t>& indices, const Normalization& norm,
                                     const std::vector<int>& eps_numerators, int64_t batch_size,
                                     Communicator& communicator) {
  require(bound.precision == Precision::float64, "evaluate_verified: the bound must be for the float64 pass, got ",
          precision_name(bound.precision));
  require(bound.terms == model.config().eval_terms, "evaluate_verified: the bound is for ", bound.terms,
          " series terms, the model evaluates ", model.config().eval_terms);
  const int64_t classes = model.config().classes;
  std::vector<double> pair_norms;
  if (LinearNormalized* lln = model.lln_head())
    pair_norms = lln_pair_norms(lln->normalized_rows(), classes, model.features());
  const std::vector<double>* pairs = bound.lln ? &pair_norms : nullptr;
  const double input_lipschitz = norm.lipschitz();
  VerifiedEvaluation out;
  for (int e : eps_numerators) out.nominal.certified[e] = out.verified.certified[e] = out.lipschitz.certified[e] = 0;
  NetworkBound exact = bound;  // the same L, no rounding allowance
  exact.error_per_input_norm = exact.error_constant = exact.lln_row_error = exact.unit = 0.0;
  const Float64Network certifying(model, norm);  // the model's terms, which the bound is for (above)
  std::vector<uint8_t> pixels;
  std::vector<double> logits64, row32(static_cast<size_t>(classes));
  using Clock = std::chrono::steady_clock;
  Clock::time_point batch_start = Clock::now();
  // This rank's whole batches; its images' results are gathered below.
  const Range mine =
      batch_range(static_cast<int64_t>(indices.size()), batch_size, communicator.rank(), communicator.size());
  const std::vector<int64_t> shard(indices.begin() + mine.begin, indices.begin() + mine.end);
  for_each_evaluation_batch(
      model, split, shard, norm, batch_size, [&](const Batch& batch, const std::vector<float>& host_logits) {
        const Clock::time_point float64_start = Clock::now();
        out.float32_seconds += std::chrono::duration<double>(float64_start - batch_start).count();
        const int64_t n = static_cast<int64_t>(batch.labels.size()), bytes = certifying.image_bytes();
        require(bytes == kCifarPixels, "evaluate_verified: the model's input side does not match CIFAR images");
        pixels.resize(static_cast<size_t>(n * bytes));
        for (int64_t i = 0; i < n; ++i)
          std::copy_n(split.pixels.data() + batch.indices[static_cast<size_t>(i)] * bytes, bytes,
                      pixels.data() + i * bytes);
        logits64.resize(static_cast<size_t>(n * classes));
        certifying.forward(pixels.data(), n, logits64.data());
        out.float64_seconds += std::chrono::duration<double>(Clock::now() - float64_start).count();
        for (int64_t i = 0; i < n; ++i) {
          const float* row = host_logits.data() + i * classes;
          const double* row64 = logits64.data() + i * classes;
          const int32_t label = batch.labels[static_cast<size_t>(i)];
          double deviation = 0.0;
          for (int64_t j = 0; j < classes; ++j) {
            row32[static_cast<size_t>(j)] = row[j];
            deviation = std::max(deviation, std::abs(row32[static_cast<size_t>(j)] - row64[j]));
          }
          double sum = 0.0;
          for (double v : certifying.normalize(pixels.data() + i * bytes)) sum += v * v;
          const double input_norm = std::sqrt(sum) * (1.0 + 1e-12);
          ImageCertificate nominal = bound.lln ? certify_lln(row, classes, label, pair_norms, input_lipschitz)
                                               : certify_margin(row, classes, label, input_lipschitz);
          ImageCertificate lipschitz =
              certify_verified(exact, row32.data(), classes, label, input_norm, input_lipschitz, pairs);
          ImageCertificate verified =
              certify_verified(bound, row64, classes, label, input_norm, input_lipschitz, pairs);
          out.nominal.add(nominal);
          out.lipschitz.add(lipschitz);
          out.verified.add(verified);
          out.nominal_images.push_back(nominal);
          out.lipschitz_images.push_back(lipschitz);
          out.verified_images.push_back(verified);
          out.input_norms.push_back(input_norm);
          out.logit_deviation.push_back(deviation);
        }
        batch_start = Clock::now();
      });
  if (communicator.size() > 1) gather_evaluation(out, communicator, static_cast<int64_t>(indices.size()));
  return out;
}

VerifiedEvaluation evaluate_verified(LipConvnet& model, const NetworkBound& bound, const CifarSplit& split,
                                     const std::vector<int64_t>& indices, const Normalization& norm,
                                     const std::vector<int>& eps_numerators, int64_t batch_size) {
  return evaluate_verified(model, bound, split, indices, norm, eps_numerators, batch_size,
                           *single_process_communicator());
}

}  // namespace orthoconv
