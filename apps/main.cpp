// orthoconv: the command line. main() is the only place that catches orthoconv::Error: one line, exit 1.
#include <cstdio>
#include <algorithm>
#include <map>
#include <vector>
#include <string>

#include "commands.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv::apps {

GroupPair parse_groups(const std::string& text) {
  GroupPair out;
  auto comma = text.find(',');
  auto parse_positive = [&](const std::string& part) -> int64_t {
    size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    require(used == part.size() && !part.empty() && value > 0, "--groups: expected 'a,b', 'a,-' or 'a' with positive "
            "integers, got '", text, "'");
    return value;
  };
  out.first = parse_positive(text.substr(0, comma));
  if (comma != std::string::npos) {
    std::string second = text.substr(comma + 1);
    if (second != "-") {
      out.has_second = true;
      out.second = parse_positive(second);
    }
  }
  return out;
}

namespace {
std::vector<std::pair<std::string, Setup>>& command_table() {
  static std::vector<std::pair<std::string, Setup>> table;
  return table;
}
}  // namespace

bool register_command(const std::string& name, Setup setup) {
  command_table().emplace_back(name, std::move(setup));
  return true;
}

}  // namespace orthoconv::apps

int main(int argc, char** argv) {
  CLI::App app{"orthoconv: train and certify 1-Lipschitz convolutional networks built from orthogonal convolutions"};
  app.require_subcommand(1);
  std::map<std::string, orthoconv::apps::Runner> runners;
  auto table = orthoconv::apps::command_table();
  std::sort(table.begin(), table.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [name, setup] : table) runners[name] = setup(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "orthoconv: %s (see --help)\n", e.what());
    return 2;
  }
  try {
    for (auto* sub : app.get_subcommands()) return runners.at(sub->get_name())();
  } catch (const orthoconv::Error& e) {
    std::fprintf(stderr, "orthoconv: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "orthoconv: unexpected error: %s\n", e.what());
    return 1;
  }
  return 1;
}
