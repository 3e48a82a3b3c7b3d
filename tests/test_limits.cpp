// Limits and corrupt values: every size is checked against what the machine can hold before anything is allocated
// or multiplied (one ConfigError naming the setting, never std::bad_alloc or the OOM killer), thread counts are
// bounded by the processors, and values a trained model cannot hold (NaN, infinities, squared norms beyond float32)
// are refused naming the file and the tensor.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "orthoconv/limits.hpp"
#include "orthoconv/model.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/runtime.hpp"

using namespace orthoconv;

namespace {

ModelConfig small(const std::string& conv, const std::string& groups, int64_t depth, int64_t width, int64_t classes,
                  const std::string& head) {
  ModelConfig c;
  c.conv = parse_conv_kind(conv);
  c.groups = GroupCounts::parse(groups);
  c.depth = depth;
  c.init_channels = width;
  c.classes = classes;
  c.head = parse_head(head);
  c.init_iterations = 0;
  return c;
}

}  // namespace

TEST_CASE("ModelConfig::sizes counts exactly the weights and block outputs the builder allocates", "[limits]") {
  const ModelConfig configs[] = {
      small("gs-soc", "4,1", 15, 8, 10, "soc"), small("gs-soc", "4,-", 10, 8, 10, "lln"),
      small("soc", "1", 5, 4, 300, "soc"),      small("soc", "2", 10, 8, 10, "lln"),
      small("gs-soc", "2,4", 5, 16, 10, "soc"), small("soc", "1", 5, 2, 10, "soc"),
  };
  for (const ModelConfig& config : configs) {
    INFO(config.architecture());
    LipConvnet model(config);
    double weights = 0, activations = 0;
    for (const NetworkStep& step : model.steps()) {
      if (step.soc) weights += static_cast<double>(step.soc->weight().value.numel());
      if (step.lln) weights += static_cast<double>(step.lln->weight().value.numel());
      if (step.maxmin)  // the block's conv output (the MaxMin's input) and the MaxMin's output
        activations += static_cast<double>(step.input.numel() + step.output.numel());
    }
    const ModelConfig::Sizes sizes = config.sizes();
    CHECK(sizes.weights == weights);
    CHECK(sizes.activations == activations);
  }
}

TEST_CASE("a model too large for this machine is refused naming its settings, before any allocation", "[limits]") {
  ModelConfig wide = small("gs-soc", "4,1", 15, 100000, 100, "soc");
  CHECK_THROWS_WITH(wide.validate(), Catch::Contains("width 100000") && Catch::Contains("memory"));
  CHECK_THROWS_AS(LipConvnet(wide), ConfigError);
  ModelConfig classes = small("gs-soc", "4,1", 15, 32, 1000000, "soc");
  CHECK_THROWS_WITH(classes.validate(), Catch::Contains("1000000 classes") && Catch::Contains("memory"));
  ModelConfig side = small("soc", "1", 5, 8, 10, "soc");
  side.input_side = int64_t{1} << 40;  // crafted metadata: the flattened features explode
  CHECK_THROWS_WITH(side.validate(), Catch::Contains("input side") && Catch::Contains("memory"));
  ModelConfig deep = small("soc", "1", 5, 8, 10, "soc");
  deep.depth = 999999999999999995;
  CHECK_THROWS_WITH(deep.validate(), Catch::Contains("depth must be at most 1000"));
  ModelConfig terms = small("soc", "1", 5, 8, 10, "soc");
  terms.eval_terms = 1000000000;  // a hang, not more accuracy
  CHECK_THROWS_WITH(terms.validate(), Catch::Contains("series terms must be in 1..100"));
  // The paper's model is far from every bound.
  CHECK_NOTHROW(small("gs-soc", "4,1", 40, 32, 100, "soc").validate());
}

TEST_CASE("thread counts are bounded by the processors this process may use", "[limits]") {
  REQUIRE(max_thread_count() >= 1);
  CHECK_NOTHROW(require_thread_count(0));
  CHECK_NOTHROW(require_thread_count(max_thread_count()));
  CHECK_THROWS_WITH(require_thread_count(max_thread_count() + 1),
                    Catch::StartsWith("threads ") && Catch::Contains("processors"));
  CHECK_THROWS_WITH(require_thread_count(100000, "--jobs"), Catch::Contains("--jobs 100000"));
  CHECK_THROWS_AS(require_thread_count(-1), ConfigError);
}

TEST_CASE("group counts are parsed strictly and named in the message", "[limits][settings]") {
  CHECK(GroupCounts::parse("4,1") == GroupCounts{4, 1});
  CHECK(GroupCounts::parse("4,-") == GroupCounts{4, std::nullopt});
  CHECK(GroupCounts::parse("4") == GroupCounts{4, std::nullopt});
  for (const GroupCounts& g : {GroupCounts{4, 1}, GroupCounts{2, std::nullopt}, GroupCounts{16, 8}}) {
    INFO(g.text());
    CHECK(GroupCounts::parse(g.text()) == g);  // the one text form reads back
  }
  CHECK(GroupCounts{4, 1}.text() == "4,1");
  CHECK(GroupCounts{4, std::nullopt}.text() == "4,-");
  for (const char* bad : {"", "x", "4,x", "0", "4,0", "-4", " 4", "4,", "99999999999999999999", "4,1,1"}) {
    INFO("'" << bad << "'");
    CHECK_THROWS_WITH(GroupCounts::parse(bad, "metadata 'model.groups'"),
                      Catch::Contains("metadata 'model.groups'") && !Catch::Contains("stoll"));
    try {
      GroupCounts::parse(bad);
      FAIL("no error for '" << bad << "'");
    } catch (const SettingError& e) {  // the command line writes it as --groups
      CHECK(e.settings() == std::vector<std::string>{"groups"});
      CHECK(std::string(e.what()).find('\n') == std::string::npos);
      CHECK(e.message([](const std::string& key) { return "--" + key; }).rfind("--groups: ", 0) == 0);
    }
  }
  CHECK(default_groups(ConvKind::soc) == GroupCounts{1, std::nullopt});
  CHECK(default_groups(ConvKind::gs_soc) == GroupCounts{4, 1});
  ModelConfig c;
  CHECK(c.groups_text() == "4,1");
  c.groups = GroupCounts{4, std::nullopt};
  CHECK(c.groups_text() == "4,-");
  c.conv = ConvKind::soc;
  CHECK(c.groups_text() == "4");
}

namespace {

// parse(name(value)) == value for every value, and bad text throws one SettingError line naming `setting`.
template <typename Enum, typename Parse, typename Name>
void check_setting_pair(const std::vector<Enum>& values, Parse parse, Name name, const std::string& setting) {
  std::vector<std::string> names;
  for (Enum value : values) {
    INFO(name(value));
    CHECK(parse(name(value)) == value);
    names.push_back(name(value));
  }
  std::sort(names.begin(), names.end());
  CHECK(std::adjacent_find(names.begin(), names.end()) == names.end());  // distinct names
  for (const std::string bad : {"", "foo", "SOC", " soc", "gs_soc", "maxmin ", "first,"}) {
    INFO("'" << bad << "'");
    try {
      parse(bad);
      FAIL("no error for '" << bad << "'");
    } catch (const SettingError& e) {
      const std::string what = e.what();
      CHECK(e.settings() == std::vector<std::string>{setting});
      CHECK(what.rfind(setting + " must be ", 0) == 0);
      CHECK(what.find("'" + bad + "'") != std::string::npos);
      CHECK(what.find('\n') == std::string::npos);
      CHECK(what.find("--") == std::string::npos);  // a setting, not a flag
    }
  }
}

}  // namespace

TEST_CASE("conv kind, activation, head and keep parse what their names write, and name the setting otherwise",
          "[limits][settings]") {
  check_setting_pair<ConvKind>({ConvKind::soc, ConvKind::gs_soc}, parse_conv_kind, conv_kind_name, "conv");
  check_setting_pair<ActivationKind>({ActivationKind::maxmin, ActivationKind::maxmin_paired}, parse_activation,
                                     activation_name, "activation");
  check_setting_pair<HeadKind>({HeadKind::soc, HeadKind::lln}, parse_head, head_name, "head");
  check_setting_pair<KeepChannels>({KeepChannels::first, KeepChannels::per_group}, parse_keep, keep_name,
                                   "downsample_keep");
  check_setting_pair<Device>({Device::cpu, Device::cuda}, parse_device, device_name, "device");
  check_setting_pair<ConvPrecision>({ConvPrecision::fp32, ConvPrecision::tf32, ConvPrecision::bf16},
                                    parse_conv_precision, conv_precision_name, "precision");
  // The names are the text the command line, config.json and checkpoints have always used.
  CHECK(conv_kind_name(ConvKind::gs_soc) == "gs-soc");
  CHECK(activation_name(ActivationKind::maxmin_paired) == "maxmin-paired");
  CHECK(head_name(HeadKind::lln) == "lln");
}

TEST_CASE("the default ModelConfig is valid for every conv kind, with that kind's default groups",
          "[limits][settings]") {
  for (ConvKind conv : {ConvKind::soc, ConvKind::gs_soc}) {
    INFO(conv_kind_name(conv));
    ModelConfig c;
    c.conv = conv;
    CHECK_FALSE(c.groups.has_value());
    CHECK(c.group_counts() == default_groups(conv));
    CHECK_NOTHROW(c.validate());
    c.depth = 5;
    c.init_channels = 4;
    c.classes = 10;
    c.init_iterations = 0;  // shapes only
    LipConvnet model(c);
    int64_t convolutions = 0;
    for (const NetworkStep& step : model.steps())
      if (step.soc && step.name != "head") ++convolutions;
    // soc: one SocConv per block; gs-soc (4,1): two.
    CHECK(convolutions == (conv == ConvKind::soc ? 5 : 10));
    CHECK(model.config().architecture().find(conv == ConvKind::soc ? "conv=soc " : "conv=gs-soc(4,1) ") !=
          std::string::npos);
  }
  // Groups given explicitly still win; a pair stays refused for conv soc.
  ModelConfig soc;
  soc.conv = ConvKind::soc;
  soc.groups = GroupCounts{4, 1};
  CHECK_THROWS_AS(soc.validate(), ConfigError);
  soc.groups = GroupCounts{2, std::nullopt};
  CHECK_NOTHROW(soc.validate());
  CHECK(soc.conv_label() == "soc(g2)");
}

TEST_CASE("check_tensor_values refuses NaN, infinities and norms beyond float32, naming file, tensor and index",
          "[limits]") {
  CheckpointTensor t{{4}, {0.5f, -1.0f, 2.0f, 0.0f}};
  CHECK_NOTHROW(check_tensor_values(t, "head.bias", "f.safetensors"));
  t.values[2] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(check_tensor_values(t, "head.bias", "f.safetensors"), Catch::Contains("f.safetensors") &&
                                                                              Catch::Contains("'head.bias'") &&
                                                                              Catch::Contains("NaN at index 2 of 4"));
  t.values[2] = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(check_tensor_values(t, "head.bias", "f.safetensors"), Catch::Contains("an infinity at index 2"));
  // One value of 3e38 is finite, but its square is not representable in float32.
  t.values[2] = 3e38f;
  CHECK_THROWS_WITH(check_tensor_values(t, "head.bias", "f.safetensors"),
                    Catch::Contains("too large for float32") && Catch::Contains("index 2"));
  // Neither are many values whose squares add up beyond it.
  CheckpointTensor many{{1000}, std::vector<float>(1000, 1e18f)};
  CHECK_THROWS_AS(check_tensor_values(many, "w", "f"), IoError);
  many.values.assign(1000, 1e17f);  // squared norm 1e37: fine
  CHECK_NOTHROW(check_tensor_values(many, "w", "f"));
}

TEST_CASE("metadata integers are read strictly within their range", "[limits]") {
  Checkpoint c;
  c.metadata["ok"] = "15";
  c.metadata["negative"] = "-1";
  c.metadata["spaces"] = " 15";
  c.metadata["float"] = "1e3";
  c.metadata["huge"] = "99999999999999999999";
  c.metadata["octal"] = "015";
  CHECK(metadata_int(c, "ok", "f", 5, 1000) == 15);
  CHECK(metadata_int(c, "octal", "f", 5, 1000) == 15);  // decimal, always
  for (const char* key : {"negative", "spaces", "float", "huge"}) {
    INFO(key);
    CHECK_THROWS_WITH(metadata_int(c, key, "f", 0, 1000), Catch::Contains(std::string("'") + key + "'"));
  }
  CHECK_THROWS_WITH(metadata_int(c, "ok", "f", 16, 1000), Catch::Contains("16..1000"));
  CHECK_THROWS_WITH(metadata_int(c, "missing", "f", 0, 1), Catch::Contains("missing metadata 'missing'"));
  CHECK(metadata_uint64(c, "ok", "f") == 15u);
  CHECK_THROWS_AS(metadata_uint64(c, "negative", "f"), IoError);
}
