// Checkpoints in the safetensors format, and atomic file writes.
//
// Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
// (padded with spaces to a multiple of 8, as the reference writer does), then the tensors' bytes. Each entry's
// data_offsets are relative to the first byte after the header. We write the tensors in name order, contiguous,
// and on load accept exactly what the reference reader accepts for F32: offsets inside the file, each span the
// size of its shape, no overlaps, no gaps, no trailing bytes.
//
// Writing: "<path>.tmp-<pid>" is written, flushed and fsync'ed, renamed over <path>, then the directory is
// fsync'ed so the rename itself survives a crash. Any failure before the rename removes the temporary file and
// leaves an existing <path> untouched.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The reference reader refuses headers above 100 MB; so do we (a corrupt length would otherwise allocate wildly).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::string errno_text() { return std::strerror(errno); }

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

std::string checkpoint_label(const std::string& path) {
  return path.empty() ? std::string("checkpoint") : "checkpoint " + path;
}

// Little-endian float32 bytes <-> floats, whatever the host's byte order (unused on a little-endian host).
[[maybe_unused]] void floats_to_le(const float* values, size_t count, char* out) {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(out, values, count * sizeof(float));
  } else {
    for (size_t i = 0; i < count; ++i) {
      const uint32_t bits = std::bit_cast<uint32_t>(values[i]);
      for (int b = 0; b < 4; ++b) out[4 * i + b] = static_cast<char>((bits >> (8 * b)) & 0xff);
    }
  }
}

void le_to_floats(float* values, size_t count) {
  if constexpr (std::endian::native != std::endian::little) {
    for (size_t i = 0; i < count; ++i) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(values + i);
      uint32_t bits = 0;
      for (int b = 0; b < 4; ++b) bits |= static_cast<uint32_t>(bytes[b]) << (8 * b);
      values[i] = std::bit_cast<float>(bits);
    }
  }
}

// Writes through a FILE*, throwing IoError on the first failure.
class Sink {
 public:
  Sink(std::FILE* file, const std::string& what) : file_(file), what_(what) {}
  void write(const void* data, size_t bytes) {
    if (bytes != 0 && std::fwrite(data, 1, bytes, file_) != bytes) {
      throw IoError("cannot write " + what_ + ": " + errno_text());
    }
  }

 private:
  std::FILE* file_;
  const std::string& what_;
};

// The atomic write shared by checkpoints and text files: `produce` writes the contents into the sink.
void write_atomically(const std::string& path, const std::string& what, const std::function<void(Sink&)>& produce) {
  require<IoError>(!path.empty(), "cannot write ", what, ": empty path");
  const fs::path target(path);
  const fs::path directory = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const std::string temporary = temporary_path(path);
  const std::string label = what + " " + path;

  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    const std::string reason = errno_text();
    std::error_code ec;
    std::string hint;
    if (!fs::exists(directory, ec)) {
      hint = " (directory " + directory.string() + " does not exist)";
    } else if (!fs::is_directory(directory, ec)) {
      hint = " (" + directory.string() + " is not a directory)";
    }
    throw IoError("cannot write " + label + ": cannot create " + temporary + ": " + reason + hint);
  }
  std::FILE* file = ::fdopen(fd, "wb");
  if (file == nullptr) {
    const std::string reason = errno_text();
    ::close(fd);
    ::unlink(temporary.c_str());
    throw IoError("cannot write " + label + ": " + reason);
  }
  try {
    Sink sink(file, label);
    produce(sink);
    if (std::fflush(file) != 0) throw IoError("cannot write " + label + ": flush failed: " + errno_text());
    if (::fsync(::fileno(file)) != 0) throw IoError("cannot write " + label + ": fsync failed: " + errno_text());
    const int closed = std::fclose(file);
    file = nullptr;
    if (closed != 0) throw IoError("cannot write " + label + ": close failed: " + errno_text());
    if (std::rename(temporary.c_str(), path.c_str()) != 0) {
      throw IoError("cannot write " + label + ": cannot rename " + temporary + " over it: " + errno_text());
    }
  } catch (...) {
    if (file != nullptr) std::fclose(file);
    ::unlink(temporary.c_str());
    throw;
  }
  // The rename is done: make it durable. Some file systems cannot fsync a directory (EINVAL): nothing to do there.
  const int dir_fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) throw IoError("wrote " + label + " but cannot open its directory to fsync it: " + errno_text());
  const int synced = ::fsync(dir_fd);
  const int sync_errno = errno;
  ::close(dir_fd);
  if (synced != 0 && sync_errno != EINVAL && sync_errno != EROFS) {
    throw IoError("wrote " + label + " but fsync of its directory failed: " + std::strerror(sync_errno));
  }
}

// Reads exactly `bytes` at `offset`, or throws.
void read_exactly(int fd, void* out, size_t bytes, uint64_t offset, const std::string& label) {
  auto* cursor = static_cast<char*>(out);
  while (bytes > 0) {
    const ssize_t got = ::pread(fd, cursor, std::min<size_t>(bytes, size_t{1} << 30), static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError(label + ": read failed: " + errno_text());
    }
    if (got == 0) throw IoError(label + ": unexpected end of file (file changed while reading?)");
    cursor += got;
    bytes -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// Parses a non-negative JSON integer that fits int64.
bool as_count(const json& value, int64_t& out) {
  if (value.is_number_unsigned()) {
    const uint64_t v = value.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    out = static_cast<int64_t>(v);
    return true;
  }
  if (value.is_number_integer()) {
    const int64_t v = value.get<int64_t>();
    if (v < 0) return false;
    out = v;
    return true;
  }
  return false;
}

struct Entry {
  std::string name;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

}  // namespace

const CheckpointTensor& Checkpoint::tensor(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  auto found = tensors.find(name);
  if (found == tensors.end()) throw IoError(checkpoint_label(path) + ": missing tensor '" + name + "'");
  if (found->second.shape != expected_shape) {
    throw IoError(checkpoint_label(path) + ": tensor '" + name + "' has shape " + shape_text(found->second.shape) +
                  ", expected " + shape_text(expected_shape));
  }
  return found->second;
}

const std::string& Checkpoint::meta(const std::string& key) const {
  auto found = metadata.find(key);
  if (found == metadata.end()) throw IoError(checkpoint_label(path) + ": missing metadata '" + key + "'");
  return found->second;
}

void save_checkpoint(const std::string& path, const Checkpoint& checkpoint) {
  // Validate and lay out everything before touching the file system.
  json header = json::object();
  if (!checkpoint.metadata.empty()) {
    json metadata = json::object();
    for (const auto& [key, value] : checkpoint.metadata) metadata[key] = value;
    header["__metadata__"] = std::move(metadata);
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : checkpoint.tensors) {
    require<ShapeError>(!name.empty() && name != "__metadata__", "checkpoint ", path, ": invalid tensor name '", name,
                        "'");
    uint64_t count = 1;
    for (int64_t d : tensor.shape) {
      require<ShapeError>(d >= 0, "checkpoint ", path, ": tensor '", name, "' has negative dimension in shape ",
                          shape_text(tensor.shape));
      count *= static_cast<uint64_t>(d);
    }
    require<ShapeError>(count == tensor.values.size(), "checkpoint ", path, ": tensor '", name, "' has ",
                        tensor.values.size(), " values but shape ", shape_text(tensor.shape), " needs ", count);
    const uint64_t bytes = count * sizeof(float);
    header[name] = {{"dtype", "F32"}, {"shape", tensor.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const json::exception& error) {  // names or metadata that are not valid UTF-8
    throw ConfigError("checkpoint " + path + ": cannot encode the header: " + error.what());
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  unsigned char length_bytes[8];
  const uint64_t header_size = header_text.size();
  for (int b = 0; b < 8; ++b) length_bytes[b] = static_cast<unsigned char>((header_size >> (8 * b)) & 0xff);

  write_atomically(path, "checkpoint", [&](Sink& sink) {
    sink.write(length_bytes, sizeof(length_bytes));
    sink.write(header_text.data(), header_text.size());
    std::vector<char> staging;
    for (const auto& entry : checkpoint.tensors) {
      const CheckpointTensor& tensor = entry.second;
      if constexpr (std::endian::native == std::endian::little) {
        sink.write(tensor.values.data(), tensor.values.size() * sizeof(float));
      } else {
        staging.resize(tensor.values.size() * sizeof(float));
        floats_to_le(tensor.values.data(), tensor.values.size(), staging.data());
        sink.write(staging.data(), staging.size());
      }
    }
  });
}

namespace {

using Failure = std::function<IoError(const std::string&)>;

// The JSON header of an open safetensors file of file_size bytes (length prefix checked against the file).
json read_header(int fd, uint64_t file_size, const std::string& label, const Failure& fail, uint64_t& header_size) {
  if (file_size < 8) {
    throw fail("truncated: " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length");
  }
  unsigned char length_bytes[8];
  read_exactly(fd, length_bytes, 8, 0, label);
  header_size = 0;
  for (int b = 0; b < 8; ++b) header_size |= static_cast<uint64_t>(length_bytes[b]) << (8 * b);
  if (header_size < 2 || header_size > kMaxHeaderBytes) {
    throw fail("bad header length " + std::to_string(header_size) + " (not a safetensors file?)");
  }
  if (header_size > file_size - 8) {
    throw fail("truncated: header length " + std::to_string(header_size) + " but only " +
               std::to_string(file_size - 8) + " bytes follow it");
  }
  std::string header_text(header_size, '\0');
  read_exactly(fd, header_text.data(), header_size, 8, label);
  if (header_text[0] != '{') throw fail("header does not start with '{' (not a safetensors file?)");

  // Parse, refusing duplicate top-level names (nlohmann would silently keep the last one).
  std::set<std::string> seen;
  std::string duplicate;
  const json::parser_callback_t callback = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key) {
      const std::string key = parsed.get<std::string>();
      if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(header_text, callback, /*allow_exceptions=*/true);
  } catch (const json::exception& error) {
    throw fail(std::string("header is not valid JSON: ") + error.what());
  }
  if (!header.is_object()) throw fail("header is not a JSON object");
  if (!duplicate.empty()) throw fail("header names '" + duplicate + "' twice");
  return header;
}

// One tensor's header entry: dtype F32, a shape whose byte count cannot overflow, and data_offsets that span it.
Entry parse_entry(const std::string& name, const json& value, const Failure& fail) {
  const std::string where = "tensor '" + name + "'";
  if (!value.is_object()) throw fail(where + ": entry is not an object");
  for (const auto& [field, ignored] : value.items()) {
    (void)ignored;
    if (field != "dtype" && field != "shape" && field != "data_offsets") {
      throw fail(where + ": unknown field '" + field + "'");
    }
  }
  if (!value.contains("dtype") || !value["dtype"].is_string()) throw fail(where + ": missing dtype");
  const std::string dtype = value["dtype"].get<std::string>();
  if (dtype != "F32") throw fail(where + ": dtype " + dtype + " is not supported (only F32)");
  if (!value.contains("shape") || !value["shape"].is_array()) throw fail(where + ": missing or invalid shape");
  Entry entry;
  entry.name = name;
  for (const auto& dim : value["shape"]) {
    int64_t d = 0;
    if (!as_count(dim, d)) throw fail(where + ": shape entries must be non-negative integers");
    entry.shape.push_back(d);
  }
  // Element count, refusing products that overflow (a zero dimension makes any product fine).
  uint64_t count = 1;
  if (std::find(entry.shape.begin(), entry.shape.end(), 0) != entry.shape.end()) {
    count = 0;
  } else {
    for (int64_t d : entry.shape) {
      if (count > std::numeric_limits<uint64_t>::max() / 4 / static_cast<uint64_t>(d)) {
        throw fail(where + ": shape " + shape_text(entry.shape) + " is too large");
      }
      count *= static_cast<uint64_t>(d);
    }
  }
  const json& offsets = value.contains("data_offsets") ? value["data_offsets"] : json();
  int64_t begin = 0;
  int64_t end = 0;
  if (!offsets.is_array() || offsets.size() != 2 || !as_count(offsets[0], begin) || !as_count(offsets[1], end)) {
    throw fail(where + ": data_offsets must be two non-negative integers");
  }
  entry.begin = static_cast<uint64_t>(begin);
  entry.end = static_cast<uint64_t>(end);
  if (entry.end < entry.begin) throw fail(where + ": data_offsets end before they begin");
  if (entry.end - entry.begin != count * 4) {
    throw fail(where + ": data_offsets span " + std::to_string(entry.end - entry.begin) + " bytes but shape " +
               shape_text(entry.shape) + " of F32 needs " + std::to_string(count * 4));
  }
  return entry;
}

// Spans must tile the data section exactly, as the reference reader requires. Sorts entries by offset.
void check_tiling(std::vector<Entry>& entries, uint64_t data_size, const Failure& fail) {
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t covered = 0;
  for (const Entry& entry : entries) {
    if (entry.end > data_size) {
      throw fail("truncated: tensor '" + entry.name + "' ends at byte " + std::to_string(entry.end) +
                 " of the data but the file holds only " + std::to_string(data_size) + " data bytes");
    }
    if (entry.begin < covered) throw fail("tensor '" + entry.name + "' overlaps the tensor before it");
    if (entry.begin > covered) {
      throw fail("gap of " + std::to_string(entry.begin - covered) + " bytes before tensor '" + entry.name + "'");
    }
    covered = entry.end;
  }
  if (covered != data_size) {
    throw fail(std::to_string(data_size - covered) + " bytes after the last tensor (corrupt or wrong header)");
  }
}

}  // namespace

Checkpoint load_checkpoint(const std::string& path) {
  const std::string label = checkpoint_label(path);
  const Failure fail = [&](const std::string& problem) { return IoError(label + ": " + problem); };

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw fail(std::string(errno == ENOENT ? "not found" : "cannot open") + ": " + errno_text());
  FdCloser closer{fd};
  struct stat info {};
  if (::fstat(fd, &info) != 0) throw fail("cannot stat: " + errno_text());
  if (!S_ISREG(info.st_mode)) throw fail("not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(info.st_size);
  uint64_t header_size = 0;
  const json header = read_header(fd, file_size, label, fail, header_size);

  Checkpoint out;
  out.path = path;
  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) throw fail("__metadata__ is not an object");
      for (const auto& [key, text] : value.items()) {
        if (!text.is_string()) throw fail("metadata '" + key + "' is not a string");
        out.metadata[key] = text.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(name, value, fail));
  }
  const uint64_t data_start = 8 + header_size;
  check_tiling(entries, file_size - data_start, fail);

  for (const Entry& entry : entries) {
    CheckpointTensor& tensor = out.tensors[entry.name];
    tensor.shape = entry.shape;
    tensor.values.resize((entry.end - entry.begin) / 4);
    read_exactly(fd, tensor.values.data(), entry.end - entry.begin, data_start + entry.begin, label);
    le_to_floats(tensor.values.data(), tensor.values.size());
  }
  return out;
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  write_atomically(path, "file", [&](Sink& sink) { sink.write(contents.data(), contents.size()); });
}

std::string temporary_path(const std::string& path) { return path + ".tmp-" + std::to_string(::getpid()); }

std::vector<std::string> remove_stale_temporaries(const std::string& directory, const std::vector<std::string>& names) {
  std::vector<std::string> removed;
  std::error_code ec;
  for (fs::directory_iterator it(directory, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string file = it->path().filename().string();
    for (const std::string& name : names) {
      const std::string prefix = name + ".tmp-";
      if (file.size() <= prefix.size() || file.compare(0, prefix.size(), prefix) != 0) continue;
      if (!std::all_of(file.begin() + static_cast<std::ptrdiff_t>(prefix.size()), file.end(),
                       [](char c) { return c >= '0' && c <= '9'; }))
        continue;
      std::error_code removal;
      if (!fs::remove(it->path(), removal) && removal)
        throw IoError("cannot remove the stale temporary file " + it->path().string() + ": " + removal.message());
      removed.push_back(it->path().string());
    }
  }
  if (ec) throw IoError("cannot list " + directory + ": " + ec.message());
  return removed;
}

void check_writable_file(const std::string& path, const std::string& what) {
  auto fail = [&](const std::string& problem) { return IoError("cannot write " + what + " " + path + ": " + problem); };
  if (path.empty()) throw IoError("cannot write " + what + ": empty path");
  const fs::path target(path);
  const fs::path directory = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  const fs::file_type type = fs::status(directory, ec).type();
  if (type == fs::file_type::not_found) throw fail("directory " + directory.string() + " does not exist");
  if (type != fs::file_type::directory) throw fail(directory.string() + " is not a directory");
  if (::access(directory.c_str(), W_OK) != 0) throw fail("directory " + directory.string() + " is not writable");
  if (fs::is_directory(target, ec)) throw fail("it is a directory");
}

}  // namespace orthoconv
