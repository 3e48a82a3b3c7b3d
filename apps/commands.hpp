// The orthoconv subcommands. Each apps/<name>.cpp defines one and registers it with a static
//   const bool registered = orthoconv::apps::register_command("name", setup);
// where setup(app) adds the CLI11 subcommand (options bound to its own state) and returns the function that
// runs it once parsed. main() parses, runs, and is the only place that catches orthoconv::Error.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <string>

namespace orthoconv::apps {

using Runner = std::function<int()>;
using Setup = std::function<Runner(CLI::App& app)>;
bool register_command(const std::string& name, Setup setup);

// The flag of a setting the library names by its config.json key (NamesSettings, SettingError): "weight_decay" ->
// "--weight-decay".
inline std::string flag_name(std::string key) {
  for (char& ch : key)
    if (ch == '_') ch = '-';
  return "--" + key;
}

}  // namespace orthoconv::apps
