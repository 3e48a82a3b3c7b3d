// orthoconv attack: cross-check certificates with L2 attacks (PGD with restarts, DDN minimum norm) on test images.
// Every image certified at eps must survive PGD at eps, and DDN's smallest adversarial norm must exceed every
// certified radius. A violation is a bug in the certificate: reported loudly, exit status 3.
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "orthoconv/attack.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/network_bound.hpp"
#include "orthoconv/runtime.hpp"

namespace orthoconv::apps {

namespace {

struct AttackCommandOptions {
  std::string checkpoint, data;
  int eps = 36;
  int steps = 100;
  int restarts = 3;
  int64_t images = 1000;
  int64_t batch = 128;
  int terms = 0;
  int threads = 0;
  uint64_t seed = 0;
  bool json = false;
};

int run_attack(const AttackCommandOptions& o, bool terms_given) {
  require(o.eps > 0, "--eps must be a positive numerator over 255, got ", o.eps);
  require(o.images > 0, "--images must be positive, got ", o.images);
  require(o.steps > 0, "--steps must be positive, got ", o.steps);
  require(!terms_given || (o.terms > 0 && o.terms <= kMaxSeriesTerms), "--terms must be in 1..", kMaxSeriesTerms,
          ", got ", o.terms);
  set_thread_count(o.threads);
  const LoadedModel loaded =
      load_model(o.checkpoint, Device::cpu, terms_given ? std::optional<int>(o.terms) : std::nullopt);
  LipConvnet& model = *loaded.model;
  const Normalization& norm = loaded.normalization;

  CifarSplit test = load_cifar100(find_cifar100(o.data), "test");
  const int64_t count = std::min(o.images, test.size());
  std::vector<int64_t> indices(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) indices[static_cast<size_t>(i)] = i;

  const NetworkBound bound = verify_network(model, Precision::float64, norm);
  const VerifiedEvaluation certs = evaluate_verified(model, bound, test, indices, norm, {o.eps});
  AttackOptions options;
  options.steps = o.steps;
  options.restarts = o.restarts;
  options.seed = o.seed;
  options.batch_size = o.batch;
  const double eps = o.eps / 255.0;
  const AttackResult attack = attack_model(model, norm, test, indices, eps, options);

  int64_t clean = 0, robust = 0, nominal_certified = 0, verified_certified = 0, violations = 0;
  nlohmann::ordered_json violation_list = nlohmann::json::array();
  for (int64_t i = 0; i < count; ++i) {
    const size_t k = static_cast<size_t>(i);
    clean += attack.clean_correct[k];
    robust += attack.clean_correct[k] && !attack.pgd_success[k];
    const bool nominal = certified_at(certs.nominal_images[k], o.eps);
    const bool verified = certified_at(certs.verified_images[k], o.eps);
    nominal_certified += nominal;
    verified_certified += verified;
    auto check = [&](const char* which, const ImageCertificate& c, bool certified) {
      if (!c.correct) return;
      const bool pgd_broke = certified && attack.pgd_success[k];
      const bool ddn_inside = attack.min_norm[k] <= c.radius;
      if (!pgd_broke && !ddn_inside) return;
      ++violations;
      violation_list.push_back({{"image", indices[k]},
                                {"certificate", which},
                                {"radius", c.radius},
                                {"pgd_norm", attack.pgd_success[k] ? attack.pgd_norm[k] : -1.0},
                                {"ddn_min_norm", std::isfinite(attack.min_norm[k]) ? attack.min_norm[k] : -1.0}});
      std::fprintf(stderr,
                   "CERTIFICATE VIOLATION: test image %lld, %s certificate radius %.6f, but %s found an "
                   "adversarial example at norm %.6f\n",
                   static_cast<long long>(indices[k]), which, c.radius, pgd_broke ? "PGD" : "DDN",
                   pgd_broke ? attack.pgd_norm[k] : attack.min_norm[k]);
    };
    check("nominal", certs.nominal_images[k], nominal);
    check("verified", certs.verified_images[k], verified);
  }
  double min_gap = INFINITY;  // smallest (DDN norm - verified radius) over certified images
  for (int64_t i = 0; i < count; ++i) {
    const auto& c = certs.verified_images[static_cast<size_t>(i)];
    if (c.correct && c.radius > 0 && std::isfinite(attack.min_norm[static_cast<size_t>(i)]))
      min_gap = std::min(min_gap, attack.min_norm[static_cast<size_t>(i)] - c.radius);
  }
  auto pct = [&](int64_t v) { return 100.0 * static_cast<double>(v) / static_cast<double>(count); };
  if (o.json) {
    nlohmann::ordered_json out{{"images", count},
                               {"eps", o.eps},
                               {"steps", o.steps},
                               {"restarts", o.restarts},
                               {"clean_accuracy", pct(clean) / 100.0},
                               {"empirical_robust_accuracy", pct(robust) / 100.0},
                               {"certified_accuracy_nominal", pct(nominal_certified) / 100.0},
                               {"certified_accuracy_verified", pct(verified_certified) / 100.0},
                               {"lipschitz_verified", bound.lipschitz},
                               {"min_gap_ddn_minus_radius", std::isfinite(min_gap) ? min_gap : -1.0},
                               {"violations", violations},
                               {"violation_list", violation_list}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("attack check on %lld CIFAR-100 test images, eps = %d/255 (pixel-space l2 %.4f)\n",
                static_cast<long long>(count), o.eps, eps);
    std::printf("  PGD: %d steps x %d restarts (margin loss); DDN: %d steps (minimum norm)\n", o.steps, o.restarts,
                o.steps);
    std::printf("  clean accuracy                 %7.2f%%\n", pct(clean));
    std::printf("  empirical robust accuracy (PGD) %6.2f%%\n", pct(robust));
    std::printf("  certified accuracy (nominal)   %7.2f%%\n", pct(nominal_certified));
    std::printf("  certified accuracy (verified)  %7.2f%%   (float64 pass, L = %.9f: the certificate that holds)\n",
                pct(verified_certified), bound.lipschitz);
    if (std::isfinite(min_gap))
      std::printf("  smallest DDN norm - verified radius over certified images: %.6f\n", min_gap);
    std::printf("  violations                     %lld\n", static_cast<long long>(violations));
  }
  if (violations > 0) {
    std::fprintf(stderr, "orthoconv attack: %lld certificate violation(s): this is a bug in the certificates\n",
                 static_cast<long long>(violations));
    return 3;
  }
  return 0;
}

Runner setup_attack(CLI::App& app) {
  auto o = std::make_shared<AttackCommandOptions>();
  auto* cmd = app.add_subcommand("attack", "Cross-check certificates with L2 attacks (PGD, DDN) on test images");
  cmd->add_option("--checkpoint", o->checkpoint, "a .safetensors checkpoint from `orthoconv train`")->required();
  cmd->add_option("--data", o->data, "CIFAR-100 binary directory (default: search)");
  cmd->add_option("--eps", o->eps, "radius as a numerator over 255")->capture_default_str();
  cmd->add_option("--steps", o->steps, "attack steps (PGD per restart, and DDN)")->capture_default_str();
  cmd->add_option("--restarts", o->restarts, "PGD restarts")->capture_default_str();
  cmd->add_option("--images", o->images, "the first N test images")->capture_default_str();
  cmd->add_option("--batch", o->batch, "attack batch size")->capture_default_str();
  auto* terms = cmd->add_option("--terms", o->terms, "series terms (default: the checkpoint's evaluation terms)");
  cmd->add_option("--threads", o->threads, "OpenMP threads (0: default)")->capture_default_str();
  cmd->add_option("--seed", o->seed, "random seed of the restarts")->capture_default_str();
  cmd->add_flag("--json", o->json, "print one JSON object");
  return [o, terms] { return run_attack(*o, terms->count() > 0); };
}

}  // namespace

static const bool registered = register_command("attack", setup_attack);

}  // namespace orthoconv::apps
