// A trained model as a library user gets it: load_model() (one call from a checkpoint to an evaluation-ready
// model), the conversion of format-version-1 checkpoints (u4 / v4 under each other's names), the power-iteration
// schedule setting (including holding u, v fixed), the umbrella header and the run-time thread control.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include "orthoconv/orthoconv.hpp"
#include "reference.hpp"
#include "cli_helpers.hpp"

using namespace orthoconv;
namespace fs = std::filesystem;

namespace {

std::string fresh_path(const std::string& name) {
  static const orthoconv::testing::TempDir base;  // removed, with every file in it, at exit
  const fs::path dir = base.path;
  const fs::path path = dir / name;
  fs::remove(path);
  return path.string();
}

// A small GS-SOC (2,1) LipConvnet: 3x3 grouped layers (u4 and v4 differ in length) and 1x1 ones.
ModelConfig small_config() {
  ModelConfig c;
  c.conv = ConvKind::gs_soc;
  c.groups = GroupCounts{2, 1};
  c.depth = 5;
  c.init_channels = 4;
  c.classes = 10;
  c.seed = 11;
  return c;
}

Tensor random_images(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n * 3 * 32 * 32));
  for (float& x : v) x = normal(rng);
  return Tensor::from_vector(v, Shape{n, 3, 32, 32});
}

// A model after two training steps (step counters 2, u and v moved), saved with a non-default normalization.
struct Saved {
  std::unique_ptr<LipConvnet> model;
  Normalization norm;
  Checkpoint checkpoint;
};

Saved trained_and_saved() {
  Saved s;
  s.model = std::make_unique<LipConvnet>(small_config());
  Tensor images = random_images(2, 5), logits;
  s.model->forward(images, logits);
  s.model->forward(images, logits);
  s.norm.mean = {0.5f, 0.25f, 0.125f};
  s.norm.std = {0.2f, 0.3f, 0.4f};
  write_model_state(*s.model, s.norm, s.checkpoint);
  return s;
}

std::vector<float> logits_of(LipConvnet& model, const Tensor& images) {
  Tensor logits;
  model.forward(images, logits);
  return logits.to_vector();
}

}  // namespace

TEST_CASE("load_model: one call gives the saved model in evaluation mode, with its normalization and counters",
          "[model-state][load]") {
  Saved saved = trained_and_saved();
  const std::string path = fresh_path("model.safetensors");
  save_checkpoint(path, saved.checkpoint);

  LoadedModel loaded = load_model(path, Device::cpu);
  REQUIRE(loaded.model != nullptr);
  LipConvnet& model = *loaded.model;
  CHECK_FALSE(model.training());
  CHECK(model.backend().device() == Device::cpu);
  CHECK(model.config().architecture() == saved.model->config().architecture());
  CHECK(loaded.normalization.mean == saved.norm.mean);
  CHECK(loaded.normalization.std == saved.norm.std);
  auto original = saved.model->soc_layers(), restored = model.soc_layers();
  REQUIRE(original.size() == restored.size());
  for (size_t i = 0; i < original.size(); ++i) {
    INFO(original[i].name);
    CHECK(restored[i].soc->step() == 2);
    CHECK(restored[i].soc->terms() == 12);
  }
  auto original_buffers = saved.model->buffers(), restored_buffers = model.buffers();
  REQUIRE(original_buffers.size() == restored_buffers.size());
  for (size_t i = 0; i < original_buffers.size(); ++i) {
    INFO(original_buffers[i].name);
    CHECK(restored_buffers[i].tensor->to_vector() == original_buffers[i].tensor->to_vector());
  }

  // The same function, bit for bit: same parameters, same u, v, no power iterations in evaluation mode.
  saved.model->set_training(false);
  const Tensor images = random_images(3, 9);
  CHECK(logits_of(model, images) == logits_of(*saved.model, images));

  CHECK_THROWS_WITH(load_model(fresh_path("missing.safetensors")), Catch::Contains("missing.safetensors"));
}

TEST_CASE("a format version 1 checkpoint (u4 and v4 under each other's names) loads as the same model",
          "[model-state][checkpoint][version]") {
  Saved saved = trained_and_saved();
  REQUIRE(saved.checkpoint.meta("format_version") == "2");
  // Version 1's layout: the in-channel vector [g, C] was "u4" and the (out, h, w) vector [g, C*k*k] was "v4".
  Checkpoint v1 = saved.checkpoint;
  v1.metadata["format_version"] = "1";
  int renamed = 0;
  for (const auto& [name, tensor] : saved.checkpoint.tensors) {
    const std::string tail = name.substr(name.size() - 3);
    if (tail != ".u4" && tail != ".v4") continue;
    const std::string other = name.substr(0, name.size() - 3) + (tail == ".u4" ? ".v4" : ".u4");
    v1.tensors[other] = tensor;
    ++renamed;
  }
  REQUIRE(renamed == 2 * static_cast<int>(saved.model->soc_layers().size()));
  const std::string path = fresh_path("v1.safetensors");
  save_checkpoint(path, v1);

  LoadedModel loaded = load_model(path);
  auto original = saved.model->buffers(), restored = loaded.model->buffers();
  REQUIRE(original.size() == restored.size());
  for (size_t i = 0; i < original.size(); ++i) {
    INFO(original[i].name);
    CHECK(restored[i].tensor->shape() == original[i].tensor->shape());
    CHECK(restored[i].tensor->to_vector() == original[i].tensor->to_vector());
  }

  // The same tensors read as version 2 do not fit: the 3x3 layers' u4 / v4 have the other lengths.
  v1.metadata["format_version"] = "2";
  const std::string mislabelled = fresh_path("mislabelled.safetensors");
  save_checkpoint(mislabelled, v1);
  CHECK_THROWS_WITH(load_model(mislabelled), Catch::Contains("u4") && Catch::Contains("has shape"));

  // A newer version than this build reads is refused by name.
  v1.metadata["format_version"] = "3";
  const std::string newer = fresh_path("v3.safetensors");
  save_checkpoint(newer, v1);
  CHECK_THROWS_WITH(load_model(newer), Catch::Contains("format version 3 is not supported"));
}

TEST_CASE("PowerSchedule: the reference's 50/1/200 by default, any counts, and hold keeps u, v fixed",
          "[model-state][power-iteration]") {
  CHECK(PowerSchedule{}.str() == "50,1,200");
  CHECK(PowerSchedule::parse("50,1,200") == PowerSchedule{});
  CHECK(PowerSchedule::parse("hold").holds());
  CHECK(PowerSchedule::parse(PowerSchedule::parse("7,2,3").str()) == PowerSchedule{7, 2, 3});
  for (const char* bad : {"", "50,1", "50,1,0", "-1,1,200", "a,b,c", "50,1,200,4", "holdx"})
    CHECK_THROWS_AS(PowerSchedule::parse(bad), ConfigError);

  SocConfig config;
  config.in_channels = config.out_channels = 4;
  config.kernel = 3;
  config.groups = 2;
  config.seed = 3;
  config.schedule = PowerSchedule{3, 2, 4};
  SocConv layer(config);
  Tensor x(Shape{1, 4, 2, 2}), y;
  for (int64_t step = 0; step < 9; ++step) {
    layer.forward(x, y);
    INFO("step " << step);
    CHECK(layer.last_power_iterations() == (step % 4 == 0 ? 3 : 2));
  }

  // hold: training forwards run no iterations and leave u, v alone, while sigma follows M through them.
  layer.set_schedule(PowerSchedule::hold());
  layer.set_step(0);  // a refresh step under any other schedule
  std::vector<std::vector<float>> before;
  for (const Buffer& b : layer.buffers()) before.push_back(b.tensor->to_vector());
  auto w = layer.weight().value.to_vector();
  for (float& m : w) m *= 1.5f;
  layer.weight().value = Tensor::from_vector(w, layer.weight().value.shape());
  layer.forward(x, y);
  CHECK(layer.last_power_iterations() == 0);
  CHECK(layer.step() == 1);
  std::vector<std::vector<float>> after;
  for (const Buffer& b : layer.buffers()) after.push_back(b.tensor->to_vector());
  CHECK(after == before);
  const auto p = reference::soc_params(layer);
  const auto sigma = reference::power_sigma(reference::skew(p.weight, p.groups, p.group_channels(), p.kernel), p.u, p.v,
                                            p.groups, p.group_channels(), p.kernel);
  CHECK(reference::max_relative_error(reference::to_double(layer.sigma()), sigma) < 1e-6);

  // The model setting reaches every SocConv, at construction and through set_power_schedule.
  ModelConfig m = small_config();
  m.power_schedule = PowerSchedule::hold();
  LipConvnet model(m);
  for (const NamedSoc& s : model.soc_layers()) CHECK(s.soc->config().schedule.holds());
  model.set_power_schedule(PowerSchedule{5, 0, 10});
  CHECK(model.config().power_schedule == PowerSchedule{5, 0, 10});
  for (const NamedSoc& s : model.soc_layers()) CHECK(s.soc->config().schedule == PowerSchedule{5, 0, 10});
  CHECK_THROWS_AS(model.set_power_schedule(PowerSchedule{1, 1, 0}), ConfigError);

  // A training configuration keeps it (config.json), and one written before the setting existed gets the default.
  TrainConfig train;
  train.model.power_schedule = PowerSchedule::hold();
  CHECK(TrainConfig::from_json(train.to_json()).model.power_schedule.holds());
  std::string old_json = TrainConfig{}.to_json();
  const auto key = old_json.find("\"power_schedule\"");
  REQUIRE(key != std::string::npos);
  old_json.erase(key, old_json.find('\n', key) - key + 1);
  CHECK(TrainConfig::from_json(old_json).model.power_schedule == PowerSchedule{});
}

TEST_CASE("orthoconv.hpp includes every public header", "[model-state][headers]") {
  const fs::path include_dir = fs::path(ORTHOCONV_SOURCE_DIR) / "include" / "orthoconv";
  std::ifstream in(include_dir / "orthoconv.hpp");
  std::stringstream umbrella;
  umbrella << in.rdbuf();
  int headers = 0;
  for (const auto& entry : fs::directory_iterator(include_dir)) {
    const std::string name = entry.path().filename().string();
    if (entry.path().extension() != ".hpp" || name == "orthoconv.hpp") continue;
    ++headers;
    INFO(name);
    CHECK(umbrella.str().find("#include \"orthoconv/" + name + "\"") != std::string::npos);
  }
  CHECK(headers >= 20);
}

TEST_CASE("runtime.hpp sets the thread count every CPU loop uses", "[model-state][runtime]") {
  const int before = thread_count();
  set_thread_count(1);
  CHECK(thread_count() == 1);
  set_thread_count(0);  // leaves the setting
  CHECK(thread_count() == 1);
  set_thread_count(before);
  CHECK(thread_count() == before);
  CHECK(peak_rss_bytes() > 0);
}
