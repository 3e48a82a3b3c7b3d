// orthoconv/data.hpp: CIFAR-100 (binary version) reading, augmentation and batching.
//
// Records: 1 byte coarse label (0..19), 1 byte fine label (0..99), 3072 bytes of pixels (1024 R, 1024 G, 1024 B,
// each 32x32 row-major). train.bin holds 50,000 records, test.bin 10,000. Every problem (missing file, size not a
// multiple of 3074 or not the expected record count, a label out of range) is one IoError naming the file.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "orthoconv/tensor.hpp"

namespace orthoconv {

constexpr int64_t kCifarSide = 32;
constexpr int64_t kCifarPixels = 3 * kCifarSide * kCifarSide;  // 3072
constexpr int64_t kCifarRecord = 2 + kCifarPixels;             // 3074
constexpr int64_t kCifarClasses = 100;
constexpr int64_t kCifarTrainRecords = 50000;  // train.bin
constexpr int64_t kCifarTestRecords = 10000;   // test.bin

struct CifarSplit {
  std::string path;                    // the file it was read from
  std::vector<uint8_t> pixels;         // size() * 3072, R, G, B planes per image
  std::vector<int32_t> fine_labels;    // 0..99
  std::vector<int32_t> coarse_labels;  // 0..19
  int64_t size() const { return static_cast<int64_t>(fine_labels.size()); }
};

// split: "train" (expects 50,000 records) or "test" (10,000). dir holds train.bin / test.bin.
CifarSplit load_cifar100(const std::string& dir, const std::string& split);
// The reader behind load_cifar100: one file that must hold exactly `records` records of `split` (named in messages).
CifarSplit load_cifar100_file(const std::string& path, int64_t records, const std::string& split);

// The dataset directory: `hint` if not empty (must hold train.bin and test.bin), else $ORTHOCONV_DATA, else the
// first of ../shared/cifar100/cifar-100-binary, data/cifar-100-binary, ~/.cache/orthoconv/cifar-100-binary
// (relative to the current directory) that holds both files. Throws IoError listing what was tried.
std::string find_cifar100(const std::string& hint = "");

struct Normalization {
  std::array<float, 3> mean{0.4914f, 0.4822f, 0.4465f};
  std::array<float, 3> std{0.2507f, 0.2507f, 0.2507f};
  // Lipschitz constant of x -> (x - mean) / std: 1 / min(std), in double (the float32 quotient could round
  // below the true constant). Throws ConfigError unless every std is positive and finite.
  double lipschitz() const;
};

struct Batch {
  Tensor images;                 // [n, 3, 32, 32], normalized, float32, CPU
  std::vector<int32_t> labels;   // fine labels
  std::vector<int64_t> indices;  // record indices in the split
};

// Fills `out` with images[indices] (no augmentation), normalized.
void make_batch(const CifarSplit& split, const std::vector<int64_t>& indices, const Normalization& norm, Batch& out);

// ---- The pieces BatchLoader is made of, public so that tests and tools can check them one by one. ----

// (v / 255 - mean[c]) / std[c] in float32 for every byte v and channel c, the same arithmetic as the reference
// (ToTensor, then Normalize): normalizing is one table lookup per pixel.
using NormalizationTable = std::array<std::array<float, 256>, 3>;
NormalizationTable normalization_table(const Normalization& norm);

// One image's augmentation: the top-left corner (crop_x, crop_y), each 0..8, of the 32x32 window cut from the
// image zero-padded by 4 on each side, then a horizontal flip of that window. {4, 4, false} is the identity.
struct Augmentation {
  int32_t crop_x = 4;
  int32_t crop_y = 4;
  bool flip = false;
};

// out[c][y][x] = padded[c][y + crop_y][flip ? 31 - x + crop_x : x + crop_x], where padded is the record's
// 40x40 image with pixel value 0 (before normalization) around it. `pixels`: 3072 bytes, `out`: 3072 floats.
void augment_image(const uint8_t* pixels, const Augmentation& augmentation, const NormalizationTable& table,
                   float* out);

// The augmentation BatchLoader applies to the image at `position` (0-based, in visiting order) of `epoch`:
// a pure function of its arguments (a counter-based hash, the same on every platform).
Augmentation augmentation_at(uint64_t seed, int64_t epoch, int64_t position);

// The order in which BatchLoader visits positions 0..count-1 of its index list in `epoch` when shuffling:
// a permutation that is a pure function of (seed, epoch, count) (Fisher-Yates on a splitmix64 stream).
std::vector<int64_t> epoch_permutation(uint64_t seed, int64_t epoch, int64_t count);

// Iterates one split in batches, preparing the next batch on a background thread while the caller computes.
// Augmentation (training): random crop 32 from the image zero-padded by 4 on each side, random horizontal flip
// (probability 1/2). Order and augmentation are a pure function of (seed, epoch): resuming at an epoch
// reproduces it bit for bit. The last batch may be smaller (drop_last = false).
class BatchLoader {
 public:
  struct Options {
    int64_t batch_size = 128;
    bool shuffle = true;
    bool augment = true;
    bool drop_last = false;
    uint64_t seed = 42;
    // Data-parallel jobs: each batch of batch_size (the global batch) is cut into `parts` contiguous parts
    // (batch_part in communicator.hpp) and this loader builds only part `part`, with the order and augmentation
    // of the whole batch's positions; the parts of all ranks together are the batch of one loader. A part may be
    // empty (a last batch smaller than `parts`). 0 of 1: the whole batch.
    int part = 0;
    int parts = 1;
  };
  // Keeps a reference to `split` (the caller keeps it alive and unchanged); `indices` are the records iterated.
  BatchLoader(const CifarSplit& split, std::vector<int64_t> indices, Normalization norm, Options options);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // Must be called before next(). first_batch (0..batches_per_epoch()) skips that many batches without building
  // them: the batches that follow are those of an uninterrupted epoch (a resume in the middle of an epoch).
  void start_epoch(int64_t epoch, int64_t first_batch = 0);
  bool next(Batch& out);  // false at the end of the epoch
  int64_t batches_per_epoch() const;
  int64_t size() const;  // images per epoch

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace orthoconv
