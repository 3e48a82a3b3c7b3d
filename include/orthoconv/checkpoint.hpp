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

// The temporary file this process writes `path` through: "<path>.tmp-<pid>".
std::string temporary_path(const std::string& path);
// Removes "<directory>/<name>.tmp-<digits>" for each of `names` (what a save interrupted by a crash or kill -9
// leaves behind) and returns the paths removed. Call it only while no other process may be saving those files (the
// trainer holds its directory's lock). Throws IoError when one cannot be removed.
std::vector<std::string> remove_stale_temporaries(const std::string& directory, const std::vector<std::string>& names);
// Checks, before any long computation, that write_file_atomically(path, ...) can succeed: the directory exists, is
// a directory and is writable, and `path` is not a directory. IoError "cannot write <what> <path>: ..." otherwise.
void check_writable_file(const std::string& path, const std::string& what);

}  // namespace orthoconv
