// Helpers for tests that run the real `orthoconv` binary (or a script), read files back or use the real dataset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "orthoconv/data.hpp"

namespace orthoconv::testing {

// A fresh, empty directory under the system's temporary directory (unique per process and object), removed with
// everything in it when the object goes.
struct TempDir {
  std::filesystem::path path;
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::vector<std::string> entries() const;  // the names in it, sorted
};

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
// A directory with a CIFAR-100-shaped train.bin (50,000 records) and test.bin (10,000): pseudo-random pixels, fine
// labels 0..9 (for 10-class test models). Written once into the test binary directory and shared (read only) by
// the tests that run `orthoconv train` or `certify` on data without depending on the real dataset.
std::string synthetic_cifar100_dir();
// `orthoconv train` arguments of a tiny 10-class run (LipConvnet-5 SOC, width 8, lr 0.05, one thread) on
// synthetic_cifar100_dir(), writing to `out`.
std::vector<std::string> tiny_train_args(const std::string& out, int64_t epochs, int64_t batch, int64_t train_subset,
                                         int64_t test_subset);
// An in-memory CIFAR-like split: `images` records of pseudo-random pixels and fine labels < classes (from seed).
CifarSplit synthetic_split(int64_t images, int64_t classes, uint64_t seed);

}  // namespace orthoconv::testing
