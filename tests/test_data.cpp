// CIFAR-100 reading, augmentation and batching: the reader's validation (real files when present, small synthetic
// files otherwise), the crop/flip augmentation against a naive padded-image reference, and BatchLoader's
// contract (every index once per epoch, a pure function of (seed, epoch), a smaller last batch, early stop,
// worker errors reaching the caller).
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cli_helpers.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/error.hpp"

using namespace orthoconv;
namespace fs = std::filesystem;

namespace {

// The real splits, read once for the whole run (they are 180 MB).
const CifarSplit* real_split(const std::string& split) {
  static std::map<std::string, CifarSplit> cache;
  const std::string dir = orthoconv::testing::real_data_dir();
  if (dir.empty()) return nullptr;
  auto found = cache.find(split);
  if (found == cache.end()) found = cache.emplace(split, load_cifar100(dir, split)).first;
  return &found->second;
}

// A fresh, empty directory under the system temp dir, removed at scope exit.
using testing::TempDir;

// Writes `records` records whose labels come from the functions and whose pixels are a hash of (record, byte).
template <typename Coarse, typename Fine>
void write_records(const fs::path& file, int64_t records, Coarse coarse, Fine fine, int64_t drop_bytes = 0) {
  std::vector<char> bytes(static_cast<size_t>(records * kCifarRecord));
  for (int64_t r = 0; r < records; ++r) {
    char* record = bytes.data() + r * kCifarRecord;
    record[0] = static_cast<char>(coarse(r));
    record[1] = static_cast<char>(fine(r));
    for (int64_t i = 0; i < kCifarPixels; ++i) record[2 + i] = static_cast<char>((r * 131 + i * 7) & 0xff);
  }
  std::ofstream out(file, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() - static_cast<size_t>(drop_bytes)));
}

// Requires `call` to throw IoError whose message names `file` and contains `problem`.
template <typename Call>
void require_io_error(Call&& call, const std::string& file, const std::string& problem) {
  try {
    call();
    FAIL("expected IoError naming " << file);
  } catch (const IoError& error) {
    const std::string message = error.what();
    INFO("message: " << message);
    CHECK(message.find(file) != std::string::npos);
    CHECK(message.find(problem) != std::string::npos);
    CHECK(message.find('\n') == std::string::npos);
  }
}

// A synthetic in-memory split: image r has every pixel of channel c equal to (r * 3 + c) % 251, except a marker
// gradient, so that tests can tell images apart and see where each pixel came from.
CifarSplit synthetic_split(int64_t records) {
  CifarSplit split;
  split.path = "synthetic";
  split.pixels.resize(static_cast<size_t>(records * kCifarPixels));
  for (int64_t r = 0; r < records; ++r) {
    split.fine_labels.push_back(static_cast<int32_t>(r % kCifarClasses));
    split.coarse_labels.push_back(static_cast<int32_t>(r % 20));
    for (int64_t i = 0; i < kCifarPixels; ++i) {
      split.pixels[static_cast<size_t>(r * kCifarPixels + i)] = static_cast<uint8_t>((r * 37 + i * 13 + i / 32) & 0xff);
    }
  }
  return split;
}

std::vector<int64_t> iota_indices(int64_t count) {
  std::vector<int64_t> out(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out[static_cast<size_t>(i)] = i;
  return out;
}

// All batches of one epoch.
std::vector<Batch> epoch_batches(BatchLoader& loader, int64_t epoch, int64_t first_batch = 0) {
  loader.start_epoch(epoch, first_batch);
  std::vector<Batch> out;
  Batch batch;
  while (loader.next(batch)) {
    Batch copy;
    copy.images = Tensor::from_vector(batch.images.to_vector(), batch.images.shape());
    copy.labels = batch.labels;
    copy.indices = batch.indices;
    out.push_back(std::move(copy));
  }
  return out;
}

bool same_batches(const std::vector<Batch>& a, const std::vector<Batch>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].indices != b[i].indices || a[i].labels != b[i].labels) return false;
    if (a[i].images.shape() != b[i].images.shape()) return false;
    if (a[i].images.to_vector() != b[i].images.to_vector()) return false;  // bit for bit (no NaN here)
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Reader

TEST_CASE("load_cifar100 reads the real train and test files: record counts, label ranges, class balance", "[data]") {
  const std::string dir = orthoconv::testing::real_data_dir();
  if (dir.empty()) {
    WARN("real CIFAR-100 not found (set ORTHOCONV_DATA): skipped");
    return;
  }
  for (const auto& [name, records, per_class] :
       {std::tuple<std::string, int64_t, int64_t>{"train", 50000, 500}, {"test", 10000, 100}}) {
    const CifarSplit& split = *real_split(name);
    REQUIRE(split.size() == records);
    REQUIRE(split.pixels.size() == static_cast<size_t>(records * kCifarPixels));
    REQUIRE(split.coarse_labels.size() == static_cast<size_t>(records));
    CHECK(split.path == (fs::path(dir) / (name + ".bin")).string());
    std::vector<int64_t> fine_count(kCifarClasses, 0);
    for (int64_t i = 0; i < records; ++i) {
      REQUIRE(split.fine_labels[static_cast<size_t>(i)] >= 0);
      REQUIRE(split.fine_labels[static_cast<size_t>(i)] < kCifarClasses);
      REQUIRE(split.coarse_labels[static_cast<size_t>(i)] >= 0);
      REQUIRE(split.coarse_labels[static_cast<size_t>(i)] < 20);
      ++fine_count[static_cast<size_t>(split.fine_labels[static_cast<size_t>(i)])];
    }
    for (int64_t count : fine_count) CHECK(count == per_class);

    // The first and last records, against the file's own bytes.
    std::ifstream file(split.path, std::ios::binary);
    std::vector<char> first(kCifarRecord);
    std::vector<char> last(kCifarRecord);
    file.read(first.data(), kCifarRecord);
    file.seekg((records - 1) * kCifarRecord);
    file.read(last.data(), kCifarRecord);
    REQUIRE(file.good());
    CHECK(split.coarse_labels[0] == static_cast<uint8_t>(first[0]));
    CHECK(split.fine_labels[0] == static_cast<uint8_t>(first[1]));
    CHECK(std::equal(split.pixels.begin(), split.pixels.begin() + kCifarPixels, first.begin() + 2,
                     [](uint8_t a, char b) { return a == static_cast<uint8_t>(b); }));
    CHECK(split.fine_labels.back() == static_cast<uint8_t>(last[1]));
    CHECK(std::equal(split.pixels.end() - kCifarPixels, split.pixels.end(), last.begin() + 2,
                     [](uint8_t a, char b) { return a == static_cast<uint8_t>(b); }));
  }
  // Known values of the official files: train record 0 is coarse 11, fine 19 (cattle); test record 0 is
  // coarse 10, fine 49 (mountain).
  CHECK(real_split("train")->coarse_labels[0] == 11);
  CHECK(real_split("train")->fine_labels[0] == 19);
  CHECK(real_split("test")->coarse_labels[0] == 10);
  CHECK(real_split("test")->fine_labels[0] == 49);
}

TEST_CASE(
    "load_cifar100 rejects a missing file, a truncated file, a wrong record count and bad labels, naming the "
    "file",
    "[data]") {
  TempDir dir;
  const std::string test_file = (dir.path / "test.bin").string();
  const std::string train_file = (dir.path / "train.bin").string();
  auto ok_coarse = [](int64_t r) { return r % 20; };
  auto ok_fine = [](int64_t r) { return r % 100; };

  SECTION("missing file") {
    require_io_error([&] { load_cifar100(dir.path.string(), "test"); }, test_file, "not found");
    require_io_error([&] { load_cifar100(dir.path.string(), "train"); }, train_file, "not found");
  }
  SECTION("a valid synthetic test file loads") {
    write_records(test_file, 10000, ok_coarse, ok_fine);
    const CifarSplit split = load_cifar100(dir.path.string(), "test");
    CHECK(split.size() == 10000);
    CHECK(split.fine_labels[123] == 23);
    CHECK(split.coarse_labels[123] == 3);
    CHECK(split.pixels[123 * kCifarPixels + 5] == static_cast<uint8_t>((123 * 131 + 5 * 7) & 0xff));
  }
  SECTION("truncated: size not a multiple of the record") {
    write_records(test_file, 10000, ok_coarse, ok_fine, /*drop_bytes=*/100);
    require_io_error([&] { load_cifar100(dir.path.string(), "test"); }, test_file, "not a multiple of the 3074");
  }
  SECTION("whole records but not the expected count") {
    write_records(test_file, 100, ok_coarse, ok_fine);
    require_io_error([&] { load_cifar100(dir.path.string(), "test"); }, test_file, "holds 100 records, expected 10000");
    write_records(train_file, 10000, ok_coarse, ok_fine);  // a test-sized file named train.bin
    require_io_error([&] { load_cifar100(dir.path.string(), "train"); }, train_file, "expected 50000");
  }
  SECTION("empty file") {
    write_records(test_file, 0, ok_coarse, ok_fine);
    require_io_error([&] { load_cifar100(dir.path.string(), "test"); }, test_file, "holds 0 records");
  }
  SECTION("fine label out of range") {
    write_records(test_file, 10000, ok_coarse, [](int64_t r) { return r == 9876 ? 100 : r % 100; });
    require_io_error([&] { load_cifar100(dir.path.string(), "test"); }, test_file,
                     "record 9876: fine label 100 out of range 0..99");
  }
  SECTION("coarse label out of range") {
    write_records(
        test_file, 10000, [](int64_t r) { return r == 0 ? 255 : r % 20; }, ok_fine);
    require_io_error([&] { load_cifar100(dir.path.string(), "test"); }, test_file,
                     "record 0: coarse label 255 out of range 0..19");
  }
  SECTION("a directory where the file should be") {
    fs::create_directories(test_file);
    require_io_error([&] { load_cifar100(dir.path.string(), "test"); }, test_file, "not a regular file");
  }
  SECTION("an unknown split name is a configuration error") {
    CHECK_THROWS_AS(load_cifar100(dir.path.string(), "validation"), ConfigError);
  }
}

// Sets an environment variable (or unsets it, for nullptr) for one scope.
struct ScopedEnv {
  std::string name;
  std::optional<std::string> saved;
  ScopedEnv(const std::string& variable, const char* value) : name(variable) {
    if (const char* old = std::getenv(name.c_str())) saved = old;
    if (value)
      ::setenv(name.c_str(), value, 1);
    else
      ::unsetenv(name.c_str());
  }
  ~ScopedEnv() {
    if (saved)
      ::setenv(name.c_str(), saved->c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
};

TEST_CASE("find_cifar100 returns a directory holding both files and otherwise says what is wrong", "[data]") {
  TempDir dir;
  // A hint without the files: an error naming the hint and the missing file.
  require_io_error([&] { find_cifar100(dir.path.string()); }, dir.path.string(), "has no train.bin");
  std::ofstream(dir.path / "train.bin") << "x";
  require_io_error([&] { find_cifar100(dir.path.string()); }, dir.path.string(), "has no test.bin");
  // A directory where a file should be is named as such.
  fs::create_directories(dir.path / "test.bin");
  require_io_error([&] { find_cifar100(dir.path.string()); }, dir.path.string(), "holds test.bin as a directory");
  fs::remove(dir.path / "test.bin");
  require_io_error([&] { find_cifar100((dir.path / "train.bin").string()); }, "train.bin", "is not a directory");
  require_io_error([&] { find_cifar100((dir.path / "nowhere").string()); }, "nowhere", "does not exist");
  // Both files present (their contents are not checked here; load_cifar100 does that).
  std::ofstream(dir.path / "test.bin") << "x";
  CHECK(find_cifar100(dir.path.string()) == dir.path.string());

  // $ORTHOCONV_DATA comes before the default locations.
  {
    ScopedEnv data("ORTHOCONV_DATA", dir.path.string().c_str());
    CHECK(find_cifar100() == dir.path.string());
  }
  {
    ScopedEnv data("ORTHOCONV_DATA", (dir.path / "nowhere").string().c_str());
    require_io_error([&] { find_cifar100(); }, (dir.path / "nowhere").string(), "ORTHOCONV_DATA");
  }
}

TEST_CASE("find_cifar100 searches ../shared, data/ and ~/.cache in that order, whatever exists around the test",
          "[data]") {
  // Every place searched lies inside this test's own directory tree: the working directory is root/work/cwd (so
  // ../shared is root/work/shared) and $HOME is root/home. Nothing outside it can change the outcome.
  TempDir root;
  const fs::path cwd = root.path / "work" / "cwd", home = root.path / "home";
  fs::create_directories(cwd);
  fs::create_directories(home);
  ScopedEnv data("ORTHOCONV_DATA", nullptr);
  ScopedEnv home_variable("HOME", home.string().c_str());
  const fs::path saved_cwd = fs::current_path();
  fs::current_path(cwd);
  struct Restore {
    fs::path path;
    ~Restore() { fs::current_path(path); }
  } restore{saved_cwd};
  auto make_dataset = [](const fs::path& where) {
    fs::create_directories(where);
    std::ofstream(where / "train.bin") << "x";
    std::ofstream(where / "test.bin") << "x";
  };

  // Nothing anywhere: the message lists every candidate.
  try {
    find_cifar100();
    FAIL("find_cifar100 found a dataset in an empty directory tree");
  } catch (const IoError& error) {
    const std::string message = error.what();
    CHECK(message.find("../shared/cifar100/cifar-100-binary") != std::string::npos);
    CHECK(message.find("data/cifar-100-binary") != std::string::npos);
    CHECK(message.find((home / ".cache/orthoconv/cifar-100-binary").string()) != std::string::npos);
  }
  make_dataset(home / ".cache/orthoconv/cifar-100-binary");
  CHECK(find_cifar100() == (home / ".cache/orthoconv/cifar-100-binary").string());
  make_dataset(cwd / "data/cifar-100-binary");
  CHECK(find_cifar100() == "data/cifar-100-binary");
  make_dataset(root.path / "work/shared/cifar100/cifar-100-binary");
  CHECK(find_cifar100() == "../shared/cifar100/cifar-100-binary");
}

// ---------------------------------------------------------------------------------------------------------------
// Normalization and augmentation

TEST_CASE("normalization: the reference's float32 arithmetic, and 1 / min(std) as its Lipschitz constant", "[data]") {
  Normalization norm;
  CHECK(norm.lipschitz() == 1.0 / static_cast<double>(0.2507f));
  norm.std = {0.2f, 0.5f, 0.25f};
  CHECK(norm.lipschitz() == 1.0 / static_cast<double>(0.2f));  // the smallest std, not the largest
  const NormalizationTable table = normalization_table(norm);
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) {
      const float x = static_cast<float>(v) / 255.0f;
      REQUIRE(table[c][v] == (x - norm.mean[c]) / norm.std[c]);
    }
  }
  norm.std[1] = 0.0f;
  CHECK_THROWS_AS(norm.lipschitz(), ConfigError);
  CHECK_THROWS_AS(normalization_table(norm), ConfigError);
}

TEST_CASE("make_batch gathers the requested records, normalized, without augmentation", "[data]") {
  const CifarSplit split = synthetic_split(50);
  const Normalization norm;
  const NormalizationTable table = normalization_table(norm);
  Batch batch;
  const std::vector<int64_t> indices = {7, 0, 49, 7};
  make_batch(split, indices, norm, batch);
  REQUIRE(batch.images.shape() == Shape{4, 3, 32, 32});
  CHECK(batch.indices == indices);
  CHECK(batch.labels == std::vector<int32_t>{7, 0, 49, 7});
  for (size_t i = 0; i < indices.size(); ++i) {
    for (int64_t p = 0; p < kCifarPixels; ++p) {
      const uint8_t value = split.pixels[static_cast<size_t>(indices[i] * kCifarPixels + p)];
      REQUIRE(batch.images.at(static_cast<int64_t>(i) * kCifarPixels + p) == table[p / 1024][value]);
    }
  }
  // The same Batch reused for a smaller request.
  make_batch(split, {3}, norm, batch);
  CHECK(batch.images.shape() == Shape{1, 3, 32, 32});
  CHECK_THROWS_AS(make_batch(split, {50}, norm, batch), ConfigError);
  CHECK_THROWS_AS(make_batch(split, {-1}, norm, batch), ConfigError);
}

TEST_CASE("augment_image is a crop of the zero-padded image, then a horizontal flip (naive reference)", "[data]") {
  // Random pixels, none zero, so that a padded (zero) pixel can never be mistaken for an image pixel.
  std::vector<uint8_t> pixels(kCifarPixels);
  uint32_t state = 12345;
  for (auto& p : pixels) {
    state = state * 1664525u + 1013904223u;
    p = static_cast<uint8_t>(1 + (state >> 24) % 255);
  }
  Normalization norm;
  const NormalizationTable table = normalization_table(norm);
  // The reference: build the 40x40 zero-padded uint8 image, cut the window, flip it, normalize.
  std::vector<uint8_t> padded(3 * 40 * 40, 0);
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < 32; ++y)
      for (int x = 0; x < 32; ++x) padded[(c * 40 + y + 4) * 40 + x + 4] = pixels[(c * 32 + y) * 32 + x];

  std::vector<float> out(kCifarPixels);
  for (int crop_y = 0; crop_y <= 8; ++crop_y) {
    for (int crop_x = 0; crop_x <= 8; ++crop_x) {
      for (bool flip : {false, true}) {
        augment_image(pixels.data(), Augmentation{crop_x, crop_y, flip}, table, out.data());
        int64_t zero_fill = 0;
        for (int c = 0; c < 3; ++c) {
          for (int y = 0; y < 32; ++y) {
            for (int x = 0; x < 32; ++x) {
              const int window_x = flip ? 31 - x : x;
              const uint8_t expected = padded[(c * 40 + y + crop_y) * 40 + window_x + crop_x];
              zero_fill += expected == 0;
              REQUIRE(out[(c * 32 + y) * 32 + x] == table[c][expected]);
            }
          }
        }
        // The number of padded pixels that show: 32*32 minus the overlap of the window with the image.
        const int64_t overlap = (32 - std::abs(crop_x - 4)) * (32 - std::abs(crop_y - 4));
        CHECK(zero_fill == 3 * (1024 - overlap));
      }
    }
  }
  // The identity.
  augment_image(pixels.data(), Augmentation{}, table, out.data());
  for (int64_t p = 0; p < kCifarPixels; ++p) REQUIRE(out[p] == table[p / 1024][pixels[p]]);
  // A padded pixel is the normalized value of 0: (0 - mean) / std.
  augment_image(pixels.data(), Augmentation{0, 0, false}, table, out.data());
  CHECK(out[0] == (0.0f - norm.mean[0]) / norm.std[0]);
  CHECK(out[2048] == (0.0f - norm.mean[2]) / norm.std[2]);
  CHECK_THROWS_AS(augment_image(pixels.data(), Augmentation{9, 0, false}, table, out.data()), ConfigError);
}

TEST_CASE("augmentation_at is a pure function of (seed, epoch, position), covering all crops and both flips",
          "[data]") {
  std::map<int, int> crop_x_count;
  std::map<int, int> crop_y_count;
  int flips = 0;
  const int samples = 18000;
  int same_as_next_epoch = 0;
  for (int position = 0; position < samples; ++position) {
    const Augmentation a = augmentation_at(42, 3, position);
    const Augmentation again = augmentation_at(42, 3, position);
    REQUIRE(a.crop_x == again.crop_x);
    REQUIRE(a.crop_y == again.crop_y);
    REQUIRE(a.flip == again.flip);
    REQUIRE(a.crop_x >= 0);
    REQUIRE(a.crop_x <= 8);
    REQUIRE(a.crop_y >= 0);
    REQUIRE(a.crop_y <= 8);
    ++crop_x_count[a.crop_x];
    ++crop_y_count[a.crop_y];
    flips += a.flip;
    const Augmentation other = augmentation_at(42, 4, position);
    same_as_next_epoch += a.crop_x == other.crop_x && a.crop_y == other.crop_y && a.flip == other.flip;
  }
  // Uniform: 2000 expected per crop value, binomial std ~42; 1/2 flips, std ~67. Bounds at ~5 std.
  REQUIRE(crop_x_count.size() == 9);
  REQUIRE(crop_y_count.size() == 9);
  for (const auto& [value, count] : crop_x_count) CHECK(std::abs(count - 2000) < 220);
  for (const auto& [value, count] : crop_y_count) CHECK(std::abs(count - 2000) < 220);
  CHECK(std::abs(flips - 9000) < 340);
  // Another epoch draws independently: the same triple with probability 1/162 (~111 of 18000, std ~10.5).
  CHECK(same_as_next_epoch < 170);
}

TEST_CASE("epoch_permutation is a permutation, the same for the same (seed, epoch), different otherwise", "[data]") {
  const auto a = epoch_permutation(42, 0, 1000);
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == iota_indices(1000));
  CHECK(epoch_permutation(42, 0, 1000) == a);
  CHECK(epoch_permutation(42, 1, 1000) != a);
  CHECK(epoch_permutation(43, 0, 1000) != a);
  CHECK(a != iota_indices(1000));
  CHECK(epoch_permutation(42, 0, 0).empty());
  CHECK(epoch_permutation(42, 0, 1) == std::vector<int64_t>{0});
}

// ---------------------------------------------------------------------------------------------------------------
// BatchLoader

TEST_CASE("BatchLoader visits every index exactly once per epoch, with a smaller last batch", "[data]") {
  const CifarSplit split = synthetic_split(1000);
  BatchLoader::Options options;
  options.batch_size = 128;
  BatchLoader loader(split, iota_indices(1000), Normalization{}, options);
  CHECK(loader.batches_per_epoch() == 8);
  CHECK(loader.size() == 1000);
  for (int64_t epoch : {0, 1}) {
    const auto batches = epoch_batches(loader, epoch);
    REQUIRE(batches.size() == 8);
    std::vector<int64_t> seen;
    for (size_t b = 0; b < batches.size(); ++b) {
      const int64_t expected = b + 1 < batches.size() ? 128 : 1000 - 7 * 128;  // 104
      REQUIRE(batches[b].images.shape() == Shape{expected, 3, 32, 32});
      REQUIRE(static_cast<int64_t>(batches[b].labels.size()) == expected);
      for (size_t i = 0; i < batches[b].indices.size(); ++i) {
        seen.push_back(batches[b].indices[i]);
        CHECK(batches[b].labels[i] == split.fine_labels[static_cast<size_t>(batches[b].indices[i])]);
      }
    }
    std::sort(seen.begin(), seen.end());
    CHECK(seen == iota_indices(1000));
  }
  // The end of an epoch stays the end.
  Batch batch;
  CHECK_FALSE(loader.next(batch));
}

TEST_CASE("BatchLoader with drop_last drops the partial batch, and a subset of indices is all it visits", "[data]") {
  const CifarSplit split = synthetic_split(300);
  std::vector<int64_t> subset;
  for (int64_t i = 0; i < 300; i += 3) subset.push_back(i);  // 100 indices
  BatchLoader::Options options;
  options.batch_size = 32;
  options.drop_last = true;
  BatchLoader loader(split, subset, Normalization{}, options);
  CHECK(loader.batches_per_epoch() == 3);
  CHECK(loader.size() == 96);
  const auto batches = epoch_batches(loader, 0);
  REQUIRE(batches.size() == 3);
  std::set<int64_t> seen;
  for (const auto& batch : batches) {
    CHECK(batch.images.dim(0) == 32);
    for (int64_t index : batch.indices) {
      CHECK(index % 3 == 0);
      seen.insert(index);
    }
  }
  CHECK(seen.size() == 96);
}

TEST_CASE("BatchLoader batches are a pure function of (seed, epoch): a resumed run sees the same batches bit for bit",
          "[data]") {
  const CifarSplit split = synthetic_split(700);
  BatchLoader::Options options;
  options.batch_size = 64;
  BatchLoader uninterrupted(split, iota_indices(700), Normalization{}, options);
  std::vector<std::vector<Batch>> epochs;
  for (int64_t epoch = 0; epoch < 3; ++epoch) epochs.push_back(epoch_batches(uninterrupted, epoch));

  // A fresh loader (a resumed process) that starts at epoch 2.
  BatchLoader resumed(split, iota_indices(700), Normalization{}, options);
  CHECK(same_batches(epoch_batches(resumed, 2), epochs[2]));
  // The same epoch again on the same loader.
  CHECK(same_batches(epoch_batches(uninterrupted, 1), epochs[1]));
  // Epochs differ from each other, in order and in augmentation.
  CHECK(epochs[0][0].indices != epochs[1][0].indices);
  // Another seed gives another run.
  options.seed = 7;
  BatchLoader other_seed(split, iota_indices(700), Normalization{}, options);
  CHECK_FALSE(same_batches(epoch_batches(other_seed, 0), epochs[0]));

  // Each image is exactly augment_image(record, augmentation_at(seed, epoch, position)).
  const NormalizationTable table = normalization_table(Normalization{});
  const auto order = epoch_permutation(42, 2, 700);
  std::vector<float> expected(kCifarPixels);
  int64_t position = 0;
  int64_t flipped = 0;
  for (const auto& batch : epochs[2]) {
    const std::vector<float> values = batch.images.to_vector();
    for (size_t i = 0; i < batch.indices.size(); ++i, ++position) {
      REQUIRE(batch.indices[i] == order[static_cast<size_t>(position)]);
      const Augmentation augmentation = augmentation_at(42, 2, position);
      flipped += augmentation.flip;
      augment_image(split.pixels.data() + batch.indices[i] * kCifarPixels, augmentation, table, expected.data());
      REQUIRE(std::equal(expected.begin(), expected.end(), values.begin() + static_cast<int64_t>(i) * kCifarPixels));
    }
  }
  CHECK(position == 700);
  CHECK(flipped > 0);
  CHECK(flipped < 700);
}

TEST_CASE("BatchLoader started at batch k of an epoch hands out exactly that epoch's batches k, k+1, ...",
          "[data][resume]") {
  const CifarSplit split = synthetic_split(300);
  BatchLoader::Options options;
  options.batch_size = 64;  // 5 batches, the last of 44
  BatchLoader uninterrupted(split, iota_indices(300), Normalization{}, options);
  const std::vector<Batch> whole = epoch_batches(uninterrupted, 3);
  REQUIRE(whole.size() == 5);
  for (int64_t first = 0; first <= 5; ++first) {
    INFO("first batch " << first);
    BatchLoader resumed(split, iota_indices(300), Normalization{}, options);  // a fresh process
    const std::vector<Batch> tail(whole.begin() + first, whole.end());
    CHECK(same_batches(epoch_batches(resumed, 3, first), tail));
  }
  // Mid-epoch restarts on one loader, and a start outside the epoch is refused.
  CHECK(same_batches(epoch_batches(uninterrupted, 3, 4), {whole[4]}));
  CHECK_THROWS_AS(uninterrupted.start_epoch(3, 6), ConfigError);
  CHECK_THROWS_AS(uninterrupted.start_epoch(3, -1), ConfigError);
}

TEST_CASE("BatchLoader without shuffle or augmentation equals make_batch over the indices in order", "[data]") {
  const CifarSplit split = synthetic_split(150);
  BatchLoader::Options options;
  options.batch_size = 64;
  options.shuffle = false;
  options.augment = false;
  BatchLoader loader(split, iota_indices(150), Normalization{}, options);
  const auto batches = epoch_batches(loader, 5);
  REQUIRE(batches.size() == 3);
  for (size_t b = 0; b < batches.size(); ++b) {
    std::vector<int64_t> indices;
    for (int64_t i = static_cast<int64_t>(b) * 64; i < std::min<int64_t>(150, (b + 1) * 64); ++i) indices.push_back(i);
    Batch expected;
    make_batch(split, indices, Normalization{}, expected);
    CHECK(batches[b].indices == indices);
    CHECK(batches[b].images.to_vector() == expected.images.to_vector());
  }
}

TEST_CASE("BatchLoader: early stop, restart, destruction mid-epoch, and misuse", "[data]") {
  const CifarSplit split = synthetic_split(500);
  BatchLoader::Options options;
  options.batch_size = 50;
  SECTION("stopping early and starting another epoch gives that epoch in full") {
    BatchLoader loader(split, iota_indices(500), Normalization{}, options);
    loader.start_epoch(0);
    Batch batch;
    REQUIRE(loader.next(batch));
    BatchLoader reference(split, iota_indices(500), Normalization{}, options);
    CHECK(same_batches(epoch_batches(loader, 1), epoch_batches(reference, 1)));
    // And back to the interrupted epoch, from its start.
    CHECK(same_batches(epoch_batches(loader, 0), epoch_batches(reference, 0)));
  }
  SECTION("destroying a loader mid-epoch, or before any epoch, does not hang") {
    for (int round = 0; round < 20; ++round) {
      BatchLoader loader(split, iota_indices(500), Normalization{}, options);
      if (round % 2 == 0) {
        loader.start_epoch(round);
        Batch batch;
        REQUIRE(loader.next(batch));
      }
    }
  }
  SECTION("next before start_epoch is an error") {
    BatchLoader loader(split, iota_indices(500), Normalization{}, options);
    Batch batch;
    CHECK_THROWS_AS(loader.next(batch), Error);
  }
  SECTION("an empty index list gives empty epochs") {
    BatchLoader loader(split, {}, Normalization{}, options);
    CHECK(loader.batches_per_epoch() == 0);
    CHECK(epoch_batches(loader, 0).empty());
  }
  SECTION("bad settings are refused at construction") {
    options.batch_size = 0;
    CHECK_THROWS_AS(BatchLoader(split, iota_indices(10), Normalization{}, options), ConfigError);
    options.batch_size = 10;
    CHECK_THROWS_AS(BatchLoader(split, {0, 500}, Normalization{}, options), ConfigError);
    Normalization bad;
    bad.std[0] = -1.0f;
    CHECK_THROWS_AS(BatchLoader(split, iota_indices(10), bad, options), ConfigError);
  }
}

TEST_CASE("BatchLoader rethrows an error of its worker thread in next()", "[data]") {
  CifarSplit split = synthetic_split(200);
  BatchLoader::Options options;
  options.batch_size = 50;
  BatchLoader loader(split, iota_indices(200), Normalization{}, options);
  // The split changes under the loader (a caller bug the worker detects while building a batch).
  split.pixels.resize(10);
  loader.start_epoch(0);
  Batch batch;
  try {
    loader.next(batch);
    FAIL("expected the worker's error");
  } catch (const Error& error) {
    CHECK(std::string(error.what()).find("changed under the loader") != std::string::npos);
  }
  // It stays failed until the next epoch starts.
  CHECK_THROWS_AS(loader.next(batch), Error);
}

// Not a test: the loader's throughput on the real training set (run with "[.benchmark]").
TEST_CASE("BatchLoader throughput on the real training set", "[.benchmark][data]") {
  const CifarSplit* train = real_split("train");
  if (train == nullptr) {
    WARN("real CIFAR-100 not found: skipped");
    return;
  }
  BatchLoader loader(*train, iota_indices(train->size()), Normalization{}, BatchLoader::Options{});
  Batch batch;
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    const auto start = std::chrono::steady_clock::now();
    loader.start_epoch(epoch);
    int64_t images = 0;
    while (loader.next(batch)) images += batch.images.dim(0);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    WARN("epoch " << epoch << ": " << images << " images in " << seconds << " s = " << images / seconds
                  << " images/s (augmented, shuffled, batch 128, consumer doing nothing)");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// data/get-cifar100.sh: the local-copy path and the checksum check (the download itself needs a network).

#ifdef ORTHOCONV_SOURCE_DIR
namespace {
// Runs the script with `arguments`; returns its exit status and its stdout.
std::pair<int, std::string> run_get_script(const std::string& arguments, const fs::path& scratch) {
  const fs::path out = scratch / "stdout.txt";
  const std::string command = "bash '" + std::string(ORTHOCONV_SOURCE_DIR) + "/data/get-cifar100.sh' " + arguments +
                              " > '" + out.string() + "' 2> '" + (scratch / "stderr.txt").string() + "'";
  const int status = std::system(command.c_str());
  std::ifstream in(out);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text};
}
}  // namespace

TEST_CASE("get-cifar100.sh verifies a local copy by sha256 and refuses a corrupt one with a non-zero exit",
          "[data][script]") {
  TempDir scratch;
  const fs::path copy = scratch.path / "copy";
  fs::create_directories(copy);
  // Both files present, wrong bytes: the checksum is what catches it.
  write_records(
      copy / "train.bin", 5, [](int64_t r) { return r % 20; }, [](int64_t r) { return r % 100; });
  write_records(
      copy / "test.bin", 1, [](int64_t r) { return r % 20; }, [](int64_t r) { return r % 100; });
  auto [status, out] = run_get_script("--from '" + copy.string() + "'", scratch.path);
  CHECK(status == 2);
  CHECK(out.empty());

  fs::remove(copy / "test.bin");
  std::tie(status, out) = run_get_script("--from '" + copy.string() + "'", scratch.path);
  CHECK(status == 1);
  std::tie(status, out) = run_get_script("--no-such-flag", scratch.path);
  CHECK(status == 1);

  const std::string real = orthoconv::testing::real_data_dir();
  if (real.empty()) {
    WARN("real CIFAR-100 not found: the accepting path of get-cifar100.sh is not checked");
    return;
  }
  std::tie(status, out) = run_get_script("--from '" + real + "'", scratch.path);
  CHECK(status == 0);
  // The last stdout line is the dataset directory, absolute, usable in place.
  REQUIRE(!out.empty());
  const std::string printed = out.substr(0, out.find_last_not_of('\n') + 1);
  CHECK(fs::equivalent(printed, real));
  CHECK(load_cifar100(printed, "test").size() == 10000);
}
#endif
