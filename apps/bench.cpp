#include "commands.hpp"
namespace orthoconv::apps {
Runner register_bench(CLI::App& app) {
  app.add_subcommand("bench", "Benchmarks (JSON output)");
  return [] { return 0; };
}
}  // namespace orthoconv::apps
