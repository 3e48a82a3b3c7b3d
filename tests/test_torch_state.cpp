// scripts/torch_state.py, the PyTorch interop (run with the Python of ORTHOCONV_PYTHON, numpy + safetensors, no
// torch): an orthoconv checkpoint becomes a state dict with the names and 5-D shapes of the reference code's
// LipConvNet and SOC modules (written out below from skew_ortho_conv.py / lip_convnets.py, independently of the
// script), every value bit for bit, and converting back gives the checkpoint's model again, exactly.
#include <catch2/catch.hpp>

#include <filesystem>
#include <map>
#include <random>

#include "cli_helpers.hpp"
#include "orthoconv/orthoconv.hpp"

using namespace orthoconv;
namespace fs = std::filesystem;

namespace {

#ifdef ORTHOCONV_PYTHON
constexpr const char* kPython = ORTHOCONV_PYTHON;
#else
constexpr const char* kPython = nullptr;
#endif

// ctest reports a test that prints this as skipped (tests/CMakeLists.txt): a build without a Python that has
// numpy and safetensors cannot run the script.
bool python_ready() {
  if (kPython) return true;
  WARN("ORTHOCONV_PYTHON_SKIPPED: configure with -DORTHOCONV_PYTHON=<python with numpy and safetensors>");
  return false;
}

testing::CliResult run_script(const std::string& args) {
  return testing::run_command(std::string("'") + kPython + "' '" + ORTHOCONV_SOURCE_DIR + "/scripts/torch_state.py' " +
                              args);
}

std::string fresh_path(const std::string& name) {
  static const orthoconv::testing::TempDir base;  // removed, with every file in it, at exit
  const fs::path dir = base.path;
  fs::remove(dir / name);
  return (dir / name).string();
}

ModelConfig config_of(const std::string& conv, int64_t a, std::optional<int64_t> b, int64_t depth,
                      const std::string& head) {
  ModelConfig c;
  c.conv = parse_conv_kind(conv);
  c.groups = GroupCounts{a, b};
  c.depth = depth;
  c.init_channels = 4;
  c.classes = 10;
  c.head = parse_head(head);
  c.seed = 5;
  return c;
}

// A model after one training step (so u, v have moved), one step counter set apart, saved with training state
// that a state dict does not carry (a momentum tensor, the history).
Checkpoint saved_model(LipConvnet& model) {
  Tensor images(Shape{1, 3, 32, 32}), logits;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> pixels(static_cast<size_t>(images.numel()));
  for (float& p : pixels) p = normal(rng);
  images = Tensor::from_vector(pixels, images.shape());
  model.forward(images, logits);
  model.soc_layers().front().soc->set_step(7);
  Normalization norm;
  norm.mean = {0.5f, 0.4f, 0.3f};
  Checkpoint c;
  write_model_state(model, norm, c);
  c.metadata["train.history"] = "{}";
  c.tensors["optimizer.momentum.head.bias"] = c.tensors.at("head.bias");
  return c;
}

// The reference's module names, from its LipConvNet: layer<s> is an nn.Sequential of LipBlocks (index b) whose
// `conv` is the SOC (conv "soc") or holds soc1 / soc2 (GS-SOC); the head is `last_layer`. Paired with the orthoconv
// SocConv each one is.
std::vector<std::pair<std::string, std::string>> reference_modules(const ModelConfig& m) {
  std::vector<std::pair<std::string, std::string>> out;
  for (int s = 1; s <= 5; ++s)
    for (int64_t b = 0; b < m.depth / 5; ++b) {
      const std::string module = "layer" + std::to_string(s) + "." + std::to_string(b) + ".conv";
      const std::string soc = "stage" + std::to_string(s) + ".block" + std::to_string(b) + ".conv";
      if (m.conv == ConvKind::soc) {
        out.push_back({module, soc});
      } else {
        out.push_back({module + ".soc1", soc + ".first"});
        if (m.group_counts().second) out.push_back({module + ".soc2", soc + ".second"});
      }
    }
  if (m.head == HeadKind::soc) out.push_back({"last_layer", "head"});
  return out;
}

// fantastic_four's layouts: u1 (g,1,in,1,w) v1 (g,out,1,h,1) u2 (g,1,in,h,1) v2 (g,out,1,1,w) u3 (g,1,in,h,w)
// v3 (g,out,1,1,1) u4 (g,out,1,h,w) v4 (g,1,in,1,1); random_conv_filter (g, C, C, k, k); correction (1).
std::map<std::string, std::vector<int64_t>> reference_shapes(int64_t g, int64_t c, int64_t k) {
  return {{"random_conv_filter", {g, c, c, k, k}},
          {"correction", {1}},
          {"u1", {g, 1, c, 1, k}},
          {"v1", {g, c, 1, k, 1}},
          {"u2", {g, 1, c, k, 1}},
          {"v2", {g, c, 1, 1, k}},
          {"u3", {g, 1, c, k, k}},
          {"v3", {g, c, 1, 1, 1}},
          {"u4", {g, c, 1, k, k}},
          {"v4", {g, 1, c, 1, 1}}};
}

bool is_model_metadata(const std::string& key) {
  return key == "architecture" || key.rfind("model.", 0) == 0 || key.rfind("series.", 0) == 0 ||
         key.rfind("normalization.", 0) == 0 || key.rfind("step.", 0) == 0;
}

void check_same_model(const Checkpoint& back, const Checkpoint& original) {
  for (const auto& [name, tensor] : original.tensors) {
    INFO(name);
    if (name.rfind("optimizer.", 0) == 0) {
      CHECK(back.tensors.count(name) == 0);
      continue;
    }
    REQUIRE(back.tensors.count(name) == 1);
    CHECK(back.tensors.at(name).shape == tensor.shape);
    CHECK(back.tensors.at(name).values == tensor.values);
  }
  CHECK(back.tensors.size() == original.tensors.size() - 1);  // less the momentum tensor
  for (const auto& [key, value] : original.metadata) {
    INFO(key);
    if (is_model_metadata(key)) CHECK(back.meta(key) == value);
  }
  CHECK(back.meta("format") == "orthoconv.lipconvnet");
  CHECK(back.meta("format_version") == std::to_string(kCheckpointVersion));
  CHECK(back.metadata.count("train.history") == 0);
}

}  // namespace

TEST_CASE("torch_state.py: the reference's names, 5-D shapes and values, and back to the same checkpoint",
          "[interop][checkpoint]") {
  if (!python_ready()) return;
  for (const ModelConfig& m : {config_of("gs-soc", 2, 1, 10, "soc"), config_of("soc", 1, std::nullopt, 5, "lln"),
                               config_of("gs-soc", 2, std::nullopt, 5, "soc")}) {
    INFO(m.architecture());
    LipConvnet model(m);
    const Checkpoint original = saved_model(model);
    const std::string source = fresh_path("model.safetensors"), state = fresh_path("state.safetensors"),
                      back = fresh_path("back.safetensors");
    save_checkpoint(source, original);
    const auto to = run_script("to-torch '" + source + "' '" + state + "'");
    INFO(to.out << to.err);
    REQUIRE(to.exit_code == 0);

    // The state dict, read with orthoconv's own safetensors reader.
    const Checkpoint torch = load_checkpoint(state);
    size_t expected_tensors = 0;
    for (const auto& [module, soc_name] : reference_modules(m)) {
      INFO(module);
      SocConv* soc = nullptr;
      for (const NamedSoc& s : model.soc_layers())
        if (s.name == soc_name) soc = s.soc;
      REQUIRE(soc != nullptr);
      const int64_t g = soc->config().groups, c = soc->config().group_channels(), k = soc->config().kernel;
      for (const auto& [tensor, shape] : reference_shapes(g, c, k)) {
        const std::string name = module + "." + tensor;
        INFO(name);
        REQUIRE(torch.tensors.count(name) == 1);
        CHECK(torch.tensors.at(name).shape == shape);
        const std::vector<float>& values = torch.tensors.at(name).values;
        if (tensor == "correction") {
          CHECK(values == std::vector<float>{k > 1 ? 0.7f : 1.0f});
        } else if (tensor == "random_conv_filter") {
          CHECK(values == soc->weight().value.to_vector());
        } else {
          for (const Buffer& b : soc->buffers())
            if (b.name == tensor) CHECK(values == b.tensor->to_vector());
        }
      }
      REQUIRE(torch.tensors.count(module + ".bias") == 1);
      CHECK(torch.tensors.at(module + ".bias").values == soc->bias().value.to_vector());
      CHECK(torch.meta("total_iters." + module) == std::to_string(soc->step()));
      expected_tensors += 11;
    }
    if (m.head == HeadKind::lln) {
      CHECK(torch.tensors.at("last_layer.weight").values == model.lln_head()->weight().value.to_vector());
      CHECK(torch.tensors.at("last_layer.weight").shape == std::vector<int64_t>{m.classes, model.features()});
      CHECK(torch.tensors.at("last_layer.bias").values == model.lln_head()->bias().value.to_vector());
      expected_tensors += 2;
    }
    CHECK(torch.tensors.size() == expected_tensors);

    const auto from = run_script("from-torch '" + state + "' '" + back + "'");
    INFO(from.out << from.err);
    REQUIRE(from.exit_code == 0);
    check_same_model(load_checkpoint(back), original);
  }
}

TEST_CASE("torch_state.py: a plain state dict (no metadata) gives the architecture from names and shapes",
          "[interop][checkpoint]") {
  if (!python_ready()) return;
  ModelConfig m = config_of("gs-soc", 2, 1, 10, "soc");
  m.seed = 42;  // the script's default: a state dict does not say
  LipConvnet model(m);
  const Checkpoint original = saved_model(model);
  const std::string source = fresh_path("plain-model.safetensors"), state = fresh_path("plain-state.safetensors"),
                    plain = fresh_path("plain.safetensors"), back = fresh_path("plain-back.safetensors");
  save_checkpoint(source, original);
  REQUIRE(run_script("to-torch '" + source + "' '" + state + "'").exit_code == 0);
  Checkpoint torch = load_checkpoint(state);
  torch.metadata.clear();  // as safetensors.torch.save_file(model.state_dict()) writes it
  save_checkpoint(plain, torch);
  const auto from = run_script("from-torch '" + plain + "' '" + back + "' --step 3 --mean 0.5 0.4 0.3");
  INFO(from.out << from.err);
  REQUIRE(from.exit_code == 0);
  const Checkpoint restored = load_checkpoint(back);
  CHECK(restored.meta("architecture") == m.architecture());
  CHECK(restored.meta("step.head") == "3");
  LoadedModel loaded = load_model(back);  // the architecture line agrees with its fields, every tensor fits
  for (const NamedParameter& p : loaded.model->parameters()) {
    INFO(p.name);
    CHECK(p.parameter->value.to_vector() == original.tensors.at(p.name).values);
  }
  for (const NamedBuffer& b : loaded.model->buffers()) {
    INFO(b.name);
    CHECK(b.tensor->to_vector() == original.tensors.at(b.name).values);
  }
  CHECK(loaded.normalization.mean == std::array<float, 3>{0.5f, 0.4f, 0.3f});

  // A tensor of the wrong shape, or a missing file: one line on stderr naming it, exit status 1, nothing written.
  torch.tensors["layer2.0.conv.soc1.u4"].shape = {1, 4, 1, 3, 3};
  torch.tensors["layer2.0.conv.soc1.u4"].values.resize(36);
  const std::string broken = fresh_path("broken.safetensors"), none = fresh_path("none.safetensors");
  save_checkpoint(broken, torch);
  const auto bad = run_script("from-torch '" + broken + "' '" + none + "'");
  CHECK(bad.exit_code == 1);
  CHECK(bad.err.find("layer2.0.conv.soc1.u4") != std::string::npos);
  CHECK(testing::line_count(bad.err) == 1);
  CHECK_FALSE(fs::exists(none));
  const auto missing = run_script("to-torch '" + fresh_path("absent.safetensors") + "' '" + none + "'");
  CHECK(missing.exit_code == 1);
  CHECK(missing.err.find("absent.safetensors") != std::string::npos);
  CHECK(testing::line_count(missing.err) == 1);
}

TEST_CASE("torch_state.py: a format version 1 checkpoint gives the same state dict", "[interop][checkpoint]") {
  if (!python_ready()) return;
  ModelConfig m = config_of("gs-soc", 2, 1, 5, "soc");
  LipConvnet model(m);
  const Checkpoint current = saved_model(model);
  Checkpoint v1 = current;  // u4 / v4 under each other's names
  v1.metadata["format_version"] = "1";
  for (const auto& [name, tensor] : current.tensors) {
    const std::string tail = name.substr(name.size() - 3);
    if (tail == ".u4") v1.tensors[name.substr(0, name.size() - 3) + ".v4"] = tensor;
    if (tail == ".v4") v1.tensors[name.substr(0, name.size() - 3) + ".u4"] = tensor;
  }
  const std::string a = fresh_path("v2.safetensors"), b = fresh_path("v1.safetensors"),
                    sa = fresh_path("v2-state.safetensors"), sb = fresh_path("v1-state.safetensors");
  save_checkpoint(a, current);
  save_checkpoint(b, v1);
  REQUIRE(run_script("to-torch '" + a + "' '" + sa + "'").exit_code == 0);
  REQUIRE(run_script("to-torch '" + b + "' '" + sb + "'").exit_code == 0);
  const Checkpoint from_current = load_checkpoint(sa), from_v1 = load_checkpoint(sb);
  REQUIRE(from_current.tensors.size() == from_v1.tensors.size());
  for (const auto& [name, tensor] : from_current.tensors) {
    INFO(name);
    CHECK(from_v1.tensors.at(name).shape == tensor.shape);
    CHECK(from_v1.tensors.at(name).values == tensor.values);
  }
}
