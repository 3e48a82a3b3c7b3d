// Writes the committed seed corpus of the fuzz harnesses: `fuzz_make_seeds DIR` fills DIR/checkpoint and DIR/cifar
// (tests/fuzz/corpus holds its output). Seeds are small valid inputs that reach deep into each loader, and a few
// near misses; the fuzzer mutates them.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/runtime.hpp"
#include "orthoconv/trainer.hpp"

using namespace orthoconv;
namespace fs = std::filesystem;

namespace {

void write(const fs::path& file, const std::string& bytes) {
  std::ofstream(file, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

CifarSplit split_of(int64_t images) {
  CifarSplit s;
  s.path = "seed";
  s.pixels.resize(static_cast<size_t>(images * kCifarPixels));
  for (size_t i = 0; i < s.pixels.size(); ++i) s.pixels[i] = static_cast<uint8_t>(i * 131 + 7);
  for (int64_t i = 0; i < images; ++i) {
    s.fine_labels.push_back(static_cast<int32_t>(i % 2));
    s.coarse_labels.push_back(0);
  }
  return s;
}

std::string records(int64_t count, uint8_t bad_fine = 0) {
  std::string out;
  for (int64_t r = 0; r < count; ++r) {
    out += static_cast<char>(r % 20);
    out += static_cast<char>(r == count - 1 && bad_fine ? bad_fine : r % 100);
    for (int64_t i = 0; i < kCifarPixels; ++i) out += static_cast<char>((r * 31 + i * 7) & 0xff);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_make_seeds DIR\n");
    return 2;
  }
  const fs::path dir = argv[1];
  fs::create_directories(dir / "checkpoint");
  fs::create_directories(dir / "cifar");
  set_thread_count(1);

  // A training checkpoint of the smallest LipConvnet (width 1, 2 classes, soc head) stopped after one step inside
  // its epoch (train.epoch_progress); the same metadata without tensors, and that of the lln head.
  for (const char* head : {"soc", "lln"}) {
    TrainConfig c;
    c.model.conv = ConvKind::soc;
    c.model.groups = GroupCounts{1, std::nullopt};
    c.model.depth = 5;
    c.model.init_channels = 1;
    c.model.classes = 2;
    c.model.head = parse_head(head);
    c.batch_size = 2;
    c.epochs = 1;
    c.threads = 1;
    c.out_dir = (dir / ("run-" + std::string(head))).string();
    const CifarSplit train = split_of(4), test = split_of(2);
    Trainer trainer(c, train, test, nullptr);
    int polls = 0;
    trainer.set_stop_request([&] { return ++polls == 1; });
    trainer.prepare();
    trainer.run();
    const fs::path last = fs::path(c.out_dir) / "last.safetensors";
    if (c.model.head == HeadKind::soc)
      fs::copy_file(last, dir / "checkpoint" / "train-soc.safetensors", fs::copy_options::overwrite_existing);
    // The same metadata without any tensor: small, and every metadata path is still reached.
    Checkpoint k = load_checkpoint(last.string());
    k.tensors.clear();
    save_checkpoint((dir / "checkpoint" / (std::string("metadata-") + head + ".safetensors")).string(), k);
    fs::remove_all(c.out_dir);
  }
  // Bare safetensors: an empty header, one tensor, and a header that lies about its length.
  const std::string empty = "{}      ";
  write(dir / "checkpoint" / "empty.safetensors", std::string("\x08\0\0\0\0\0\0\0", 8) + empty);
  Checkpoint one;
  one.tensors["x"] = {{2, 2}, {1.0f, -2.0f, 0.5f, 0.0f}};
  one.metadata["format"] = kCheckpointFormat;
  save_checkpoint((dir / "checkpoint" / "one-tensor.safetensors").string(), one);
  write(dir / "checkpoint" / "long-header.safetensors", std::string("\xff\0\0\0\0\0\0\0", 8) + empty);

  write(dir / "cifar" / "one-record.bin", records(1));
  write(dir / "cifar" / "three-records.bin", records(3));
  write(dir / "cifar" / "bad-label.bin", records(2, 100));
  write(dir / "cifar" / "truncated.bin", records(2).substr(0, 5000));
  return 0;
}
