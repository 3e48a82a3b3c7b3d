// orthoconv model-info: the LipConvnet-N layer table and its trainable parameter count (power-iteration
// vectors excluded), as a table or one JSON object.
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "model_options.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv::apps {

namespace {

struct ModelInfoOptions {
  ModelFlags model;
  bool json = false;
};

int run_model_info(const ModelInfoOptions& o) {
  ModelConfig config = o.model.config();
  config.init_iterations = 0;  // shapes only
  LipConvnet model(config);
  auto rows = model.layer_table();
  const int64_t total = model.parameter_count();
  if (o.json) {
    nlohmann::ordered_json out;
    out["model"] = "LipConvnet-" + std::to_string(config.depth);
    out["conv"] = config.conv_label();
    out["architecture"] = config.architecture();
    out["parameters"] = total;
    out["layers"] = nlohmann::json::array();
    for (const LayerRow& r : rows)
      out["layers"].push_back(nlohmann::ordered_json{{"name", r.name},
                                                     {"description", r.description},
                                                     {"input", r.input.dims()},
                                                     {"output", r.output.dims()},
                                                     {"parameters", r.parameters}});
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("LipConvnet-%lld  %s  (%s)\n", static_cast<long long>(config.depth), config.conv_label().c_str(),
              config.architecture().c_str());
  std::printf("%-14s %-20s %-20s %12s  %s\n", "layer", "input", "output", "parameters", "description");
  for (const LayerRow& r : rows)
    std::printf("%-14s %-20s %-20s %12lld  %s\n", r.name.c_str(), r.input.str().c_str(), r.output.str().c_str(),
                static_cast<long long>(r.parameters), r.description.c_str());
  std::printf("trainable parameters: %lld (%.2fM; power-iteration vectors excluded)\n", static_cast<long long>(total),
              static_cast<double>(total) / 1e6);
  return 0;
}

Runner setup_model_info(CLI::App& app) {
  auto o = std::make_shared<ModelInfoOptions>();
  auto* cmd = app.add_subcommand("model-info", "Print the LipConvnet layer table and its parameter count");
  add_model_flags(*cmd, o->model);
  cmd->add_flag("--json", o->json, "print one JSON object");
  return [o] { return run_model_info(*o); };
}

}  // namespace

static const bool registered = register_command("model-info", setup_model_info);

}  // namespace orthoconv::apps
