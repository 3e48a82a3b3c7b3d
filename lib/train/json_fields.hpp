// Strict readers of the JSON fields the trainer stores (config.json, metrics lines, train.* checkpoint metadata).
// Internal to the library: an integer must be a JSON integer within [min, max] (nlohmann's get<int64_t> would
// truncate 1e300 or 2.5 silently), a number finite, a float within float32's range. ConfigError naming the key.
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace orthoconv {

constexpr int64_t kLargestInt64 = std::numeric_limits<int64_t>::max();
constexpr int64_t kLargestInt = std::numeric_limits<int>::max();

// `value` (named `key` in the message) as an integer in [min, max].
int64_t json_integer(const nlohmann::json& value, const std::string& key, int64_t min, int64_t max);
// j[key] as an integer in [min, max] (out_of_range when absent).
int64_t json_int(const nlohmann::json& j, const std::string& key, int64_t min, int64_t max);
// j[key] as a finite number.
double json_number(const nlohmann::json& j, const std::string& key);
// An optional string setting (absent: `fallback`), e.g. the precision of runs from before --precision existed.
std::string json_string(const nlohmann::json& j, const std::string& key, const std::string& fallback);
// `count` finite numbers within float32's range (converting a larger double to float is undefined behaviour).
std::vector<float> json_floats(const nlohmann::json& j, const std::string& key, size_t count);
// j[key] as a non-negative integer of up to 64 bits.
uint64_t json_uint64(const nlohmann::json& j, const std::string& key);

}  // namespace orthoconv
