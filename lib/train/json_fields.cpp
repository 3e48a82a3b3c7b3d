// Strict JSON field readers. See json_fields.hpp.
#include "train/json_fields.hpp"

#include <cmath>

#include "orthoconv/error.hpp"

namespace orthoconv {

using nlohmann::json;

int64_t json_integer(const json& value, const std::string& key, int64_t min, int64_t max) {
  int64_t out = 0;
  bool ok = false;
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    ok = u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    out = ok ? static_cast<int64_t>(u) : 0;
  } else if (value.is_number_integer()) {
    out = value.get<int64_t>();
    ok = true;
  }
  if (!ok || out < min || out > max)
    throw ConfigError("'" + key + "' must be an integer in " + std::to_string(min) + ".." + std::to_string(max) +
                      ", got " + value.dump());
  return out;
}

int64_t json_int(const json& j, const std::string& key, int64_t min, int64_t max) {
  return json_integer(j.at(key), key, min, max);
}

double json_number(const json& j, const std::string& key) {
  const json& value = j.at(key);
  if (!value.is_number() || !std::isfinite(value.get<double>()))
    throw ConfigError("'" + key + "' must be a finite number, got " + value.dump());
  return value.get<double>();
}

std::string json_string(const json& j, const std::string& key, const std::string& fallback) {
  if (!j.contains(key)) return fallback;
  const json& value = j.at(key);
  if (!value.is_string()) throw ConfigError("'" + key + "' must be a string, got " + value.dump());
  return value.get<std::string>();
}

std::vector<float> json_floats(const json& j, const std::string& key, size_t count) {
  const json& value = j.at(key);
  std::vector<float> out;
  if (value.is_array() && value.size() == count)
    for (const json& x : value)
      if (x.is_number() && std::fabs(x.get<double>()) <= std::numeric_limits<float>::max())
        out.push_back(static_cast<float>(x.get<double>()));
  if (out.size() != count)
    throw ConfigError("'" + key + "' must hold " + std::to_string(count) + " finite float32 numbers, got " +
                      value.dump());
  return out;
}

uint64_t json_uint64(const json& j, const std::string& key) {
  const json& value = j.at(key);
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer() && value.get<int64_t>() >= 0) return static_cast<uint64_t>(value.get<int64_t>());
  throw ConfigError("'" + key + "' must be a non-negative integer, got " + value.dump());
}

}  // namespace orthoconv
