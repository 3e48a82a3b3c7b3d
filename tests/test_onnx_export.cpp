// `orthoconv export`: the ONNX model run by ONNX Runtime (tests/onnx_runtime_check.py, with the Python of
// ORTHOCONV_PYTHON: onnx + onnxruntime from scripts/requirements.txt) gives orthoconv's float32 logits on 256 real
// CIFAR-100 test images, and ONNX's checker accepts the file; bad checkpoints and settings are one error line and no
// file; the VNN-LIB properties describe a box inside the l2 ball.
//
// Tolerances, per image, both from float32 arithmetic. Both orthoconv's float32 forward and the exported graph (as
// ONNX Runtime's CPU provider evaluates it: im2col / direct convolutions and GEMMs, every output a float32 dot
// product) are float32 evaluations of the same exact network, each within the float32 rounding bound of
// network_bound.hpp: the soc head's logit vector within E = a ||x0|| + b in l2 (so each logit within E), each lln
// logit within E (logit_error_bound). So every logit of one is within 2 E of the other's: the rigorous tolerance.
// It is a worst case (about a logit for these models), so the test also asks what float32 does in practice, as
// test_certifying_pass.cpp does for the float32 model against the float64 pass: ~1e-6 relative per operation over
// the few dozen chained steps (5 layers of up to 12 terms and the head) stays below 1e-4 of the largest logit.
// The exporter's own choices are inside both: 1/j is folded as fl(1/j) A_n, the float32 layer's own scaled copies,
// and the 1x1 layers' P is rounded once from double (the float32 matrix path's bound allows a float32 Horner).
// Every check can fail: the practical tolerance must also be smaller than the difference between the logits of two
// neighbouring images.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <cstring>

#include "cli_helpers.hpp"
#include "orthoconv/orthoconv.hpp"

using namespace orthoconv;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

#ifdef ORTHOCONV_ONNX_PYTHON
constexpr const char* kOnnxPython = ORTHOCONV_ONNX_PYTHON;
#else
constexpr const char* kOnnxPython = nullptr;
#endif

constexpr int64_t kImages = 256;

using testing::TempDir;

// LipConvnet-5 (every block stride 2: pixel-unshuffle, zero channels in the first layer, truncation everywhere),
// width 8, 100 classes, freshly initialised (50 power iterations).
ModelConfig lipconvnet5(const std::string& conv, int64_t a, std::optional<int64_t> b) {
  ModelConfig c;
  c.conv = parse_conv_kind(conv);
  c.groups = GroupCounts{a, b};
  c.depth = 5;
  c.init_channels = 8;
  c.classes = 100;
  c.seed = 23;
  return c;
}

void save_model(LipConvnet& model, const std::string& path) {
  Checkpoint c;
  write_model_state(model, Normalization{}, c);
  save_checkpoint(path, c);
}

std::vector<float> read_floats(const std::string& path, size_t count) {
  const std::string bytes = testing::slurp(path);
  REQUIRE(bytes.size() == count * sizeof(float));
  std::vector<float> out(count);
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

struct Exported {
  std::string name;
  ModelConfig config;
  std::string checkpoint, onnx, logits;  // files: the checkpoint, the exported model, ONNX Runtime's logits
};

// Compares ONNX Runtime's logits of one exported model (`report`: its line of onnx_runtime_check.py) with
// orthoconv's float32 forward of the same checkpoint, image by image (tolerances above).
void check_runtime_matches(const Exported& e, const json& report, const CifarSplit& test) {
  INFO(e.name);
  // orthoconv's float32 logits of the checkpoint, as `certify` loads and runs it.
  LoadedModel loaded = load_model(e.checkpoint);
  LipConvnet& model = *loaded.model;
  std::vector<int64_t> indices(kImages);
  for (int64_t i = 0; i < kImages; ++i) indices[static_cast<size_t>(i)] = i;
  Batch batch;
  make_batch(test, indices, loaded.normalization, batch);
  Tensor logits;
  model.forward(batch.images, logits);
  const std::vector<float> ours = logits.to_vector();
  const int64_t classes = e.config.classes;
  REQUIRE(static_cast<int64_t>(ours.size()) == kImages * classes);
  REQUIRE(report["model"] == e.onnx);
  // Standard operators of the default domain only, opset 17, the documented input and output.
  CHECK(report["opset"] == json({{"ai.onnx", kOnnxOpset}}));
  CHECK(report["domains"] == json::array({""}));
  const std::set<std::string> standard{"Add", "Concat", "Conv",    "Div",   "Flatten",      "Gather", "MatMul", "Max",
                                       "Min", "Pad",    "Reshape", "Slice", "SpaceToDepth", "Split",  "Sub"};
  for (const auto& op : report["operators"]) CHECK(standard.count(op.get<std::string>()) == 1);
  // The series as its terms: K Conv nodes per k x k SocConv (K = the checkpoint's 12 evaluation terms), one per
  // 1x1 SocConv of the body, the head one MatMul.
  int64_t convolutions = 0;
  for (const NetworkStep& step : model.steps())
    if (step.kind == StepKind::soc && step.name != "head")
      convolutions += step.soc->config().kernel > 1 ? model.config().eval_terms : 1;
  REQUIRE(model.config().eval_terms == 12);
  CHECK(report["operator_counts"]["Conv"] == convolutions);
  CHECK(report["operator_counts"]["MatMul"] == 1);
  CHECK(report["input"] == json({{kOnnxInputName, {"N", 3, 32, 32}}}));
  CHECK(report["output"] == json({{kOnnxOutputName, {"N", classes}}}));
  // The metadata, as the onnx package reads it, is the verified bound of the network for the exported terms.
  const NetworkBound bound = verify_network(model, model.config().eval_terms, Precision::float32, loaded.normalization);
  const json& meta = report["metadata"];
  CHECK(meta["orthoconv.architecture"] == model.config().architecture());
  CHECK(meta["orthoconv.series_terms"] == std::to_string(model.config().eval_terms));
  CHECK(std::stod(meta["orthoconv.lipschitz"].get<std::string>()) == bound.lipschitz);
  CHECK(std::stod(meta["orthoconv.lipschitz_input"].get<std::string>()) == loaded.normalization.lipschitz());
  CHECK(meta.contains("orthoconv.certified_radius"));

  const std::vector<float> runtime = read_floats(e.logits, static_cast<size_t>(kImages * classes));
  const Float64Network pass(model, loaded.normalization, model.config().eval_terms);  // for ||x0|| only
  double worst_difference = 0.0, worst_ratio = 0.0, largest_bound = 0.0, smallest_separation = INFINITY;
  for (int64_t i = 0; i < kImages; ++i) {
    double sum = 0.0, scale = 0.0;
    for (double v : pass.normalize(test.pixels.data() + i * kCifarPixels)) sum += v * v;
    const double bound_tolerance = 2.0 * logit_error_bound(bound, std::sqrt(sum) * (1.0 + 1e-9));
    for (int64_t k = 0; k < classes; ++k)
      scale = std::max(scale, std::abs(double{ours[static_cast<size_t>(i * classes + k)]}));
    const double tolerance = 1e-4 * scale;
    double difference = 0.0, separation = 0.0;
    const int64_t next = (i + 1) % kImages;
    for (int64_t k = 0; k < classes; ++k) {
      const double r = runtime[static_cast<size_t>(i * classes + k)];
      const double d = std::abs(r - ours[static_cast<size_t>(i * classes + k)]);
      difference = std::isnan(d) ? d : std::max(difference, d);  // a NaN fails below
      separation = std::max(separation, std::abs(r - ours[static_cast<size_t>(next * classes + k)]));
    }
    INFO("image " << i << ": largest logit difference " << difference << ", tolerance " << tolerance
                  << ", rounding bound 2E " << bound_tolerance << ", neighbour's logits differ by " << separation);
    REQUIRE(difference <= bound_tolerance);
    REQUIRE(difference <= tolerance);
    REQUIRE(separation > tolerance);
    worst_difference = std::max(worst_difference, difference);
    worst_ratio = std::max(worst_ratio, difference / tolerance);
    largest_bound = std::max(largest_bound, bound_tolerance);
    smallest_separation = std::min(smallest_separation, separation);
  }
  WARN(e.config.architecture() << ": largest |onnxruntime - orthoconv| logit difference " << worst_difference
                               << ", worst difference / (1e-4 max|logit|) " << worst_ratio << ", largest 2E "
                               << largest_bound << ", smallest difference from the neighbouring image's logits "
                               << smallest_separation);
}

}  // namespace

// Six LipConvnet-5 models exported through the CLI, then run by ONE Python process (its start and the imports cost
// more than the models): SOC; GS-SOC (4,1) and (4,-); paired MaxMin; keep per group; grouped SOC with the lln head.
TEST_CASE("ONNX export: onnxruntime gives orthoconv's float32 logits on 256 CIFAR-100 test images", "[onnx]") {
  if (!onnx_export_available() || kOnnxPython == nullptr) {
    WARN(
        "ORTHOCONV_ONNX_SKIPPED: needs a build with ONNX export (libonnx-dev) and -DORTHOCONV_PYTHON=<python with "
        "onnx and onnxruntime>");
    return;
  }
  const std::string data = testing::real_data_dir();
  if (data.empty()) {
    WARN("ORTHOCONV_DATA_SKIPPED: real CIFAR-100 not found (set ORTHOCONV_DATA)");
    return;
  }
  std::vector<Exported> models{{"SOC", lipconvnet5("soc", 1, std::nullopt), "", "", ""},
                               {"GS-SOC (4,1)", lipconvnet5("gs-soc", 4, 1), "", "", ""},
                               {"GS-SOC (4,-)", lipconvnet5("gs-soc", 4, std::nullopt), "", "", ""},
                               {"paired MaxMin, GS-SOC (4,1)", lipconvnet5("gs-soc", 4, 1), "", "", ""},
                               {"keep per group, GS-SOC (4,-)", lipconvnet5("gs-soc", 4, std::nullopt), "", "", ""},
                               {"grouped SOC (g2), lln head", lipconvnet5("soc", 2, std::nullopt), "", "", ""}};
  models[3].config.activation = ActivationKind::maxmin_paired;
  models[4].config.keep = KeepChannels::per_group;
  models[5].config.head = HeadKind::lln;
  TempDir dir;
  std::string arguments;
  for (size_t m = 0; m < models.size(); ++m) {
    Exported& e = models[m];
    INFO(e.name);
    e.checkpoint = (dir.path / ("model" + std::to_string(m) + ".safetensors")).string();
    e.onnx = (dir.path / ("model" + std::to_string(m) + ".onnx")).string();
    e.logits = (dir.path / ("runtime" + std::to_string(m) + ".f32")).string();
    {
      LipConvnet fresh(e.config);
      save_model(fresh, e.checkpoint);
    }
    const testing::CliResult exported =
        testing::run_cli("export --checkpoint '" + e.checkpoint + "' --onnx '" + e.onnx + "'");
    INFO(exported.err);
    REQUIRE(exported.exit_code == 0);
    arguments += " '" + e.onnx + "' '" + e.logits + "'";
  }
  const testing::CliResult run =
      testing::run_command("'" + std::string(kOnnxPython) + "' '" ORTHOCONV_SOURCE_DIR +
                           "/tests/onnx_runtime_check.py' '" + data + "' " + std::to_string(kImages) + arguments);
  INFO(run.err);
  REQUIRE(run.exit_code == 0);
  REQUIRE(testing::line_count(run.out) == models.size());
  const CifarSplit test = load_cifar100(data, "test");
  std::istringstream lines(run.out);
  for (const Exported& e : models) {
    std::string line;
    std::getline(lines, line);
    check_runtime_matches(e, json::parse(line), test);
  }
}

TEST_CASE("ONNX export: a corrupted or unsupported checkpoint is one error line and leaves no file", "[onnx]") {
  TempDir dir;
  const std::string good = (dir.path / "good.safetensors").string();
  ModelConfig config = lipconvnet5("gs-soc", 2, 1);
  config.init_channels = 4;
  config.classes = 10;
  config.init_iterations = 0;
  LipConvnet model(config);
  Checkpoint state;
  write_model_state(model, Normalization{}, state);
  save_checkpoint(good, state);
  // Truncated in its data; a format version from the future; a checkpoint of something else.
  const std::string bytes = testing::slurp(good);
  const std::string truncated = (dir.path / "truncated.safetensors").string();
  std::ofstream(truncated, std::ios::binary) << bytes.substr(0, bytes.size() - 100);
  Checkpoint future = state;
  future.metadata["format_version"] = "99";
  const std::string unsupported = (dir.path / "future.safetensors").string();
  save_checkpoint(unsupported, future);
  Checkpoint other = state;
  other.metadata["format"] = "someone.else";
  const std::string foreign = (dir.path / "foreign.safetensors").string();
  save_checkpoint(foreign, other);
  // An existing model.onnx must survive every failure unchanged.
  const std::string onnx = (dir.path / "model.onnx").string();
  std::ofstream(onnx) << "previous contents";
  const std::vector<std::string> before = dir.entries();
  const std::vector<std::pair<std::string, std::string>> cases{
      {truncated, "truncated.safetensors"},
      {unsupported, "format version 99 is not supported"},
      {foreign, "format 'someone.else'"},
      {(dir.path / "missing.safetensors").string(), "missing.safetensors"}};
  for (const auto& [checkpoint, message] : cases) {
    INFO(checkpoint);
    const testing::CliResult r = testing::run_cli("export --checkpoint '" + checkpoint + "' --onnx '" + onnx + "'");
    CHECK(r.exit_code == 1);
    CHECK(r.out.empty());  // the failure comes before anything is printed
    CHECK(testing::line_count(r.err) == 1);
    CHECK(r.err.rfind("orthoconv: error: ", 0) == 0);
    if (onnx_export_available()) CHECK(r.err.find(message) != std::string::npos);
    CHECK(dir.entries() == before);
    CHECK(testing::slurp(onnx) == "previous contents");
  }
  if (!onnx_export_available()) {
    // Without the ONNX export the command says what to install, before loading anything.
    const testing::CliResult r = testing::run_cli("export --checkpoint '" + good + "' --onnx '" + onnx + "'");
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("libonnx-dev") != std::string::npos);
    CHECK_THROWS_AS(export_onnx(model, Normalization{}, onnx), Error);
    return;
  }
  // The good checkpoint replaces the file, atomically (no temporary left), with an ONNX model.
  const testing::CliResult r = testing::run_cli("export --checkpoint '" + good + "' --onnx '" + onnx + "' --terms 6");
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("6 series terms") != std::string::npos);
  CHECK(dir.entries() == before);
  CHECK(testing::slurp(onnx).size() > 1000);
}

TEST_CASE("ONNX export: bad settings are one error line before anything is written", "[onnx]") {
  TempDir dir;
  const std::string checkpoint = (dir.path / "model.safetensors").string();
  ModelConfig config = lipconvnet5("soc", 1, std::nullopt);
  config.init_channels = 4;
  config.classes = 10;
  config.init_iterations = 0;
  LipConvnet model(config);
  save_model(model, checkpoint);
  const std::string d = dir.path.string();
  const bool onnx = onnx_export_available();
  const std::vector<std::pair<std::string, std::string>> cases{
      {"", "give --onnx FILE and/or --vnnlib DIR"},
      {"--onnx '" + d + "/m.onnx' --terms 0", "--terms must be in 1..100, got 0"},
      {"--onnx '" + d + "/m.onnx' --terms 101", "--terms must be in 1..100, got 101"},
      {"--vnnlib '" + d + "/props' --images 0", "--images must be positive, got 0"},
      {"--vnnlib '" + d + "/props' --eps 0", "--eps must be a numerator over 255"},
      {"--onnx '" + d + "/nowhere/m.onnx'", onnx ? "nowhere does not exist" : "libonnx-dev"},
      {"--onnx '" + checkpoint + "/x.onnx'", onnx ? "is not a directory" : "libonnx-dev"}};
  const std::vector<std::string> before = dir.entries();
  for (const auto& [args, message] : cases) {
    INFO(args);
    const testing::CliResult r = testing::run_cli("export --checkpoint '" + checkpoint + "' " + args);
    CHECK(r.exit_code == 1);
    CHECK(testing::line_count(r.err) == 1);
    CHECK(r.err.find(message) != std::string::npos);
    CHECK(dir.entries() == before);
  }
  CHECK_THROWS_AS(export_onnx(model, Normalization{}, (dir.path / "m.onnx").string(), kMaxSeriesTerms + 1),
                  ConfigError);
}

namespace {

// The (lower, upper) bound of every X_k in a property, from its assertions.
std::vector<std::pair<double, double>> input_bounds(const std::string& property, int64_t inputs) {
  std::vector<std::pair<double, double>> out(static_cast<size_t>(inputs), {NAN, NAN});
  const std::regex bound(R"(\(assert \((<=|>=) X_(\d+) ([-+0-9.eE]+)\)\))");
  for (auto it = std::sregex_iterator(property.begin(), property.end(), bound); it != std::sregex_iterator(); ++it) {
    const size_t k = std::stoul((*it)[2].str());
    REQUIRE(k < out.size());
    ((*it)[1].str() == ">=" ? out[k].first : out[k].second) = std::strtod((*it)[3].str().c_str(), nullptr);
  }
  return out;
}

size_t occurrences(const std::string& text, const std::string& part) {
  size_t count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++count;
  return count;
}

}  // namespace

TEST_CASE("VNN-LIB property: the l-infinity box lies inside the l2 ball and the violation names every other class",
          "[onnx]") {
  const CifarSplit images = testing::synthetic_split(1, 10, 4);
  const int eps = 36;
  const std::string property = vnnlib_property(images.pixels.data(), 32, 3, 10, eps, {"first line", "second"});
  CHECK(property.rfind("; first line\n; second\n", 0) == 0);
  CHECK(occurrences(property, "(declare-const X_") == 3072);
  CHECK(occurrences(property, "(declare-const Y_") == 10);
  const double h = vnnlib_box_half_width(eps, 32);
  CHECK(h == Approx(36.0 / 255.0 / std::sqrt(3072.0)).epsilon(1e-15));
  // Every input bounded on both sides around byte / 255, by at most h; the farthest corner within eps / 255.
  double corner = 0.0;
  const auto bounds = input_bounds(property, 3072);
  for (size_t k = 0; k < bounds.size(); ++k) {
    const double x = images.pixels[k] / 255.0;
    INFO("X_" << k);
    REQUIRE(bounds[k].first <= x);
    REQUIRE(bounds[k].second >= x);
    CHECK(x - bounds[k].first <= h);
    CHECK(bounds[k].second - x <= h);
    CHECK(x - bounds[k].first >= h - 1e-11);  // shrunk by 1e-12 only
    const double far = std::max(x - bounds[k].first, bounds[k].second - x);
    corner += far * far;
  }
  CHECK(std::sqrt(corner) <= eps / 255.0);
  // The counterexample region: Y_j >= Y_3 for each of the 9 other classes, none for the label itself.
  CHECK(occurrences(property, "(and (>= Y_") == 9);
  CHECK(occurrences(property, "Y_3))") == 9);
  CHECK(property.find("(and (>= Y_3 Y_3))") == std::string::npos);
  CHECK_THROWS_AS(vnnlib_property(images.pixels.data(), 32, 10, 10, eps, {}), ConfigError);
  CHECK_THROWS_AS(vnnlib_property(images.pixels.data(), 32, 0, 10, 0, {}), ConfigError);
  CHECK_THROWS_AS(vnnlib_property(images.pixels.data(), 32, 0, 10, eps, {"two\nlines"}), ConfigError);
}

TEST_CASE("export --vnnlib writes one property per test image with orthoconv's own certificate listed", "[onnx]") {
  TempDir dir;
  const std::string checkpoint = (dir.path / "model.safetensors").string();
  ModelConfig config = lipconvnet5("gs-soc", 2, 1);
  config.init_channels = 4;
  config.classes = 10;
  LipConvnet fresh(config);
  save_model(fresh, checkpoint);
  const std::string data = testing::synthetic_cifar100_dir();
  const std::string out = (dir.path / "properties").string();
  const testing::CliResult r = testing::run_cli("export --checkpoint '" + checkpoint + "' --vnnlib '" + out +
                                                "' --images 3 --eps 72 --data '" + data + "'");
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("3 properties") != std::string::npos);
  // orthoconv's certificates of the same images, as `certify` computes them.
  LoadedModel loaded = load_model(checkpoint);
  LipConvnet& model = *loaded.model;
  const CifarSplit test = load_cifar100(data, "test");
  const NetworkBound bound = verify_network(model, model.config().eval_terms, Precision::float64, loaded.normalization);
  const VerifiedEvaluation expected = evaluate_verified(model, bound, test, {0, 1, 2}, loaded.normalization, {72});
  const std::string listing = testing::slurp(out + "/properties.csv");
  CHECK(testing::line_count(listing) == 4);
  for (int64_t i = 0; i < 3; ++i) {
    const std::string name = "cifar100_test_" + std::to_string(i) + "_eps72.vnnlib";
    const std::string property = testing::slurp(out + "/" + name);
    INFO(name);
    const int32_t label = test.fine_labels[static_cast<size_t>(i)];
    CHECK(property.find("label " + std::to_string(label)) != std::string::npos);
    CHECK(occurrences(property, "Y_" + std::to_string(label) + "))") == 9);
    CHECK(property.find("which lies inside that ball") != std::string::npos);
    const ImageCertificate& c = expected.verified_images[static_cast<size_t>(i)];
    char radius[64];
    std::snprintf(radius, sizeof radius, "%.9g", c.radius);
    const std::string row = name + "," + std::to_string(i) + "," + std::to_string(label) + "," +
                            std::to_string(c.predicted) + "," + radius + "," + (certified_at(c, 72) ? "1" : "0");
    CHECK(listing.find(row + "\n") != std::string::npos);
    const auto bounds = input_bounds(property, 3072);
    CHECK(bounds[0].second - bounds[0].first == Approx(2 * vnnlib_box_half_width(72, 32)).epsilon(1e-9));
  }
}
