// orthoconv: the command line. main() is the only place that catches orthoconv::Error: one line, exit 1.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <algorithm>
#include <map>
#include <new>
#include <vector>
#include <string>

#include "commands.hpp"
#include "orthoconv/communicator.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv::apps {

namespace {
std::vector<std::pair<std::string, Setup>>& command_table() {
  static std::vector<std::pair<std::string, Setup>> table;
  return table;
}

// CLI11 (2.1) reads "" as 0, "015" as octal 13, "0x10" as 16, saturates "99999999999999999999" and wraps "-1"
// into an unsigned: every numeric option gets this check first, which accepts only plain decimal numbers in range
// and hands CLI11 the canonical text.
CLI::Validator strict_number(const std::string& type) {
  return CLI::Validator(
      [type](std::string& text) -> std::string {
        const char* begin = text.data();
        const char* end = text.data() + text.size();
        if (text.empty()) return "an empty value is not a number";
        if (type == "FLOAT") {
          double value = 0;
          const auto [stop, error] = std::from_chars(begin, end, value);
          if (error == std::errc::result_out_of_range) return "'" + text + "' is out of range";
          if (error != std::errc() || stop != end) return "'" + text + "' is not a number";
          // No setting needs more, and CLI11 would narrow a larger value to float with undefined behaviour.
          if (std::isfinite(value) && std::fabs(value) > std::numeric_limits<float>::max())
            return "'" + text + "' is out of range";
          return "";
        }
        if (type == "UINT" && text[0] == '-') return "'" + text + "' is negative";
        std::string canonical;
        std::from_chars_result parsed{};
        if (type == "UINT") {
          uint64_t value = 0;
          parsed = std::from_chars(begin, end, value);
          canonical = std::to_string(value);
        } else {
          int64_t value = 0;
          parsed = std::from_chars(begin, end, value);
          canonical = std::to_string(value);
        }
        if (parsed.ec == std::errc::result_out_of_range) return "'" + text + "' is out of range";
        if (parsed.ec != std::errc() || parsed.ptr != end) return "'" + text + "' is not a decimal integer";
        text = canonical;  // "015" -> "15": CLI11 would read a leading 0 as octal
        return "";
      },
      "", "strict " + type);
}

void add_strict_numbers(CLI::App& app) {
  for (CLI::Option* option : app.get_options()) {
    const std::string type = option->get_type_name();
    if (type == "INT" || type == "UINT" || type == "FLOAT") {
      // Checks run before conversion, in the order added: this one must come first.
      option->transform(strict_number(type));
    }
  }
  for (CLI::App* sub : app.get_subcommands({})) add_strict_numbers(*sub);
}

std::string command_path(const CLI::App* app) {
  std::string path;
  for (; app != nullptr; app = app->get_parent()) path = app->get_name() + (path.empty() ? "" : " " + path);
  return path;
}

// `orthoconv foo`: CLI11 only says that a subcommand is required. Names the word and the commands it may be.
std::string unknown_subcommand(CLI::App& app, int argc, char** argv) {
  CLI::App* current = &app;
  for (int i = 1; i < argc; ++i) {
    const std::string word = argv[i];
    if (word.empty() || word[0] == '-') return "";
    const auto subs = current->get_subcommands({});
    if (subs.empty()) return "";
    auto match = std::find_if(subs.begin(), subs.end(), [&](CLI::App* s) { return s->get_name() == word; });
    if (match == subs.end()) {
      std::string names;
      for (CLI::App* s : subs) names += (names.empty() ? "" : ", ") + s->get_name();
      return "unknown subcommand '" + word + "' for '" + command_path(current) + "' (one of: " + names + ")";
    }
    current = *match;
  }
  return "";
}

// CLI11 lists unexpected words in reverse ("not expected: -1 --lr"): name the unknown option, and where.
std::string unexpected_arguments(CLI::App& app) {
  CLI::App* deepest = &app;
  for (auto parsed = app.get_subcommands(); !parsed.empty(); parsed = deepest->get_subcommands())
    deepest = parsed.front();
  const std::vector<std::string> rest = deepest->remaining(false);
  if (rest.empty()) return "";
  const std::string path = command_path(deepest);
  for (const std::string& word : rest)
    if (word.size() > 1 && word[0] == '-')
      return "unknown option '" + word + "' for '" + path + "' (see " + path + " --help)";
  return "unexpected argument '" + rest.front() + "' for '" + path + "' (see " + path + " --help)";
}

}  // namespace

// One line on stderr, and exit code 1. In a job of several ranks the line names the rank, and the whole job ends
// (MPI_Abort): the other ranks may be waiting for this one in a collective, and must not wait forever.
int fail(const char* kind, const char* message) {
  const std::shared_ptr<Communicator> job = current_communicator();
  if (job && job->size() > 1) {
    std::fprintf(stderr, "orthoconv: rank %d of %d: %s%s\n", job->rank(), job->size(), kind, message);
    std::fflush(stderr);
    job->abort_job(1);
  }
  std::fprintf(stderr, "orthoconv: %s%s\n", kind, message);
  return 1;
}

bool register_command(const std::string& name, Setup setup) {
  command_table().emplace_back(name, std::move(setup));
  return true;
}

namespace {

int run_command_line(int argc, char** argv) {
  CLI::App app{"orthoconv: train and certify 1-Lipschitz convolutional networks built from orthogonal convolutions",
               "orthoconv"};
  app.require_subcommand(1);
  std::map<std::string, Runner> runners;
  auto table = command_table();
  std::sort(table.begin(), table.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [name, setup] : table) runners[name] = setup(app);
  add_strict_numbers(app);
  if (const std::string unknown = unknown_subcommand(app, argc, argv); !unknown.empty()) {
    std::fprintf(stderr, "orthoconv: %s\n", unknown.c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ExtrasError& e) {
    const std::string named = unexpected_arguments(app);
    std::fprintf(stderr, "orthoconv: %s\n", named.empty() ? e.what() : named.c_str());
    return 2;
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "orthoconv: %s (see --help)\n", e.what());
    return 2;
  }
  try {
    for (auto* sub : app.get_subcommands()) return runners.at(sub->get_name())();
  } catch (const orthoconv::NamesSettings& e) {  // the library names settings; the user gave flags
    return orthoconv::apps::fail("error: ", e.message(orthoconv::apps::flag_name).c_str());
  } catch (const orthoconv::Error& e) {
    return fail("error: ", e.what());
  } catch (const std::bad_alloc&) {
    return fail("error: ", "out of memory (a setting too large for this machine?)");
  } catch (const std::exception& e) {
    return fail("unexpected error: ", e.what());
  }
  return 1;
}

}  // namespace

}  // namespace orthoconv::apps

// Whatever escapes the command line's own handlers (the CLI's set-up itself, or a failing report of an error) still
// ends in one line and a non-zero exit, never in std::terminate.
int main(int argc, char** argv) {
  try {
    return orthoconv::apps::run_command_line(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "orthoconv: unexpected error: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "orthoconv: unexpected error\n");
  }
  return 1;
}
