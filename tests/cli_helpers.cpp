#include "cli_helpers.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace orthoconv::testing {

TempDir::TempDir() {
  static int counter = 0;
  path = std::filesystem::temp_directory_path() /
         ("orthoconv-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::filesystem::remove_all(path);
  std::filesystem::create_directories(path);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

std::vector<std::string> TempDir::entries() const {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(path)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

CliResult run_command(const std::string& command_line) {
  static int counter = 0;
  const std::string base =
      std::string(ORTHOCONV_TEST_BINARY_DIR) + "/cli-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
  const std::string command = command_line + " >'" + base + ".out' 2>'" + base + ".err'";
  const int status = std::system(command.c_str());
  CliResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  r.out = slurp(base + ".out");
  r.err = slurp(base + ".err");
  std::remove((base + ".out").c_str());
  std::remove((base + ".err").c_str());
  return r;
}

CliResult run_cli(const std::string& args) {
#ifdef ORTHOCONV_CLI_PATH
  return run_command(std::string("'") + ORTHOCONV_CLI_PATH + "' " + args);
#else
  (void)args;
  throw std::runtime_error("this build has no orthoconv command line");
#endif
}

size_t line_count(const std::string& text) {
  size_t lines = 0;
  for (char c : text) lines += c == '\n';
  if (!text.empty() && text.back() != '\n') ++lines;
  return lines;
}

std::string real_data_dir() {
  namespace fs = std::filesystem;
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("ORTHOCONV_DATA"); env != nullptr && *env != '\0') candidates.push_back(env);
#ifdef ORTHOCONV_SOURCE_DIR
  candidates.push_back(std::string(ORTHOCONV_SOURCE_DIR) + "/../shared/cifar100/cifar-100-binary");
#endif
  candidates.push_back("../shared/cifar100/cifar-100-binary");
  for (const auto& dir : candidates) {
    std::error_code ec;
    if (fs::is_regular_file(fs::path(dir) / "train.bin", ec) && fs::is_regular_file(fs::path(dir) / "test.bin", ec))
      return dir;
  }
  return "";
}

std::string synthetic_cifar100_dir() {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(ORTHOCONV_TEST_BINARY_DIR) / "synthetic-cifar100";
  std::error_code ec;
  if (fs::exists(dir / "test.bin", ec)) return dir.string();
  // Built under a private name and renamed into place: concurrent test processes never see half a dataset.
  const fs::path building = dir.string() + ".building-" + std::to_string(getpid());
  fs::create_directories(building);
  uint64_t state = 0x2545f4914f6cdd1dULL;
  for (const auto& [name, records] : {std::pair<const char*, int>{"train.bin", 50000}, {"test.bin", 10000}}) {
    std::vector<char> bytes(static_cast<size_t>(records) * 3074);
    for (int r = 0; r < records; ++r) {
      char* record = bytes.data() + static_cast<size_t>(r) * 3074;
      record[0] = static_cast<char>(r % 20);
      record[1] = static_cast<char>(r % 10);
      for (int i = 2; i < 3074; i += 8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        for (int b = 0; b < 8 && i + b < 3074; ++b) record[i + b] = static_cast<char>(state >> (8 * b));
      }
    }
    std::ofstream(building / name, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  fs::rename(building, dir, ec);
  if (ec) fs::remove_all(building, ec);  // another process was first
  return dir.string();
}

CifarSplit synthetic_split(int64_t images, int64_t classes, uint64_t seed) {
  CifarSplit s;
  s.path = "synthetic";
  std::mt19937_64 rng(seed);
  s.pixels.resize(static_cast<size_t>(images * kCifarPixels));
  for (auto& p : s.pixels) p = static_cast<uint8_t>(rng() & 0xff);
  for (int64_t i = 0; i < images; ++i) {
    s.fine_labels.push_back(static_cast<int32_t>(rng() % static_cast<uint64_t>(classes)));
    s.coarse_labels.push_back(0);
  }
  return s;
}

std::vector<std::string> tiny_train_args(const std::string& out, int64_t epochs, int64_t batch, int64_t train_subset,
                                         int64_t test_subset) {
  return {"train",
          "--conv",
          "soc",
          "--groups",
          "1",
          "--depth",
          "5",
          "--width",
          "8",
          "--classes",
          "10",
          "--epochs",
          std::to_string(epochs),
          "--batch",
          std::to_string(batch),
          "--train-subset",
          std::to_string(train_subset),
          "--test-subset",
          std::to_string(test_subset),
          "--lr",
          "0.05",
          "--threads",
          "1",
          "--data",
          synthetic_cifar100_dir(),
          "--out",
          out};
}

}  // namespace orthoconv::testing
