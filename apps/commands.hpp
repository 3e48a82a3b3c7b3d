// The orthoconv subcommands: each file registers one with the CLI11 app and runs it.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace orthoconv::apps {

// Each register_* adds a subcommand to `app` and returns the function that runs it once parsed.
using Runner = std::function<int()>;
Runner register_verify(CLI::App& app);
Runner register_bench(CLI::App& app);

// "4,1" -> (4, 1); "4,-" or "4" -> (4, none). Throws orthoconv::Error on anything else.
struct GroupPair {
  int64_t first = 1;
  bool has_second = false;
  int64_t second = 1;
};
GroupPair parse_groups(const std::string& text);

}  // namespace orthoconv::apps
