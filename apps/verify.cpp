// orthoconv verify: build a random SOC or GS-SOC layer, form its Jacobian on a C x H x H input in evaluation
// mode, and print its largest and smallest singular values, the skew residual ||A + A^T|| / ||A|| of every
// series filter, and the scale sigma.
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/network_bound.hpp"
#include "orthoconv/orthoconv.hpp"

namespace orthoconv::apps {

namespace {

struct VerifyOptions {
  std::string layer = "gs-soc";
  int64_t channels = 16;
  int64_t out_channels = 0;
  int64_t size = 8;
  int64_t kernel = 3;
  std::string groups;  // default: default_groups(layer)
  int64_t stride = 1;
  int terms = 12;
  uint64_t seed = 1;
  bool json = false;
  std::string checkpoint;  // when set: the per-layer verified bounds of a trained model
};

// `verify --checkpoint F`: the verified bound of every SocConv of a trained LipConvnet (bounds.hpp,
// network_bound.hpp): rho >= ||A_n||, the layer bound 1 + sum_{i>K} rho^i/i!, the rounding coefficients of a
// float32 and of the float64 (certifying) pass, and the network's L.
int run_verify_checkpoint(const VerifyOptions& o, bool terms_given) {
  const LoadedModel loaded =
      load_model(o.checkpoint, Device::cpu, terms_given ? std::optional<int>(o.terms) : std::nullopt);
  LipConvnet& model = *loaded.model;
  const ModelConfig& config = model.config();
  const Normalization& norm = loaded.normalization;
  const NetworkBound b32 = verify_network(model, Precision::float32, norm);
  const NetworkBound b64 = verify_network(model, Precision::float64, norm);
  if (o.json) {
    nlohmann::ordered_json layers = nlohmann::json::array();
    for (size_t i = 0; i < b32.layers.size(); ++i) {
      const NamedLayerBound& l = b32.layers[i];
      layers.push_back({{"name", l.name},
                        {"description", l.bound.description},
                        {"input_side", l.bound.input_side},
                        {"terms", l.bound.terms},
                        {"rho", l.bound.rho},
                        {"bound", l.bound.bound},
                        {"abs_norm", l.abs_norm},
                        {"rounding_float32", l.rounding},
                        {"rounding_float64", b64.layers[i].rounding}});
    }
    auto rounding = [](const NetworkBound& b) {
      return nlohmann::ordered_json{{"per_input_norm", b.error_per_input_norm}, {"constant", b.error_constant}};
    };
    nlohmann::ordered_json out{
        {"checkpoint", o.checkpoint},        {"architecture", config.architecture()}, {"terms", config.eval_terms},
        {"lipschitz", b32.lipschitz},        {"lipschitz_input", norm.lipschitz()},   {"lln_head", b32.lln},
        {"rounding_float32", rounding(b32)}, {"rounding_float64", rounding(b64)},     {"layers", layers}};
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("checkpoint %s\nmodel      %s (evaluation mode, %d series terms)\n", o.checkpoint.c_str(),
              config.architecture().c_str(), config.eval_terms);
  std::printf("%-28s %5s %12s %14s %12s %13s %13s\n", "layer", "side", "rho>=|A_n|", "bound", "|abs A_n|",
              "rounding f32", "rounding f64");
  for (size_t i = 0; i < b32.layers.size(); ++i) {
    const NamedLayerBound& l = b32.layers[i];
    std::printf("%-28s %5lld %12.6f %14.10f %12.6f %13.3e %13.3e\n", l.name.c_str(),
                static_cast<long long>(l.bound.input_side), l.bound.rho, l.bound.bound, l.abs_norm, l.rounding,
                b64.layers[i].rounding);
  }
  std::printf("network L (product of layer bounds%s) = %.10f\n", b32.lln ? ", lln head by pair norms" : "",
              b32.lipschitz);
  std::printf("input normalization L_in = %.6f\n", norm.lipschitz());
  for (const NetworkBound* b : {&b32, &b64})
    std::printf("%s rounding of the %s: <= %.3e * ||x|| + %.3e%s\n", precision_name(b->precision),
                b->lln ? "head input" : "logits", b->error_per_input_norm, b->error_constant,
                b->precision == Precision::float64 ? " (the certifying pass)" : "");
  return 0;
}

int run_verify(const VerifyOptions& o) {
  require(o.layer == "soc" || o.layer == "gs-soc", "--layer must be soc or gs-soc, got '", o.layer, "'");
  const ConvKind kind = parse_conv_kind(o.layer);
  const GroupCounts groups = o.groups.empty() ? default_groups(kind) : GroupCounts::parse(o.groups);
  // A dense Jacobian of C H^2 rows: each size checked alone before any product.
  constexpr int64_t kMaxJacobianSide = 16384;
  require(o.channels > 0 && o.channels <= kMaxJacobianSide, "--channels must be in 1..", kMaxJacobianSide, ", got ",
          o.channels);
  require(o.size > 0 && o.size <= kMaxJacobianSide, "--size must be in 1..", kMaxJacobianSide, ", got ", o.size);
  require(o.out_channels >= 0 && o.out_channels <= kMaxJacobianSide, "--out-channels must be in 0..", kMaxJacobianSide,
          " (0: C * stride), got ", o.out_channels);
  require(o.kernel > 0 && o.kernel <= 2 * o.size + 1, "--kernel must be in 1..", 2 * o.size + 1,
          " (2 * --size + 1), got ", o.kernel);
  require(o.terms > 0 && o.terms <= kMaxSeriesTerms, "--terms must be in 1..", kMaxSeriesTerms, ", got ", o.terms);
  SocConfig base;
  base.in_channels = o.channels;
  base.out_channels = o.out_channels > 0 ? o.out_channels : o.channels * o.stride;
  base.kernel = o.kernel;
  base.stride = o.stride;
  base.eval_terms = o.terms;
  base.seed = o.seed;
  require(o.channels * o.size * o.size <= kMaxJacobianSide, "--channels * --size^2 must be at most ", kMaxJacobianSide,
          " for a dense Jacobian, got ", o.channels * o.size * o.size);

  std::unique_ptr<Layer> layer;
  std::vector<SocConv*> socs;
  if (kind == ConvKind::soc) {
    require(!groups.second, "--layer soc takes one group count, got '", o.groups, "'");
    base.groups = groups.first;
    auto soc = std::make_unique<SocConv>(base);
    socs.push_back(soc.get());
    layer = std::move(soc);
  } else {
    GsSocConfig config;
    config.base = base;
    config.groups = groups;
    auto gs = std::make_unique<GsSocConv>(config);
    socs.push_back(&gs->first());
    if (gs->second()) socs.push_back(gs->second());
    layer = std::move(gs);
  }
  layer->set_training(false);
  Shape input{1, o.channels, o.size, o.size};
  auto sv = singular_values(layer_jacobian(*layer, input));

  double residual = 0.0, sigma = 0.0;
  for (SocConv* soc : socs) {
    const auto& c = soc->config();
    const int64_t h = o.size / c.stride;
    auto op = conv_operator_matrix(soc->skew_filter().to_vector(), c.groups, c.group_channels(), c.kernel, h, h);
    residual = std::max(residual, skew_residual(op));
  }
  sigma = socs.front()->sigma().front();

  if (o.json) {
    nlohmann::json out{{"layer", o.layer},
                       {"description", layer->describe()},
                       {"max_singular_value", sv.front()},
                       {"min_singular_value", sv.back()},
                       {"skew_residual", residual},
                       {"sigma", sigma},
                       {"sigma_per_layer", nlohmann::json::array()}};
    for (SocConv* soc : socs) out["sigma_per_layer"].push_back(soc->sigma());
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("layer              %s\n", layer->describe().c_str());
    std::printf("input              [%lld, %lld, %lld] (evaluation mode, %d terms)\n", (long long)o.channels,
                (long long)o.size, (long long)o.size, o.terms);
    std::printf("max singular value %.9f\n", sv.front());
    std::printf("min singular value %.9f\n", sv.back());
    std::printf("skew residual      %.3e   (||A + A^T||_max / ||A||_max, 0 = exactly skew)\n", residual);
    std::printf("sigma (group 0)    %.6f\n", sigma);
  }
  return 0;
}

}  // namespace

namespace {
Runner setup_verify(CLI::App& app) {
  auto o = std::make_shared<VerifyOptions>();
  auto* cmd =
      app.add_subcommand("verify", "Check that a random SOC / GS-SOC layer is orthogonal (Jacobian singular values)");
  cmd->add_option("--layer", o->layer, "soc or gs-soc")->capture_default_str();
  cmd->add_option("--channels", o->channels, "input channels C")->capture_default_str();
  cmd->add_option("--out-channels", o->out_channels, "output channels (default C * stride)");
  cmd->add_option("--size", o->size, "input height = width H")->capture_default_str();
  cmd->add_option("--kernel", o->kernel, "kernel size k (odd)")->capture_default_str();
  cmd->add_option("--groups", o->groups, "groups: 'a' for soc (default 1); 'a,b' or 'a,-' for gs-soc (default 4,1)");
  cmd->add_option("--stride", o->stride, "stride (1 or 2)")->capture_default_str();
  cmd->add_option("--terms", o->terms, "series terms in evaluation mode")->capture_default_str();
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_flag("--json", o->json, "print one JSON object");
  auto* terms_option = cmd->get_option("--terms");
  cmd->add_option("--checkpoint", o->checkpoint,
                  "verify a trained model instead: per-layer verified bounds (the layer flags are then unused)");
  return [o, terms_option] {
    if (!o->checkpoint.empty()) return run_verify_checkpoint(*o, terms_option->count() > 0);
    return run_verify(*o);
  };
}

}  // namespace

static const bool registered = register_command("verify", setup_verify);

}  // namespace orthoconv::apps
