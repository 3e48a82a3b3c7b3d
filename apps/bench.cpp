#include "commands.hpp"
namespace orthoconv::apps {
namespace {
Runner setup_bench(CLI::App& app) {
  app.add_subcommand("bench", "Benchmarks (JSON output)");
  return [] { return 0; };
}
}  // namespace

static const bool registered = register_command("bench", setup_bench);

}  // namespace orthoconv::apps
