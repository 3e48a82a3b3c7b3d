// BatchLoader: one background thread prepares the next batches (gather, crop, flip, normalize) while the caller
// computes on the current one.
//
// Every batch is a pure function of (seed, epoch, batch number): the worker takes the epoch's permutation and
// each image's augmentation from epoch_permutation / augmentation_at, so it does not matter which thread builds a
// batch, or when; a run resumed at epoch e sees exactly the batches of an uninterrupted run.
//
// Concurrency: a generation counter tags each epoch. start_epoch() bumps it and drops whatever was prepared for
// the previous one (a consumer may stop early); the worker checks the generation before publishing. The worker
// keeps at most kPrefetch finished batches; the destructor sets `stopping` and joins (a batch takes about a
// millisecond, so it never waits long). An exception in the worker is handed to the consumer: next() rethrows it.
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

#include "orthoconv/communicator.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv {

namespace {
constexpr size_t kPrefetch = 2;  // finished batches kept ahead of the consumer
}

struct BatchLoader::Impl {
  const CifarSplit& split;
  const std::vector<int64_t> indices;
  const Options options;
  const NormalizationTable table;
  const int64_t batches;
  const int64_t images;

  std::mutex mutex;
  std::condition_variable work_ready;   // the worker waits on it
  std::condition_variable batch_ready;  // next() waits on it
  bool stopping = false;
  bool started = false;     // start_epoch was called at least once
  uint64_t generation = 0;  // bumped by each start_epoch
  int64_t epoch = 0;
  std::shared_ptr<const std::vector<int64_t>> order;  // the epoch's visiting order (positions into indices)
  int64_t next_to_build = 0;                          // batch number the worker builds next
  int64_t next_to_hand_out = 0;                       // batch number next() returns next
  std::deque<std::unique_ptr<Batch>> finished;        // in batch order, next_to_hand_out first
  std::vector<std::unique_ptr<Batch>> spare;          // buffers to reuse (no allocation in the steady state)
  std::exception_ptr failure;                         // the worker's exception for this generation
  std::thread worker;

  Impl(const CifarSplit& split_in, std::vector<int64_t> indices_in, const Normalization& norm, const Options& opts)
      : split(split_in),
        indices(std::move(indices_in)),
        options(opts),
        table(normalization_table(norm)),
        batches(count_batches(static_cast<int64_t>(indices.size()), opts)),
        images(opts.drop_last ? batches * opts.batch_size : static_cast<int64_t>(indices.size())) {
    for (int64_t index : indices) {
      require(index >= 0 && index < split.size(), "BatchLoader: record index ", index, " out of range for ", split.path,
              " (", split.size(), " records)");
    }
    try {
      worker = std::thread([this] { run(); });
    } catch (const std::system_error& error) {
      throw Error(std::string("BatchLoader: cannot start its worker thread: ") + error.what());
    }
  }

  static int64_t count_batches(int64_t count, const Options& opts) {
    require(opts.batch_size > 0, "batch size must be positive, got ", opts.batch_size);
    require(opts.parts > 0 && opts.part >= 0 && opts.part < opts.parts, "BatchLoader: part ", opts.part, " of ",
            opts.parts);
    return opts.drop_last ? count / opts.batch_size : (count + opts.batch_size - 1) / opts.batch_size;
  }

  ~Impl() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    work_ready.notify_all();
    if (worker.joinable()) worker.join();
  }

  // Builds batch `number` of `epoch_number` into `out`. Runs on the worker thread without the lock: it reads only
  // immutable state and the epoch's order, which it holds by shared_ptr.
  void build(const std::vector<int64_t>& visit, int64_t epoch_number, int64_t number, Batch& out) const {
    // The split is the caller's: check it still is what the loader was built on before reading from it.
    require<Error>(static_cast<int64_t>(split.pixels.size()) == split.size() * kCifarPixels,
                   "BatchLoader: CIFAR split ", split.path, " changed under the loader (", split.pixels.size(),
                   " pixel bytes for ", split.size(), " labels)");
    const int64_t whole =
        std::min(options.batch_size, static_cast<int64_t>(visit.size()) - number * options.batch_size);
    const Range part = batch_part(whole, options.part, options.parts);  // of the batch's positions
    const int64_t first = number * options.batch_size + part.begin;
    const int64_t count = part.size();
    const Shape shape{count, 3, kCifarSide, kCifarSide};
    out.images.resize(shape);
    out.labels.resize(static_cast<size_t>(count));
    out.indices.resize(static_cast<size_t>(count));
    const Augmentation identity;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t position = first + i;
      const int64_t index = indices[static_cast<size_t>(visit[static_cast<size_t>(position)])];
      require<Error>(index < split.size(), "BatchLoader: record index ", index, " out of range for ", split.path, " (",
                     split.size(), " records; the split changed under the loader)");
      out.indices[static_cast<size_t>(i)] = index;
      out.labels[static_cast<size_t>(i)] = split.fine_labels[static_cast<size_t>(index)];
      const Augmentation augmentation =
          options.augment ? augmentation_at(options.seed, epoch_number, position) : identity;
      augment_image(split.pixels.data() + index * kCifarPixels, augmentation, table,
                    out.images.data() + i * kCifarPixels);
    }
  }

  void run() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      work_ready.wait(lock, [this] {
        return stopping || (started && !failure && next_to_build < batches && finished.size() < kPrefetch);
      });
      if (stopping) return;
      const uint64_t my_generation = generation;
      const int64_t my_epoch = epoch;
      const int64_t number = next_to_build++;
      std::shared_ptr<const std::vector<int64_t>> my_order = order;
      std::unique_ptr<Batch> buffer;
      if (!spare.empty()) {
        buffer = std::move(spare.back());
        spare.pop_back();
      }
      lock.unlock();
      std::exception_ptr error;
      try {
        if (!buffer) buffer = std::make_unique<Batch>();
        build(*my_order, my_epoch, number, *buffer);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (my_generation != generation) {
        if (buffer) spare.push_back(std::move(buffer));  // built for an epoch nobody reads any more
        continue;
      }
      if (error) {
        failure = error;
        if (buffer) spare.push_back(std::move(buffer));
      } else {
        finished.push_back(std::move(buffer));
      }
      batch_ready.notify_all();
    }
  }

  void start_epoch(int64_t epoch_number, int64_t first_batch) {
    require(first_batch >= 0 && first_batch <= batches, "BatchLoader: first batch ", first_batch, " is outside 0..",
            batches);
    const int64_t count = static_cast<int64_t>(indices.size());
    std::shared_ptr<const std::vector<int64_t>> new_order;
    if (options.shuffle) {
      new_order = std::make_shared<const std::vector<int64_t>>(epoch_permutation(options.seed, epoch_number, count));
    } else {
      std::vector<int64_t> identity(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) identity[static_cast<size_t>(i)] = i;
      new_order = std::make_shared<const std::vector<int64_t>>(std::move(identity));
    }
    {
      std::lock_guard<std::mutex> lock(mutex);
      ++generation;
      started = true;
      epoch = epoch_number;
      order = std::move(new_order);
      next_to_build = first_batch;
      next_to_hand_out = first_batch;
      failure = nullptr;
      while (!finished.empty()) {
        spare.push_back(std::move(finished.front()));
        finished.pop_front();
      }
    }
    work_ready.notify_all();
  }

  bool next(Batch& out) {
    std::unique_ptr<Batch> ready;
    {
      std::unique_lock<std::mutex> lock(mutex);
      require<Error>(started, "BatchLoader::next called before start_epoch");
      if (next_to_hand_out >= batches) return false;
      batch_ready.wait(lock, [this] { return !finished.empty() || failure; });
      if (finished.empty()) std::rethrow_exception(failure);
      ready = std::move(finished.front());
      finished.pop_front();
      ++next_to_hand_out;
    }
    work_ready.notify_all();
    // Copy rather than swap: the caller may still hold handles to out.images from the previous batch, and the
    // worker must never write into memory the caller can see. 1.5 MB per batch of 128: well under a millisecond.
    const Shape& shape = ready->images.shape();
    if (out.images.device() != Device::cpu || (!out.images.owns_memory() && out.images.numel() < shape.numel())) {
      out.images = Tensor(shape);
    } else {
      out.images.resize(shape);
    }
    if (shape.numel() > 0)  // an empty part of a batch (data-parallel) has no storage to copy
      std::memcpy(out.images.data(), ready->images.data(), static_cast<size_t>(shape.numel()) * sizeof(float));
    out.labels = ready->labels;
    out.indices = ready->indices;
    {
      std::lock_guard<std::mutex> lock(mutex);
      spare.push_back(std::move(ready));
    }
    return true;
  }
};

BatchLoader::BatchLoader(const CifarSplit& split, std::vector<int64_t> indices, Normalization norm, Options options)
    : impl_(std::make_unique<Impl>(split, std::move(indices), norm, options)) {}

BatchLoader::~BatchLoader() = default;

void BatchLoader::start_epoch(int64_t epoch, int64_t first_batch) { impl_->start_epoch(epoch, first_batch); }

bool BatchLoader::next(Batch& out) { return impl_->next(out); }

int64_t BatchLoader::batches_per_epoch() const { return impl_->batches; }

int64_t BatchLoader::size() const { return impl_->images; }

}  // namespace orthoconv
