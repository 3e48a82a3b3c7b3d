// CIFAR-100 (binary version): reading and validating train.bin / test.bin, finding the dataset directory,
// normalization by table lookup, the crop/flip augmentation and its (seed, epoch)-keyed randomness.
//
// Randomness is counter based (splitmix64 of a key built from seed, epoch and a stream tag) rather than a
// std:: distribution, whose output differs between standard libraries: a resumed run reproduces an epoch's
// order and augmentation bit for bit on any platform.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <sstream>
#include <system_error>

#include "orthoconv/data.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv {

namespace {

namespace fs = std::filesystem;

int64_t expected_records(const std::string& split) {
  if (split == "train") return kCifarTrainRecords;
  if (split == "test") return kCifarTestRecords;
  throw ConfigError("CIFAR-100 split must be 'train' or 'test', got '" + split + "'");
}

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};

// What keeps `dir` from being a dataset directory ("" when it holds train.bin and test.bin as regular files).
std::string dataset_problem(const fs::path& dir) {
  std::error_code ec;
  const fs::file_type type = fs::status(dir, ec).type();
  if (type == fs::file_type::not_found) return "does not exist";
  if (type != fs::file_type::directory) return "is not a directory";
  for (const char* name : {"train.bin", "test.bin"}) {
    const fs::file_type file = fs::status(dir / name, ec).type();
    if (file == fs::file_type::not_found) return std::string("has no ") + name;
    if (file == fs::file_type::directory) return std::string("holds ") + name + " as a directory, not a file";
    if (file != fs::file_type::regular) return std::string("holds ") + name + " but it is not a regular file";
  }
  return "";
}

bool holds_both_files(const fs::path& dir) { return dataset_problem(dir).empty(); }

// splitmix64's output function: a bijective 64-bit mixer.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
constexpr uint64_t kStreamAugment = 1;
constexpr uint64_t kStreamShuffle = 2;

uint64_t stream_key(uint64_t seed, int64_t epoch, uint64_t stream) {
  uint64_t key = mix64(seed + kGolden);
  key = mix64(key ^ (static_cast<uint64_t>(epoch) + kGolden));
  return mix64(key ^ (stream * kGolden));
}

// The n-th output of the splitmix64 sequence started at `key`.
uint64_t splitmix_at(uint64_t key, uint64_t n) { return mix64(key + (n + 1) * kGolden); }

}  // namespace

CifarSplit load_cifar100(const std::string& dir, const std::string& split) {
  const int64_t records = expected_records(split);
  return load_cifar100_file((fs::path(dir) / (split + ".bin")).string(), records, split);
}

CifarSplit load_cifar100_file(const std::string& path, int64_t records, const std::string& split) {
  require(records >= 0, "CIFAR-100 record count must be non-negative, got ", records);
  auto fail = [&](const std::string& problem) { return IoError("CIFAR-100 file " + path + ": " + problem); };

  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (status.type() == fs::file_type::not_found) {
    throw fail("not found (run data/get-cifar100.sh, or pass the dataset directory)");
  }
  if (ec) throw fail("cannot access: " + ec.message());
  if (!fs::is_regular_file(status)) throw fail("not a regular file");
  const uintmax_t bytes = fs::file_size(path, ec);
  if (ec) throw fail("cannot read its size: " + ec.message());
  if (bytes % kCifarRecord != 0) {
    throw fail(detail::concat("size ", bytes, " bytes is not a multiple of the ", kCifarRecord,
                              "-byte record (truncated or not the binary version?)"));
  }
  if (static_cast<int64_t>(bytes / kCifarRecord) != records) {
    throw fail(
        detail::concat("holds ", bytes / kCifarRecord, " records, expected ", records, " for the ", split, " split"));
  }

  std::unique_ptr<std::FILE, FileCloser> file(std::fopen(path.c_str(), "rb"));
  if (!file) throw fail(std::string("cannot open: ") + std::strerror(errno));

  CifarSplit out;
  out.path = path;
  out.pixels.resize(static_cast<size_t>(records * kCifarPixels));
  out.fine_labels.resize(static_cast<size_t>(records));
  out.coarse_labels.resize(static_cast<size_t>(records));

  // Read in chunks straight into place: no second copy of the whole file in memory.
  constexpr int64_t kChunkRecords = 1024;
  std::vector<uint8_t> chunk(static_cast<size_t>(kChunkRecords * kCifarRecord));
  for (int64_t first = 0; first < records; first += kChunkRecords) {
    const int64_t count = std::min(kChunkRecords, records - first);
    const size_t want = static_cast<size_t>(count * kCifarRecord);
    if (std::fread(chunk.data(), 1, want, file.get()) != want) {
      throw fail(detail::concat("read failed at record ", first, " (file changed while reading?)"));
    }
    for (int64_t i = 0; i < count; ++i) {
      const uint8_t* record = chunk.data() + i * kCifarRecord;
      const int64_t index = first + i;
      if (record[0] >= 20) {
        throw fail(detail::concat("record ", index, ": coarse label ", int(record[0]), " out of range 0..19"));
      }
      if (record[1] >= kCifarClasses) {
        throw fail(
            detail::concat("record ", index, ": fine label ", int(record[1]), " out of range 0..", kCifarClasses - 1));
      }
      out.coarse_labels[static_cast<size_t>(index)] = record[0];
      out.fine_labels[static_cast<size_t>(index)] = record[1];
      std::memcpy(out.pixels.data() + index * kCifarPixels, record + 2, kCifarPixels);
    }
  }
  return out;
}

std::string find_cifar100(const std::string& hint) {
  if (!hint.empty()) {
    const std::string problem = dataset_problem(hint);
    if (problem.empty()) return hint;
    throw IoError("CIFAR-100 directory " + hint + " " + problem + " (it must hold train.bin and test.bin)");
  }
  if (const char* env = std::getenv("ORTHOCONV_DATA"); env != nullptr && *env != '\0') {
    const std::string problem = dataset_problem(env);
    if (problem.empty()) return env;
    throw IoError(std::string("CIFAR-100 directory $ORTHOCONV_DATA=") + env + " " + problem +
                  " (it must hold train.bin and test.bin)");
  }
  std::vector<std::string> candidates = {"../shared/cifar100/cifar-100-binary", "data/cifar-100-binary"};
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    candidates.push_back((fs::path(home) / ".cache/orthoconv/cifar-100-binary").string());
  } else {
    candidates.push_back("~/.cache/orthoconv/cifar-100-binary");
  }
  for (const auto& candidate : candidates) {
    if (holds_both_files(candidate)) return candidate;
  }
  std::ostringstream message;
  message << "CIFAR-100 not found: no train.bin and test.bin in";
  for (size_t i = 0; i < candidates.size(); ++i) message << (i ? ", " : " ") << candidates[i];
  std::error_code ec;
  message << " (relative to " << fs::current_path(ec).string() << "); run data/get-cifar100.sh or set $ORTHOCONV_DATA";
  throw IoError(message.str());
}

double Normalization::lipschitz() const {
  float smallest = std[0];
  for (float s : std) {
    require(std::isfinite(s) && s > 0.0f, "normalization std must be positive and finite, got ", s);
    smallest = std::min(smallest, s);
  }
  return 1.0 / static_cast<double>(smallest);
}

NormalizationTable normalization_table(const Normalization& norm) {
  NormalizationTable table{};
  for (int c = 0; c < 3; ++c) {
    require(std::isfinite(norm.std[c]) && norm.std[c] > 0.0f, "normalization std must be positive and finite, got ",
            norm.std[c]);
    require(std::isfinite(norm.mean[c]), "normalization mean must be finite, got ", norm.mean[c]);
    for (int v = 0; v < 256; ++v) {
      // Float32 throughout, in the reference's order: ToTensor divides by 255, Normalize subtracts then divides.
      const float x = static_cast<float>(v) / 255.0f;
      table[c][v] = (x - norm.mean[c]) / norm.std[c];
    }
  }
  return table;
}

void augment_image(const uint8_t* pixels, const Augmentation& augmentation, const NormalizationTable& table,
                   float* out) {
  constexpr int kSide = static_cast<int>(kCifarSide);
  constexpr int kPad = 4;
  require(augmentation.crop_x >= 0 && augmentation.crop_x <= 2 * kPad && augmentation.crop_y >= 0 &&
              augmentation.crop_y <= 2 * kPad,
          "augmentation crop offsets must be in 0..8, got (", augmentation.crop_x, ", ", augmentation.crop_y, ")");
  // Source column of output column x: x + shift (no flip) or 31 - x + shift (flip), shift = crop - pad.
  const int shift_x = augmentation.crop_x - kPad;
  const int shift_y = augmentation.crop_y - kPad;
  // Output columns whose source column lies inside the image: [x_begin, x_end).
  int x_begin = 0;
  int x_end = kSide;
  if (!augmentation.flip) {
    x_begin = std::max(0, -shift_x);
    x_end = std::min(kSide, kSide - shift_x);
  } else {
    // source = 31 - x + shift_x in [0, 31]  <=>  x in [shift_x, 31 + shift_x].
    x_begin = std::max(0, shift_x);
    x_end = std::min(kSide, kSide + shift_x);
  }
  for (int c = 0; c < 3; ++c) {
    const float* lut = table[c].data();
    const float fill = lut[0];
    const uint8_t* plane = pixels + c * kSide * kSide;
    float* out_plane = out + c * kSide * kSide;
    for (int y = 0; y < kSide; ++y) {
      float* row_out = out_plane + y * kSide;
      const int source_y = y + shift_y;
      if (source_y < 0 || source_y >= kSide) {
        std::fill(row_out, row_out + kSide, fill);
        continue;
      }
      const uint8_t* row = plane + source_y * kSide;
      std::fill(row_out, row_out + x_begin, fill);
      if (!augmentation.flip) {
        for (int x = x_begin; x < x_end; ++x) row_out[x] = lut[row[x + shift_x]];
      } else {
        const int mirror = kSide - 1 + shift_x;
        for (int x = x_begin; x < x_end; ++x) row_out[x] = lut[row[mirror - x]];
      }
      std::fill(row_out + x_end, row_out + kSide, fill);
    }
  }
}

Augmentation augmentation_at(uint64_t seed, int64_t epoch, int64_t position) {
  const uint64_t h = splitmix_at(stream_key(seed, epoch, kStreamAugment), static_cast<uint64_t>(position));
  // Multiply-shift maps 32 (31) random bits onto 0..8; the bias is below 1e-8.
  Augmentation out;
  out.crop_x = static_cast<int32_t>(((h & 0xffffffffULL) * 9) >> 32);
  out.crop_y = static_cast<int32_t>((((h >> 32) & 0x7fffffffULL) * 9) >> 31);
  out.flip = (h >> 63) != 0;
  return out;
}

std::vector<int64_t> epoch_permutation(uint64_t seed, int64_t epoch, int64_t count) {
  require(count >= 0, "epoch_permutation: count must be non-negative, got ", count);
  std::vector<int64_t> order(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) order[static_cast<size_t>(i)] = i;
  const uint64_t key = stream_key(seed, epoch, kStreamShuffle);
  uint64_t draws = 0;
  // Fisher-Yates; an unbiased draw in [0, bound) by rejecting the low (2^64 mod bound) values.
  for (int64_t i = count - 1; i > 0; --i) {
    const uint64_t bound = static_cast<uint64_t>(i) + 1;
    const uint64_t threshold = (0 - bound) % bound;
    uint64_t r = splitmix_at(key, draws++);
    while (r < threshold) r = splitmix_at(key, draws++);
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(r % bound)]);
  }
  return order;
}

void make_batch(const CifarSplit& split, const std::vector<int64_t>& indices, const Normalization& norm, Batch& out) {
  const int64_t n = static_cast<int64_t>(indices.size());
  require(static_cast<int64_t>(split.pixels.size()) == split.size() * kCifarPixels, "CIFAR split ", split.path, ": ",
          split.pixels.size(), " pixel bytes for ", split.size(), " labels");
  for (int64_t index : indices) {
    require(index >= 0 && index < split.size(), "record index ", index, " out of range for ", split.path, " (",
            split.size(), " records)");
  }
  const NormalizationTable table = normalization_table(norm);
  const Shape shape{n, 3, kCifarSide, kCifarSide};
  if (out.images.device() != Device::cpu || (!out.images.owns_memory() && out.images.numel() < shape.numel())) {
    out.images = Tensor(shape);
  } else {
    out.images.resize(shape);
  }
  out.labels.resize(static_cast<size_t>(n));
  out.indices = indices;
  const Augmentation identity;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t index = indices[static_cast<size_t>(i)];
    out.labels[static_cast<size_t>(i)] = split.fine_labels[static_cast<size_t>(index)];
    augment_image(split.pixels.data() + index * kCifarPixels, identity, table, out.images.data() + i * kCifarPixels);
  }
}

}  // namespace orthoconv
