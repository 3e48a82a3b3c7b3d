// Helpers for tests that run the real `orthoconv` binary (or a script), read files back or use the real dataset.
#pragma once

#include <cstddef>
#include <string>

namespace orthoconv::testing {

struct CliResult {
  int exit_code = -1;
  std::string out, err;
};

// The whole file (binary), or "" when it cannot be read.
std::string slurp(const std::string& path);
// Runs a shell command line (trusted: written in the tests), capturing stdout and stderr apart.
CliResult run_command(const std::string& command_line);
// Runs the CLI (ORTHOCONV_CLI_PATH) with `args` (shell words, trusted: written in the tests), capturing stdout and
// stderr apart. Throws when this build has no CLI.
CliResult run_cli(const std::string& args);
// Lines in `text` (a last line without '\n' counts).
size_t line_count(const std::string& text);
// The shared read-only copy of the real CIFAR-100 ($ORTHOCONV_DATA, else ../shared/cifar100/cifar-100-binary next
// to the repository), or "" when this machine has none.
std::string real_data_dir();

}  // namespace orthoconv::testing
