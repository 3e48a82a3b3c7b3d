// Every input committed for the fuzz harnesses, run through the same harness bodies in the ordinary test suite (and
// so under the sanitizer build too): the seed corpus (tests/fuzz/corpus) and every crash the fuzzer ever found
// (tests/fuzz/regressions, one file each, named after what it broke). A crash, a non-Error exception or a
// sanitizer report here is a regression.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz/fuzz_targets.hpp"

namespace fs = std::filesystem;

namespace {

std::vector<fs::path> inputs(const std::string& target) {
  std::vector<fs::path> files;
  for (const char* kind : {"corpus", "regressions"}) {
    const fs::path dir = fs::path(ORTHOCONV_SOURCE_DIR) / "tests" / "fuzz" / kind / target;
    if (!fs::is_directory(dir)) continue;
    for (const auto& entry : fs::directory_iterator(dir))
      if (entry.is_regular_file()) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

template <typename Harness>
void run_all(const std::string& target, Harness harness, size_t at_least) {
  const std::vector<fs::path> files = inputs(target);
  CHECK(files.size() >= at_least);  // the committed seeds are there
  for (const fs::path& file : files) {
    INFO(file.string());
    std::ifstream in(file, std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(harness(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()) == 0);
  }
}

}  // namespace

TEST_CASE("every committed checkpoint fuzz input (seeds and past crashes) is loaded or refused cleanly", "[fuzz]") {
  run_all("checkpoint", orthoconv::fuzz::checkpoint_input, 6);
}

TEST_CASE("every committed CIFAR fuzz input (seeds and past crashes) is loaded or refused cleanly", "[fuzz]") {
  run_all("cifar", orthoconv::fuzz::cifar_input, 4);
}
