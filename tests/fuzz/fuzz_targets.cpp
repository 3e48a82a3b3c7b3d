// See fuzz_targets.hpp.
#include "fuzz_targets.hpp"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/error.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/trainer.hpp"

namespace orthoconv::fuzz {

namespace {

// The input as a file (the loaders read files), private to this process and removed when done.
class InputFile {
 public:
  InputFile(const uint8_t* data, size_t size, const char* name)
      : path_((std::filesystem::temp_directory_path() / ("orthoconv-fuzz-" + std::to_string(::getpid()) + "-" + name))
                  .string()) {
    std::FILE* file = std::fopen(path_.c_str(), "wb");
    if (file == nullptr || (size > 0 && std::fwrite(data, 1, size, file) != size) || std::fclose(file) != 0) {
      std::perror(path_.c_str());
      std::abort();  // the harness itself failed: not a finding about the input
    }
  }
  ~InputFile() { std::remove(path_.c_str()); }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs `part`, accepting an orthoconv::Error as the input's rejection.
template <typename Part>
bool accepted(Part&& part) {
  try {
    part();
    return true;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace

int checkpoint_input(const uint8_t* data, size_t size) {
  const InputFile file(data, size, "checkpoint.safetensors");
  const std::string& path = file.path();
  Checkpoint checkpoint;
  if (!accepted([&] { checkpoint = load_checkpoint(path); })) return 0;
  accepted([&] { normalization_from_checkpoint(checkpoint, path); });
  accepted([&] { read_training_state(checkpoint, path); });
  ModelConfig config;
  if (!accepted([&] { config = model_config_from_checkpoint(checkpoint, path); })) return 0;
  // Building a model is the costly part of an input: only small ones (the seeds' width-1 nets are ~15k weights).
  if (config.sizes().weights > 1e5 || config.sizes().activations > 1e6) return 0;
  config.init_iterations = 0;
  accepted([&] {
    LipConvnet model(config);
    read_model_state(checkpoint, path, model);
    Sgd optimizer(model);
    optimizer.load(checkpoint, path);
  });
  return 0;
}

int cifar_input(const uint8_t* data, size_t size) {
  const InputFile file(data, size, "cifar.bin");
  const std::string& path = file.path();
  const int64_t records = static_cast<int64_t>(size / static_cast<size_t>(kCifarRecord));
  if (accepted([&] { load_cifar100_file(path, records + 1, "fuzz"); }))
    throw std::logic_error("a file of " + std::to_string(records) + " records was read as " +
                           std::to_string(records + 1));
  CifarSplit split;
  if (!accepted([&] { split = load_cifar100_file(path, records, "fuzz"); }) || split.size() == 0) return 0;
  const Normalization norm;
  Batch batch;
  make_batch(split, {0, split.size() - 1}, norm, batch);
  std::vector<int64_t> indices;
  for (int64_t i = 0; i < split.size(); ++i) indices.push_back(i);
  BatchLoader::Options options;
  options.batch_size = 2;
  options.seed = size;
  BatchLoader loader(split, indices, norm, options);
  loader.start_epoch(static_cast<int64_t>(data[0]));
  while (loader.next(batch)) {
  }
  return 0;
}

}  // namespace orthoconv::fuzz
