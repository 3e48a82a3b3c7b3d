// Limits and corrupt values: every size is checked against what the machine can hold before anything is allocated
// or multiplied (one ConfigError naming the setting, never std::bad_alloc or the OOM killer), thread counts are
// bounded by the processors, and values a trained model cannot hold (NaN, infinities, squared norms beyond float32)
// are refused naming the file and the tensor.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>

#include "orthoconv/limits.hpp"
#include "orthoconv/model.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/runtime.hpp"

using namespace orthoconv;

namespace {

ModelConfig small(const std::string& conv, const std::string& groups, int64_t depth, int64_t width, int64_t classes,
                  const std::string& head) {
  ModelConfig c;
  c.conv = conv;
  const GroupCounts g = parse_groups(groups);
  c.groups_first = g.first;
  c.groups_second = g.second;
  c.depth = depth;
  c.init_channels = width;
  c.classes = classes;
  c.head = head;
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
                    Catch::Contains("--threads") && Catch::Contains("processors"));
  CHECK_THROWS_WITH(require_thread_count(100000, "--jobs"), Catch::Contains("--jobs 100000"));
  CHECK_THROWS_AS(require_thread_count(-1), ConfigError);
}

TEST_CASE("group counts are parsed strictly and named in the message", "[limits]") {
  CHECK(parse_groups("4,1").first == 4);
  CHECK(parse_groups("4,1").second == std::optional<int64_t>(1));
  CHECK_FALSE(parse_groups("4,-").second.has_value());
  CHECK_FALSE(parse_groups("4").second.has_value());
  for (const char* bad : {"", "x", "4,x", "0", "4,0", "-4", " 4", "4,", "99999999999999999999", "4,1,1"}) {
    INFO("'" << bad << "'");
    CHECK_THROWS_WITH(parse_groups(bad, "metadata 'model.groups'"),
                      Catch::Contains("metadata 'model.groups'") && !Catch::Contains("stoll"));
  }
  CHECK(default_groups("soc") == "1");
  CHECK(default_groups("gs-soc") == "4,1");
  ModelConfig c;
  CHECK(c.groups_text() == "4,1");
  c.groups_second.reset();
  CHECK(c.groups_text() == "4,-");
  c.conv = "soc";
  CHECK(c.groups_text() == "4");
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
