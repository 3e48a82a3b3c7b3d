// Safetensors checkpoints: exact round trips, a header any safetensors reader accepts, every kind of damage
// refused with an IoError naming the file, and saves that never damage an existing file.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_helpers.hpp"
#include "orthoconv/checkpoint.hpp"
#include "orthoconv/error.hpp"

using namespace orthoconv;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using testing::TempDir;

std::string read_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_bytes(const fs::path& file, const std::string& bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t value) {
  std::string out(8, '\0');
  for (int b = 0; b < 8; ++b) out[static_cast<size_t>(b)] = static_cast<char>((value >> (8 * b)) & 0xff);
  return out;
}

// A safetensors file from a header text and data bytes, exactly as given (for crafting damaged files).
std::string raw_file(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

std::string float_bytes(const std::vector<float>& values) {
  std::string out(values.size() * 4, '\0');
  for (size_t i = 0; i < values.size(); ++i) {
    uint32_t bits = 0;
    std::memcpy(&bits, &values[i], 4);
    for (int b = 0; b < 4; ++b) out[4 * i + static_cast<size_t>(b)] = static_cast<char>((bits >> (8 * b)) & 0xff);
  }
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

Checkpoint sample_checkpoint() {
  Checkpoint checkpoint;
  checkpoint.metadata["format"] = "orthoconv-checkpoint";
  checkpoint.metadata["version"] = "1";
  checkpoint.metadata["note"] = "quotes \" backslash \\ newline \n unicode \xc3\xa9";
  std::vector<float> filter(2 * 4 * 4 * 3 * 3);
  for (size_t i = 0; i < filter.size(); ++i) {
    filter[i] = std::sin(static_cast<float>(i)) * 1e-3f * static_cast<float>(i);
  }
  checkpoint.tensors["layers.0.M"] = {{2, 4, 4, 3, 3}, filter};
  checkpoint.tensors["head.bias"] = {{3}, {-0.0f, std::numeric_limits<float>::denorm_min(), 3.4e38f}};
  checkpoint.tensors["special"] = {{2, 2},
                                   {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                                    std::numeric_limits<float>::quiet_NaN(), 1.0f / 3.0f}};
  checkpoint.tensors["scalar.step"] = {{}, {12345.0f}};
  checkpoint.tensors["empty"] = {{0, 5}, {}};
  return checkpoint;
}

template <typename Call>
void require_io_error(Call&& call, const std::string& file, const std::string& problem) {
  try {
    call();
    FAIL("expected IoError naming " << file << " (" << problem << ")");
  } catch (const IoError& error) {
    const std::string message = error.what();
    INFO("message: " << message);
    CHECK(message.find(file) != std::string::npos);
    CHECK(message.find(problem) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("checkpoint round trip is exact: values bit for bit (NaN, inf, -0, denormals), shapes, metadata",
          "[checkpoint]") {
  TempDir dir;
  const std::string path = (dir.path / "last.safetensors").string();
  const Checkpoint saved = sample_checkpoint();
  save_checkpoint(path, saved);
  const Checkpoint loaded = load_checkpoint(path);
  CHECK(loaded.path == path);
  CHECK(loaded.metadata == saved.metadata);
  REQUIRE(loaded.tensors.size() == saved.tensors.size());
  for (const auto& [name, tensor] : saved.tensors) {
    INFO(name);
    REQUIRE(loaded.tensors.count(name) == 1);
    CHECK(loaded.tensors.at(name).shape == tensor.shape);
    CHECK(same_bits(loaded.tensors.at(name).values, tensor.values));
  }
  CHECK(loaded.tensor("layers.0.M", {2, 4, 4, 3, 3}).values.size() == 288);
  CHECK(loaded.meta("format") == "orthoconv-checkpoint");
  // Nothing but the checkpoint is left in the directory.
  CHECK(dir.entries() == std::vector<std::string>{"last.safetensors"});

  // An empty checkpoint is a valid file too.
  save_checkpoint(path, Checkpoint{});
  const Checkpoint empty = load_checkpoint(path);
  CHECK(empty.tensors.empty());
  CHECK(empty.metadata.empty());
}

TEST_CASE("checkpoint file is standard safetensors: length, padded JSON header, contiguous little-endian F32 data",
          "[checkpoint]") {
  TempDir dir;
  const fs::path path = dir.path / "c.safetensors";
  const Checkpoint saved = sample_checkpoint();
  save_checkpoint(path.string(), saved);
  const std::string bytes = read_bytes(path);
  REQUIRE(bytes.size() >= 8);
  uint64_t header_size = 0;
  for (int b = 0; b < 8; ++b) header_size |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[b])) << (8 * b);
  CHECK(header_size % 8 == 0);  // the reference writer's alignment, kept for memory-mapped readers
  REQUIRE(8 + header_size <= bytes.size());
  const std::string header_text = bytes.substr(8, header_size);
  CHECK(header_text.front() == '{');
  const json header = json::parse(header_text);
  REQUIRE(header.is_object());
  CHECK(header["__metadata__"]["format"] == "orthoconv-checkpoint");
  uint64_t data_bytes = 0;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    INFO(name);
    CHECK(entry["dtype"] == "F32");
    const CheckpointTensor& tensor = saved.tensors.at(name);
    CHECK(entry["shape"].get<std::vector<int64_t>>() == tensor.shape);
    const auto offsets = entry["data_offsets"].get<std::vector<uint64_t>>();
    REQUIRE(offsets.size() == 2);
    CHECK(offsets[1] - offsets[0] == tensor.values.size() * 4);
    // The bytes at those offsets (relative to the end of the header) are the values, little endian.
    CHECK(bytes.substr(8 + header_size + offsets[0], offsets[1] - offsets[0]) == float_bytes(tensor.values));
    data_bytes += offsets[1] - offsets[0];
  }
  CHECK(bytes.size() == 8 + header_size + data_bytes);
}

TEST_CASE("Checkpoint::tensor and meta name the file and the missing or misshapen entry", "[checkpoint]") {
  TempDir dir;
  const std::string path = (dir.path / "c.safetensors").string();
  save_checkpoint(path, sample_checkpoint());
  const Checkpoint loaded = load_checkpoint(path);
  require_io_error([&] { loaded.tensor("nope", {1}); }, path, "missing tensor 'nope'");
  require_io_error([&] { loaded.tensor("head.bias", {4}); }, path, "tensor 'head.bias' has shape [3], expected [4]");
  require_io_error([&] { loaded.meta("architecture"); }, path, "missing metadata 'architecture'");
  // Built in memory: still an IoError, naming what it can.
  Checkpoint in_memory;
  CHECK_THROWS_AS(in_memory.tensor("x", {}), IoError);
}

TEST_CASE("load_checkpoint refuses damaged files with an IoError naming the file and the problem", "[checkpoint]") {
  TempDir dir;
  const fs::path good = dir.path / "good.safetensors";
  save_checkpoint(good.string(), sample_checkpoint());
  const std::string bytes = read_bytes(good);
  const fs::path bad = dir.path / "bad.safetensors";
  const std::string bad_path = bad.string();
  auto expect = [&](const std::string& contents, const std::string& problem) {
    INFO("expecting: " << problem);
    write_bytes(bad, contents);
    require_io_error([&] { load_checkpoint(bad_path); }, bad_path, problem);
  };
  const std::string two = float_bytes({1.0f, 2.0f});

  SECTION("missing file") {
    require_io_error([&] { load_checkpoint(bad_path); }, bad_path, "not found");
  }
  SECTION("truncated anywhere") {
    expect("", "truncated");
    expect(bytes.substr(0, 5), "truncated");
    expect(bytes.substr(0, 8), "truncated");
    expect(bytes.substr(0, 40), "truncated");
    expect(bytes.substr(0, bytes.size() - 1), "truncated");
    expect(bytes.substr(0, bytes.size() / 2), "truncated");
  }
  SECTION("bad header length") {
    expect(le64(0) + "{}", "bad header length");
    expect(le64(uint64_t{1} << 60) + "{}", "bad header length");
    expect(le64(1000) + "{}      ", "truncated");
  }
  SECTION("header is not JSON, or not an object") {
    expect(raw_file("{\"a\": [1, 2", ""), "not valid JSON");
    expect(raw_file("{garbage}", ""), "not valid JSON");
    expect(raw_file("[1, 2, 3]", ""), "does not start with '{'");
    expect(raw_file("PK\x03\x04 zipped", ""), "does not start with '{'");
    std::string flipped = bytes;
    flipped[8 + 3] = '\x01';  // a control character inside the first key
    expect(flipped, "not valid JSON");
  }
  SECTION("entries that are not F32 tensors") {
    expect(raw_file(R"({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})", "abcd"),
           "dtype F16 is not supported");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", two), "non-negative");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", two), "non-negative");
    expect(raw_file(R"({"w": {"dtype": "F32", "data_offsets": [0, 8]}})", two), "shape");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [2]}})", two), "data_offsets");
    expect(raw_file(R"({"w": {"shape": [2], "data_offsets": [0, 8]}})", two), "missing dtype");
    expect(raw_file(R"({"w": [1, 2]})", two), "not an object");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}})", two), "unknown field");
    expect(raw_file(R"({"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", two),
           "metadata 'a' is not a string");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", two),
           "too large");
  }
  SECTION("offsets that do not match the shape, leave the file, overlap, leave gaps or trailing bytes") {
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", two), "needs 12");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", two), "end before");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})", two), "truncated");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                    R"( "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                    two),
           "overlaps");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", two), "gap of 4 bytes");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", two), "4 bytes after");
    expect(bytes + "x", "1 bytes after");
    expect(raw_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                    R"( "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                    two),
           "names 'w' twice");
  }
  SECTION("a hand-written valid file loads (another writer's layout: unpadded header, reversed order)") {
    write_bytes(bad, raw_file(R"({"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                              R"( "a": {"dtype": "F32", "shape": [1, 1], "data_offsets": [4, 8]}})",
                              two));
    const Checkpoint loaded = load_checkpoint(bad_path);
    CHECK(loaded.tensors.at("b").values == std::vector<float>{1.0f});
    CHECK(loaded.tensors.at("a").values == std::vector<float>{2.0f});
    CHECK(loaded.tensors.at("a").shape == std::vector<int64_t>{1, 1});
  }
}

TEST_CASE("a failed save leaves the existing checkpoint intact and no temporary file behind", "[checkpoint]") {
  TempDir dir;
  const fs::path path = dir.path / "last.safetensors";
  const Checkpoint original = sample_checkpoint();
  save_checkpoint(path.string(), original);
  const std::string before = read_bytes(path);
  Checkpoint replacement;
  replacement.tensors["w"] = {{2}, {5.0f, 6.0f}};

  SECTION("the temporary file cannot be created (a directory is in its way)") {
    const fs::path blocker = path.string() + ".tmp-" + std::to_string(::getpid());
    fs::create_directories(blocker);
    require_io_error([&] { save_checkpoint(path.string(), replacement); }, path.string(), "cannot create");
    CHECK(read_bytes(path) == before);
    fs::remove(blocker);
  }
  SECTION("the checkpoint itself is inconsistent (values do not fill the shape)") {
    replacement.tensors["w"].shape = {3};
    CHECK_THROWS_AS(save_checkpoint(path.string(), replacement), ShapeError);
    CHECK(read_bytes(path) == before);
    replacement.tensors["w"].shape = {2};
  }
  SECTION("metadata that is not UTF-8 cannot be encoded") {
    replacement.metadata["bad"] = "\xff\xfe";
    CHECK_THROWS_AS(save_checkpoint(path.string(), replacement), ConfigError);
    CHECK(read_bytes(path) == before);
    replacement.metadata.clear();
  }
  SECTION("the target is a directory: the rename fails after the data was written") {
    const fs::path directory_target = dir.path / "a_directory";
    fs::create_directories(directory_target);
    require_io_error([&] { save_checkpoint(directory_target.string(), replacement); }, directory_target.string(),
                     "cannot rename");
    CHECK(fs::is_directory(directory_target));
    CHECK(read_bytes(path) == before);
    fs::remove(directory_target);
  }
  CHECK(dir.entries() == std::vector<std::string>{"last.safetensors"});
  // And a successful save replaces it.
  save_checkpoint(path.string(), replacement);
  CHECK(load_checkpoint(path.string()).tensors.at("w").values == std::vector<float>{5.0f, 6.0f});
  CHECK(dir.entries() == std::vector<std::string>{"last.safetensors"});
}

TEST_CASE("saving into a directory that cannot exist is one clear IoError", "[checkpoint]") {
  TempDir dir;
  const fs::path regular_file = dir.path / "not_a_directory";
  write_bytes(regular_file, "x");
  const std::string under_file = (regular_file / "last.safetensors").string();
  require_io_error([&] { save_checkpoint(under_file, sample_checkpoint()); }, under_file, "is not a directory");
  const std::string missing = (dir.path / "missing" / "last.safetensors").string();
  require_io_error([&] { save_checkpoint(missing, sample_checkpoint()); }, missing, "does not exist");
  require_io_error([&] { write_file_atomically(under_file, "text"); }, under_file, "cannot create");
  CHECK(read_bytes(regular_file) == "x");
  CHECK(dir.entries() == std::vector<std::string>{"not_a_directory"});
}

TEST_CASE("write_file_atomically writes and replaces whole contents", "[checkpoint]") {
  TempDir dir;
  const fs::path path = dir.path / "metrics.jsonl";
  write_file_atomically(path.string(), "first\n");
  CHECK(read_bytes(path) == "first\n");
  write_file_atomically(path.string(), std::string("second\0binary", 13));
  CHECK(read_bytes(path) == std::string("second\0binary", 13));
  write_file_atomically(path.string(), "");
  CHECK(read_bytes(path).empty());
  CHECK(dir.entries() == std::vector<std::string>{"metrics.jsonl"});
  // A relative path (no directory part) goes to the current directory.
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path);
  write_file_atomically("relative.txt", "r");
  fs::current_path(cwd);
  CHECK(read_bytes(dir.path / "relative.txt") == "r");
}
