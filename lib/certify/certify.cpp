// Certificates from logits: the margin rule (orthogonal head) and the pairwise rule (lln head), the strict
// r > eps test, and evaluation of a model over a data split. See include/orthoconv/certify.hpp.
#include "orthoconv/certify.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace orthoconv {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The first arg-max, or -1 when any logit is NaN or infinite.
template <class T>
int32_t predict(const T* logits, int64_t classes) {
  int32_t arg = 0;
  for (int64_t j = 0; j < classes; ++j) {
    if (!std::isfinite(logits[j])) return -1;
    if (logits[j] > logits[arg]) arg = static_cast<int32_t>(j);
  }
  return arg;
}

template <class T>
ImageCertificate margin_certificate(const T* logits, int64_t classes, int32_t label, double input_lipschitz) {
  require(classes >= 2, "certificates need at least 2 classes, got ", classes);
  ImageCertificate out;
  out.predicted = predict(logits, classes);
  if (out.predicted < 0) {
    out.radius = kNaN;
    return out;
  }
  const int32_t c = out.predicted;
  double runner_up = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < classes; ++j)
    if (j != c) runner_up = std::max(runner_up, static_cast<double>(logits[j]));
  const double margin = static_cast<double>(logits[c]) - runner_up;
  out.radius = margin / (std::sqrt(2.0) * input_lipschitz);
  out.correct = c == label;
  return out;
}

}  // namespace

ImageCertificate certify_margin(const float* logits, int64_t classes, int32_t label, double input_lipschitz) {
  return margin_certificate(logits, classes, label, input_lipschitz);
}

ImageCertificate certify_margin(const double* logits, int64_t classes, int32_t label, double input_lipschitz) {
  return margin_certificate(logits, classes, label, input_lipschitz);
}

std::vector<double> lln_pair_norms(const std::vector<double>& rows, int64_t classes, int64_t features) {
  require(static_cast<int64_t>(rows.size()) == classes * features, "lln_pair_norms: expected ", classes, " x ",
          features, " rows, got ", rows.size(), " values");
  std::vector<double> norms(static_cast<size_t>(classes * classes), 0.0);
  for (int64_t i = 0; i < classes; ++i)
    for (int64_t j = i + 1; j < classes; ++j) {
      double sum = 0.0;
      for (int64_t f = 0; f < features; ++f) {
        double d = rows[static_cast<size_t>(i * features + f)] - rows[static_cast<size_t>(j * features + f)];
        sum += d * d;
      }
      norms[static_cast<size_t>(i * classes + j)] = norms[static_cast<size_t>(j * classes + i)] = std::sqrt(sum);
    }
  return norms;
}

namespace {

template <class T>
ImageCertificate lln_certificate(const T* logits, int64_t classes, int32_t label, const std::vector<double>& pair_norms,
                                 double input_lipschitz) {
  require(classes >= 2, "certificates need at least 2 classes, got ", classes);
  require(static_cast<int64_t>(pair_norms.size()) == classes * classes, "certify_lln: expected ", classes * classes,
          " pair norms, got ", pair_norms.size());
  ImageCertificate out;
  out.predicted = predict(logits, classes);
  if (out.predicted < 0) {
    out.radius = kNaN;
    return out;
  }
  const int32_t c = out.predicted;
  double radius = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < classes; ++j) {
    if (j == c) continue;
    const double diff = static_cast<double>(logits[c]) - static_cast<double>(logits[j]);
    const double norm = pair_norms[static_cast<size_t>(c * classes + j)];
    double r;
    if (norm > 0.0)
      r = diff / (norm * input_lipschitz);
    else
      r = diff > 0.0 ? std::numeric_limits<double>::infinity() : 0.0;
    radius = std::min(radius, r);
  }
  out.radius = radius;
  out.correct = c == label;
  return out;
}

}  // namespace

ImageCertificate certify_lln(const float* logits, int64_t classes, int32_t label, const std::vector<double>& pair_norms,
                             double input_lipschitz) {
  return lln_certificate(logits, classes, label, pair_norms, input_lipschitz);
}

ImageCertificate certify_lln(const double* logits, int64_t classes, int32_t label,
                             const std::vector<double>& pair_norms, double input_lipschitz) {
  return lln_certificate(logits, classes, label, pair_norms, input_lipschitz);
}

bool certified_at(const ImageCertificate& certificate, int eps_numerator) {
  if (!certificate.correct || std::isnan(certificate.radius)) return false;
  return certificate.radius > static_cast<double>(eps_numerator) / 255.0;
}

double CertifyReport::certified_accuracy(int eps) const {
  auto it = certified.find(eps);
  return (images && it != certified.end()) ? static_cast<double>(it->second) / images : 0.0;
}

void CertifyReport::add(const ImageCertificate& certificate) {
  ++images;
  if (!certificate.correct) return;
  ++correct;
  if (std::isfinite(certificate.radius)) radius_sum_correct += certificate.radius;
  for (auto& [eps, count] : certified)
    if (certified_at(certificate, eps)) ++count;
}

Certifier::Certifier(std::vector<int> eps_numerators, double input_lipschitz)
    : eps_(std::move(eps_numerators)), lipschitz_(input_lipschitz) {
  require(std::isfinite(input_lipschitz) && input_lipschitz > 0,
          "the input Lipschitz constant must be positive, "
          "got ",
          input_lipschitz);
  for (int eps : eps_) {
    require_setting(eps >= 0, {"eps"}, "{0} values must be non-negative numerators over 255, got ", eps);
    report_.certified[eps] = 0;
  }
}

void Certifier::use_lln(const std::vector<double>& rows, int64_t classes, int64_t features) {
  lln_ = true;
  pair_norms_ = lln_pair_norms(rows, classes, features);
}

void Certifier::add_batch(const float* logits, int64_t n, int64_t classes, const int32_t* labels) {
  for (int64_t i = 0; i < n; ++i) {
    const float* row = logits + i * classes;
    report_.add(lln_ ? certify_lln(row, classes, labels[i], pair_norms_, lipschitz_)
                     : certify_margin(row, classes, labels[i], lipschitz_));
  }
}

void for_each_evaluation_batch(LipConvnet& model, const CifarSplit& split, const std::vector<int64_t>& indices,
                               const Normalization& norm, int64_t batch_size,
                               const std::function<void(const Batch&, const std::vector<float>&)>& visit,
                               const std::function<bool()>& stop_requested) {
  require(batch_size > 0, "evaluation batch size must be positive, got ", batch_size);
  struct ModeGuard {  // the caller's mode comes back however the loop ends
    LipConvnet& model;
    const bool was_training;
    ~ModeGuard() { model.set_training(was_training); }
  } guard{model, model.training()};
  model.set_training(false);
  const int64_t classes = model.config().classes;
  Backend& be = model.backend();
  Batch batch;
  Tensor device_images, logits;
  std::vector<float> host_logits;
  for (size_t start = 0; start < indices.size(); start += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(indices.size(), start + static_cast<size_t>(batch_size));
    std::vector<int64_t> chunk(indices.begin() + static_cast<std::ptrdiff_t>(start),
                               indices.begin() + static_cast<std::ptrdiff_t>(end));
    make_batch(split, chunk, norm, batch);
    const Tensor* input = &batch.images;
    if (be.device() != Device::cpu) {
      device_images.resize(batch.images.shape(), be.device());
      be.from_host(batch.images.data(), device_images.data(), batch.images.numel());
      input = &device_images;
    }
    model.forward(*input, logits);
    const int64_t n = static_cast<int64_t>(chunk.size());
    host_logits.resize(static_cast<size_t>(n * classes));
    be.to_host(logits.data(), host_logits.data(), n * classes);
    visit(batch, host_logits);
    if (stop_requested && stop_requested())
      throw Interrupted("evaluation stopped on request after " + std::to_string(end) + " of " +
                        std::to_string(indices.size()) + " images");
  }
}

namespace {

// Per-image results as doubles, for gathering: predicted, correct, radius, cross-entropy.
constexpr size_t kEvaluationRecord = 4;

}  // namespace

CertifyReport evaluate_model(LipConvnet& model, const CifarSplit& split, const std::vector<int64_t>& indices,
                             const Normalization& norm, const std::vector<int>& eps_numerators, int64_t batch_size,
                             const std::function<bool()>& stop_requested, Communicator& communicator) {
  require(batch_size > 0, "evaluation batch size must be positive, got ", batch_size);
  Certifier certifier(eps_numerators, norm.lipschitz());  // checks the settings on every rank alike
  std::vector<double> pair_norms;
  const bool lln = model.lln_head() != nullptr;
  const int64_t classes = model.config().classes;
  if (lln) pair_norms = lln_pair_norms(model.lln_head()->normalized_rows(), classes, model.features());
  const double lipschitz = norm.lipschitz();
  const Range mine =
      batch_range(static_cast<int64_t>(indices.size()), batch_size, communicator.rank(), communicator.size());
  const std::vector<int64_t> shard(indices.begin() + mine.begin, indices.begin() + mine.end);
  std::vector<double> records;
  records.reserve(shard.size() * kEvaluationRecord);
  for_each_evaluation_batch(
      model, split, shard, norm, batch_size,
      [&](const Batch& batch, const std::vector<float>& host_logits) {
        const int64_t n = static_cast<int64_t>(batch.labels.size());
        for (int64_t i = 0; i < n; ++i) {
          const float* row = host_logits.data() + i * classes;
          const int32_t label = batch.labels[static_cast<size_t>(i)];
          const ImageCertificate c = lln ? certify_lln(row, classes, label, pair_norms, lipschitz)
                                         : certify_margin(row, classes, label, lipschitz);
          double top = row[0];
          for (int64_t j = 1; j < classes; ++j) top = std::max(top, static_cast<double>(row[j]));
          double sum = 0.0;
          for (int64_t j = 0; j < classes; ++j) sum += std::exp(static_cast<double>(row[j]) - top);
          records.insert(records.end(), {static_cast<double>(c.predicted), c.correct ? 1.0 : 0.0, c.radius,
                                         top + std::log(sum) - static_cast<double>(row[label])});
        }
      },
      communicator.size() == 1 ? stop_requested : std::function<bool()>());
  if (communicator.size() > 1) records = communicator.allgather(records);
  require(records.size() == indices.size() * kEvaluationRecord, "evaluate_model: gathered ", records.size(),
          " values for ", indices.size(), " images");
  // In index order, as one process adds them.
  CertifyReport report = certifier.report();
  for (size_t i = 0; i < records.size(); i += kEvaluationRecord) {
    ImageCertificate c;
    c.predicted = static_cast<int32_t>(records[i]);
    c.correct = records[i + 1] != 0.0;
    c.radius = records[i + 2];
    report.add(c);
    report.loss_sum += records[i + 3];
  }
  return report;
}

CertifyReport evaluate_model(LipConvnet& model, const CifarSplit& split, const std::vector<int64_t>& indices,
                             const Normalization& norm, const std::vector<int>& eps_numerators, int64_t batch_size,
                             const std::function<bool()>& stop_requested) {
  return evaluate_model(model, split, indices, norm, eps_numerators, batch_size, stop_requested,
                        *single_process_communicator());
}

}  // namespace orthoconv
