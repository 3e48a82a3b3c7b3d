// orthoconv/checkpoint.hpp: safetensors checkpoints, written atomically.
//
// Format: the safetensors layout (8-byte little-endian header length, a JSON header mapping each tensor name
// to {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]} plus "__metadata__": {string: string},
// then the raw little-endian data). Every tensor here is F32. Files are written to "<path>.tmp-<pid>",
// flushed and fsync'ed, then renamed over <path> (and the directory fsync'ed), so an existing checkpoint
// survives any failed save. Loading validates everything (header length, JSON, dtypes, offsets inside the file,
// sizes = product of shape * 4, no overlaps) and throws IoError naming the file and the problem.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace orthoconv {

struct CheckpointTensor {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

struct Checkpoint {
  std::map<std::string, std::string> metadata;
  std::map<std::string, CheckpointTensor> tensors;
  std::string path;  // the file it was loaded from (empty when built in memory); named in error messages

  // Throws IoError "checkpoint <file>: missing tensor '<name>'" / wrong shape.
  const CheckpointTensor& tensor(const std::string& name, const std::vector<int64_t>& expected_shape) const;
  const std::string& meta(const std::string& key) const;  // throws IoError when missing
};

void save_checkpoint(const std::string& path, const Checkpoint& checkpoint);
Checkpoint load_checkpoint(const std::string& path);

// Writes `contents` to `path` atomically (temporary file, fsync, rename). For metrics/config files too.
void write_file_atomically(const std::string& path, const std::string& contents);

}  // namespace orthoconv
