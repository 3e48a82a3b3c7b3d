// orthoconv certify: load a checkpoint, run it in evaluation mode on the CIFAR-100 test set and print clean
// accuracy, certified accuracy at each eps (numerators over 255), the mean certified radius of the correctly
// classified images and the image count, as a table or one JSON object. Under mpirun the test set is sharded over
// the ranks (whole batches; both passes) and rank 0 prints the report of one process (docs/distributed.md).
#include <cmath>
#include <cstdio>
#include <memory>
#include <utility>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "job.hpp"
#include "orthoconv/certify.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/network_bound.hpp"
#include "orthoconv/plot.hpp"
#include "orthoconv/runtime.hpp"

namespace orthoconv::apps {

namespace {

struct CertifyOptions {
  std::string checkpoint;
  std::string data;
  std::vector<int> eps{36, 72, 108};
  int terms = 0;  // the checkpoint's eval terms unless --terms is given
  int64_t images = 0;
  int64_t batch = 256;
  int threads = 0;
  std::string device = "cpu";
  bool json = false;
  std::string plot;  // PNG: certified accuracy against eps, nominal and verified
};

// Certified accuracy (in %) at each radius of `grid` from per-image certificates.
std::vector<double> accuracy_curve(const std::vector<ImageCertificate>& images, const std::vector<double>& grid) {
  std::vector<double> out;
  for (double eps : grid) {
    int64_t certified = 0;
    for (const auto& c : images) certified += c.correct && std::isfinite(c.radius) && c.radius > eps;
    out.push_back(images.empty() ? 0.0 : 100.0 * static_cast<double>(certified) / static_cast<double>(images.size()));
  }
  return out;
}

void write_certificate_plot(const std::string& path, const VerifiedEvaluation& v, const ModelConfig& config,
                            double lipschitz) {
  std::vector<double> grid;
  for (int i = 0; i <= 200; ++i) grid.push_back(i / 200.0);
  PlotSpec spec;
  spec.title = "Certified accuracy, " + config.conv_label() + " LipConvnet-" + std::to_string(config.depth);
  spec.x_label = "eps (l2 radius in pixel space [0,1]; 36/255 = 0.141)";
  spec.y_label = "accuracy on " + std::to_string(v.nominal.images) + " test images (%)";
  const double clean = 100.0 * v.nominal.clean_accuracy();
  spec.y_max = std::max(10.0, std::ceil(clean / 10.0) * 10.0);
  spec.y_tick = spec.y_max > 50 ? 10.0 : 5.0;
  char label[128];
  std::snprintf(label, sizeof label, "clean accuracy %.2f%%", clean);
  spec.curves.push_back({label, {0.0, 1.0}, {clean, clean}, {44, 160, 44}, true});
  spec.curves.push_back(
      {"certified, nominal (L = L_in)", grid, accuracy_curve(v.nominal_images, grid), {31, 119, 180}, false});
  std::snprintf(label, sizeof label, "certified, verified L = %.7f L_in", lipschitz);
  spec.curves.push_back({label, grid, accuracy_curve(v.lipschitz_images, grid), {214, 39, 40}, false});
  spec.curves.push_back({"certified, verified L + float64 pass (holds)",
                         grid,
                         accuracy_curve(v.verified_images, grid),
                         {148, 103, 189},
                         false});
  write_line_plot(path, spec);
}

nlohmann::ordered_json verified_json(const CertifyReport& v, const CertifyReport& l, const NetworkBound& bound,
                                     const std::vector<int>& eps, double max_deviation,
                                     std::pair<double, double> seconds) {
  nlohmann::ordered_json cert, cert_l, layers = nlohmann::json::array();
  for (int e : eps) cert[std::to_string(e)] = v.certified_accuracy(e);
  for (int e : eps) cert_l[std::to_string(e)] = l.certified_accuracy(e);
  for (const auto& layer : bound.layers)
    layers.push_back({{"name", layer.name},
                      {"input_side", layer.bound.input_side},
                      {"rho", layer.bound.rho},
                      {"bound", layer.bound.bound},
                      {"abs_norm", layer.abs_norm},
                      {"rounding", layer.rounding}});
  return {{"clean_accuracy", v.clean_accuracy()},
          {"certified_accuracy", cert},
          {"mean_radius", v.mean_radius()},
          {"certified_accuracy_lipschitz_only", cert_l},
          {"mean_radius_lipschitz_only", l.mean_radius()},
          {"lipschitz", bound.lipschitz},
          {"pass", precision_name(bound.precision)},
          {"rounding_per_input_norm", bound.error_per_input_norm},
          {"rounding_constant", bound.error_constant},
          {"max_float32_logit_deviation", max_deviation},
          {"seconds_float32_pass", seconds.first},
          {"seconds_float64_pass", seconds.second},
          {"layers", layers}};
}

int run_certify(const CertifyOptions& o, bool terms_given) {
  const std::shared_ptr<Communicator> job = join_job(o.threads);
  use_local_gpu(*job, parse_device(o.device));
  require(!o.eps.empty(), "--eps needs at least one value");
  for (int e : o.eps) require(e >= 0, "--eps values must be non-negative numerators over 255, got ", e);
  require(!terms_given || (o.terms > 0 && o.terms <= kMaxSeriesTerms), "--terms must be in 1..", kMaxSeriesTerms,
          ", got ", o.terms);
  require(o.images >= 0, "--images must be >= 0, got ", o.images);
  require(o.batch > 0, "--batch must be positive, got ", o.batch);
  set_thread_count(o.threads);
  // Outputs are checked before the long work, so that a bad path fails at once rather than after it.
  if (!o.plot.empty() && job->root()) check_writable_file(o.plot, "plot");
  const LoadedModel loaded =
      load_model(o.checkpoint, parse_device(o.device), terms_given ? std::optional<int>(o.terms) : std::nullopt);
  LipConvnet& model = *loaded.model;
  const ModelConfig& config = model.config();
  const Normalization& norm = loaded.normalization;
  // What surely gets allocated: the weights (bounded by load_model's validation), and the block outputs of one
  // evaluation batch, checked before any batch runs.
  const ModelConfig::Sizes sizes = config.sizes();
  const int64_t batch = std::min(o.batch, o.images > 0 ? std::min(o.images, kCifarTestRecords) : kCifarTestRecords);
  require_memory(4.0 * (sizes.weights + static_cast<double>(batch) * sizes.activations),
                 "certifying " + config.architecture() + " in batches of " + std::to_string(batch) + " (--batch)");

  const std::string dir = find_cifar100(o.data);
  CifarSplit test = load_cifar100(dir, "test");
  const int64_t count = o.images > 0 ? std::min(o.images, test.size()) : test.size();
  std::vector<int64_t> indices(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) indices[static_cast<size_t>(i)] = i;
  const NetworkBound bound = verify_network(model, Precision::float64, norm);
  // Under mpirun: each rank runs its share of the batches, every rank gets the one-process evaluation.
  const VerifiedEvaluation evaluation = evaluate_verified(model, bound, test, indices, norm, o.eps, o.batch, *job);
  double max_deviation = 0.0;
  for (double d : evaluation.logit_deviation)
    if (!(d <= max_deviation)) max_deviation = d;  // a NaN wins, and is refused below
  // With every loaded value finite and bounded (read_model_state) these hold; a report built on anything else
  // would be a certificate of nothing.
  require<Error>(std::isfinite(bound.lipschitz) && std::isfinite(bound.error_per_input_norm) &&
                     std::isfinite(bound.error_constant) && std::isfinite(max_deviation),
                 "checkpoint ", o.checkpoint,
                 ": the verified bound or the float64 pass is not finite (L = ", bound.lipschitz,
                 ", largest logit difference ", max_deviation, "): no certificate can be given");
  const CertifyReport& r = evaluation.nominal;
  const CertifyReport& v = evaluation.verified;
  const CertifyReport& l = evaluation.lipschitz;
  // The results are printed (and flushed) before the plot is written: a late failure must not lose them.
  if (!job->root()) return 0;  // rank 0 reports for the job

  if (o.json) {
    nlohmann::ordered_json cert;
    for (int e : o.eps) cert[std::to_string(e)] = r.certified_accuracy(e);
    nlohmann::ordered_json out{{"clean_accuracy", r.clean_accuracy()},
                               {"certified_accuracy", cert},
                               {"mean_radius", r.mean_radius()},
                               {"images", r.images},
                               {"verified", verified_json(v, l, bound, o.eps, max_deviation,
                                                          {evaluation.float32_seconds, evaluation.float64_seconds})},
                               {"architecture", config.architecture()},
                               {"eval_terms", config.eval_terms},
                               {"lipschitz_input", norm.lipschitz()}};
    std::printf("%s\n", out.dump().c_str());
    std::fflush(stdout);
    if (!o.plot.empty()) write_certificate_plot(o.plot, evaluation, config, bound.lipschitz);
    return 0;
  }
  std::printf("checkpoint   %s\n", o.checkpoint.c_str());
  std::printf("model        %s (evaluation mode, %d series terms)\n", config.architecture().c_str(), config.eval_terms);
  std::printf("images       %lld (CIFAR-100 test)\n", static_cast<long long>(r.images));
  std::printf(
      "verified     L = %.9f (product of %zu SocConv bounds); float64 pass rounding of the %s "
      "<= %.3e ||x|| + %.3e\n",
      bound.lipschitz, bound.layers.size(), bound.lln ? "head input" : "logits", bound.error_per_input_norm,
      bound.error_constant);
  std::printf("passes       float32 %.1f s, float64 %.1f s; largest |float32 - float64| logit difference %.3e\n",
              evaluation.float32_seconds, evaluation.float64_seconds, max_deviation);
  std::printf("+-----------------------+-----------+-------------+---------------+\n");
  std::printf("| %-21s | %9s | %11s | %13s |\n", "metric", "nominal", "verified L", "L + float64");
  std::printf("+-----------------------+-----------+-------------+---------------+\n");
  std::printf("| %-21s | %8.2f%% | %10.2f%% | %12.2f%% |\n", "clean accuracy", 100.0 * r.clean_accuracy(),
              100.0 * l.clean_accuracy(), 100.0 * v.clean_accuracy());
  for (int e : o.eps) {
    char name[64];
    std::snprintf(name, sizeof(name), "certified @ %d/255", e);
    std::printf("| %-21s | %8.2f%% | %10.2f%% | %12.2f%% |\n", name, 100.0 * r.certified_accuracy(e),
                100.0 * l.certified_accuracy(e), 100.0 * v.certified_accuracy(e));
  }
  std::printf("| %-21s | %9.4f | %11.4f | %13.4f |\n", "mean radius (correct)", r.mean_radius(), l.mean_radius(),
              v.mean_radius());
  std::printf("+-----------------------+-----------+-------------+---------------+\n");
  std::printf(
      "nominal: the reference's certificate (float32 logits, every layer taken as exactly 1-Lipschitz);\n"
      "verified L: float32 logits, radii divided by the verified Lipschitz bound (truncation, sigma);\n"
      "L + float64: the certificate that holds, from a float64 pass with its rounding bound (docs/certificates.md)\n");
  std::fflush(stdout);
  if (!o.plot.empty()) {
    write_certificate_plot(o.plot, evaluation, config, bound.lipschitz);
    std::printf("plot         %s\n", o.plot.c_str());
  }
  return 0;
}

Runner setup_certify(CLI::App& app) {
  auto o = std::make_shared<CertifyOptions>();
  auto* cmd = app.add_subcommand("certify", "Certified robust accuracy of a checkpoint on the CIFAR-100 test set");
  cmd->add_option("--checkpoint", o->checkpoint, "a .safetensors checkpoint from `orthoconv train`")->required();
  cmd->add_option("--data", o->data, "CIFAR-100 binary directory (default: search, as `train`)");
  cmd->add_option("--eps", o->eps, "radii as numerators over 255")->delimiter(',')->capture_default_str();
  auto* terms = cmd->add_option("--terms", o->terms, "series terms (default: the checkpoint's evaluation terms, 12)");
  cmd->add_option("--images", o->images, "certify the first N test images (0: all)")->capture_default_str();
  cmd->add_option("--batch", o->batch, "evaluation batch size")->capture_default_str();
  cmd->add_option("--threads", o->threads, "OpenMP threads (0: default)")->capture_default_str();
  cmd->add_option("--device", o->device, "cpu | cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->add_option("--plot", o->plot, "write a PNG of certified accuracy against eps (nominal and verified)");
  return [o, terms] { return run_certify(*o, terms->count() > 0); };
}

}  // namespace

static const bool registered = register_command("certify", setup_certify);

}  // namespace orthoconv::apps
