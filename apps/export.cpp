// orthoconv export: a checkpoint as an ONNX model (--onnx, include/orthoconv/onnx_export.hpp) and/or one VNN-LIB
// robustness property per CIFAR-100 test image (--vnnlib, include/orthoconv/vnnlib.hpp), so that other runtimes
// and independent verifiers can run and check it. Every file is written atomically; a bad checkpoint or setting is
// one error line before anything is written.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "orthoconv/certify.hpp"
#include "orthoconv/checkpoint.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/network_bound.hpp"
#include "orthoconv/onnx_export.hpp"
#include "orthoconv/vnnlib.hpp"

namespace orthoconv::apps {

namespace {

struct ExportOptions {
  std::string checkpoint;
  std::string onnx;    // the ONNX model to write
  std::string vnnlib;  // the directory of VNN-LIB properties
  std::string data;
  int terms = 0;        // the checkpoint's evaluation terms unless --terms is given
  int64_t images = 10;  // --vnnlib: the first N test images
  int eps = 36;         // --vnnlib: l2 radius numerator over 255
  bool json = false;
};

namespace fs = std::filesystem;

// The properties of the first `count` test images, each with orthoconv's own verified certificate (the float64
// pass, as `orthoconv certify`) in its comments, and properties.csv listing them. Returns the certified count.
int64_t write_properties(const ExportOptions& o, LipConvnet& model, const Normalization& norm, int64_t& written) {
  const ModelConfig& config = model.config();
  const CifarSplit test = load_cifar100(find_cifar100(o.data), "test");
  const int64_t count = std::min(o.images, test.size());
  std::vector<int64_t> indices(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) indices[static_cast<size_t>(i)] = i;
  const NetworkBound bound = verify_network(model, config.eval_terms, Precision::float64, norm);
  const VerifiedEvaluation evaluation = evaluate_verified(model, bound, test, indices, norm, {o.eps}, 256);
  const double h = vnnlib_box_half_width(o.eps, config.input_side);
  std::string listing = "file,image,label,orthoconv_predicted,orthoconv_verified_radius,orthoconv_certified\n";
  int64_t certified = 0;
  for (int64_t i = 0; i < count; ++i) {
    const ImageCertificate& c = evaluation.verified_images[static_cast<size_t>(i)];
    const int32_t label = test.fine_labels[static_cast<size_t>(i)];
    const bool holds = certified_at(c, o.eps);
    certified += holds;
    char radius[64], box[64];
    std::snprintf(radius, sizeof radius, "%.9g", c.radius);
    std::snprintf(box, sizeof box, "%.17g", h);
    const std::string file = "cifar100_test_" + std::to_string(i) + "_eps" + std::to_string(o.eps) + ".vnnlib";
    const std::vector<std::string> comments{
        "orthoconv export --vnnlib: CIFAR-100 test image " + std::to_string(i) + ", label " + std::to_string(label) +
            ", model " + config.architecture() + " (" + std::to_string(config.eval_terms) + " series terms)",
        "inputs X_k: the ONNX model's pixels in [0, 1] (C, H, W order); outputs Y_j: its logits",
        "the l2 ball of radius " + std::to_string(o.eps) +
            "/255 is not expressible in VNN-LIB: this is the "
            "l-infinity box of half-width (" +
            std::to_string(o.eps) + "/255)/sqrt(3*" + std::to_string(config.input_side) + "*" +
            std::to_string(config.input_side) + ") = " + box + " (less 1e-12), which lies inside that ball",
        "the box is not clipped to [0, 1]; a certificate at this radius implies the property, not conversely",
        std::string("orthoconv's verified certificate (float64 pass): predicted ") + std::to_string(c.predicted) +
            ", radius " + radius + (holds ? ": certified" : ": NOT certified") + " at " + std::to_string(o.eps) +
            "/255"};
    write_file_atomically((fs::path(o.vnnlib) / file).string(),
                          vnnlib_property(test.pixels.data() + i * kCifarPixels, config.input_side, label,
                                          config.classes, o.eps, comments));
    listing += file + "," + std::to_string(i) + "," + std::to_string(label) + "," + std::to_string(c.predicted) + "," +
               radius + "," + (holds ? "1" : "0") + "\n";
    ++written;
  }
  write_file_atomically((fs::path(o.vnnlib) / "properties.csv").string(), listing);
  return certified;
}

int run_export(const ExportOptions& o, bool terms_given) {
  require(!o.onnx.empty() || !o.vnnlib.empty(), "give --onnx FILE and/or --vnnlib DIR");
  require(!terms_given || (o.terms > 0 && o.terms <= kMaxSeriesTerms), "--terms must be in 1..", kMaxSeriesTerms,
          ", got ", o.terms);
  require(o.images > 0, "--images must be positive, got ", o.images);
  require(o.eps > 0 && o.eps <= 255 * 64, "--eps must be a numerator over 255 in 1..", 255 * 64, ", got ", o.eps);
  // Everything that can be checked is checked before the model is loaded and before anything is written.
  if (!o.onnx.empty()) {
    require<Error>(onnx_export_available(),
                   "--onnx: this orthoconv was built without ONNX export (install libonnx-dev and libprotobuf-dev: "
                   "scripts/install-deps.sh, then configure again)");
    check_writable_file(o.onnx, "ONNX model");
  }
  if (!o.vnnlib.empty()) {
    std::error_code ec;
    fs::create_directories(o.vnnlib, ec);
    if (ec || !fs::is_directory(o.vnnlib))
      throw IoError("cannot write VNN-LIB properties to " + o.vnnlib + ": " +
                    (ec ? ec.message() : std::string("not a directory")));
    check_writable_file((fs::path(o.vnnlib) / "properties.csv").string(), "VNN-LIB properties");
  }
  const LoadedModel loaded = load_model(o.checkpoint);
  LipConvnet& model = *loaded.model;
  if (terms_given) model.set_terms(model.config().train_terms, o.terms);
  const ModelConfig& config = model.config();
  nlohmann::ordered_json out{
      {"checkpoint", o.checkpoint}, {"architecture", config.architecture()}, {"terms", config.eval_terms}};
  if (!o.json) {
    std::printf("checkpoint  %s\nmodel       %s (evaluation mode, %d series terms)\n", o.checkpoint.c_str(),
                config.architecture().c_str(), config.eval_terms);
    std::fflush(stdout);
  }
  if (!o.onnx.empty()) {
    const OnnxExportSummary s = export_onnx(model, loaded.normalization, o.onnx, config.eval_terms);
    nlohmann::ordered_json metadata;
    for (const auto& [key, value] : s.metadata) metadata[key] = value;
    out["onnx"] = {{"file", o.onnx},       {"opset", s.opset}, {"nodes", s.nodes},
                   {"weights", s.weights}, {"bytes", s.bytes}, {"metadata", metadata}};
    if (!o.json) {
      std::printf("onnx        %s: opset %d, %lld nodes, %lld weights, %.1f MiB\n", o.onnx.c_str(), s.opset,
                  static_cast<long long>(s.nodes), static_cast<long long>(s.weights),
                  static_cast<double>(s.bytes) / (1 << 20));
      std::printf(
          "verified    L = %.9f, L_in = %.9f; float32 rounding of the %s <= %.3e ||x0|| + %.3e "
          "(metadata orthoconv.*)\n",
          s.bound.lipschitz, loaded.normalization.lipschitz(), s.bound.lln ? "head input" : "logits",
          s.bound.error_per_input_norm, s.bound.error_constant);
      std::fflush(stdout);
    }
  }
  if (!o.vnnlib.empty()) {
    int64_t written = 0;
    const int64_t certified = write_properties(o, model, loaded.normalization, written);
    out["vnnlib"] = {{"directory", o.vnnlib},
                     {"properties", written},
                     {"eps", o.eps},
                     {"box_half_width", vnnlib_box_half_width(o.eps, config.input_side)},
                     {"orthoconv_certified", certified}};
    if (!o.json)
      std::printf(
          "vnnlib      %s: %lld properties (l-infinity box of half-width %.6g inside the l2 ball of radius "
          "%d/255), %lld certified by orthoconv; list in properties.csv\n",
          o.vnnlib.c_str(), static_cast<long long>(written), vnnlib_box_half_width(o.eps, config.input_side), o.eps,
          static_cast<long long>(certified));
  }
  if (o.json) std::printf("%s\n", out.dump().c_str());
  return 0;
}

Runner setup_export(CLI::App& app) {
  auto o = std::make_shared<ExportOptions>();
  auto* cmd = app.add_subcommand(
      "export", "Write a checkpoint as an ONNX model and/or VNN-LIB properties of test images for external verifiers");
  cmd->add_option("--checkpoint", o->checkpoint, "a .safetensors checkpoint from `orthoconv train`")->required();
  cmd->add_option("--onnx", o->onnx, "write the evaluation-mode network as this ONNX model (opset 17)");
  auto* terms = cmd->add_option("--terms", o->terms, "series terms (default: the checkpoint's evaluation terms, 12)");
  cmd->add_option("--vnnlib", o->vnnlib, "write one VNN-LIB property per test image into this directory");
  cmd->add_option("--images", o->images, "--vnnlib: the first N CIFAR-100 test images")->capture_default_str();
  cmd->add_option("--eps", o->eps, "--vnnlib: l2 radius as a numerator over 255 (the box is eps/sqrt(3*32*32))")
      ->capture_default_str();
  cmd->add_option("--data", o->data, "CIFAR-100 binary directory (default: search, as `train`)");
  cmd->add_flag("--json", o->json, "print one JSON object");
  return [o, terms] { return run_export(*o, terms->count() > 0); };
}

}  // namespace

static const bool registered = register_command("export", setup_export);

}  // namespace orthoconv::apps
