// The single-process communicator and, in builds with MPI (ORTHOCONV_WITH_MPI), the MPI one over MPI_COMM_WORLD,
// with NCCL for CUDA device memory (ORTHOCONV_WITH_NCCL). See include/orthoconv/communicator.hpp.
//
// MPI's default error handler (MPI_ERRORS_ARE_FATAL) stays in place: a failed MPI call ends the whole job, which is
// what a rank that cannot communicate should do; so the calls below have no error path of their own.
#include "orthoconv/communicator.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "orthoconv/error.hpp"

#ifdef ORTHOCONV_WITH_MPI
// MPI's C API only: the deprecated C++ bindings would drag in their headers (and their warnings).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif
#ifdef ORTHOCONV_WITH_NCCL
#include "backend/cuda/nccl.hpp"
#endif

namespace orthoconv {

Range batch_part(int64_t count, int rank, int ranks) {
  require(ranks > 0 && rank >= 0 && rank < ranks && count >= 0, "batch_part: rank ", rank, " of ", ranks, ", ", count,
          " items");
  return {count * rank / ranks, count * (rank + 1) / ranks};
}

Range batch_range(int64_t count, int64_t batch_size, int rank, int ranks) {
  require(batch_size > 0, "batch_range: batch size must be positive, got ", batch_size);
  const int64_t batches = (count + batch_size - 1) / batch_size;
  const Range mine = batch_part(batches, rank, ranks);
  return {std::min(count, mine.begin * batch_size), std::min(count, mine.end * batch_size)};
}

namespace {

class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  std::string description() const override { return "single process"; }
  void allreduce_sum(float*, int64_t, Device) override {}
  void allreduce_sum(double*, int64_t) override {}
  void allreduce_sum(int64_t*, int64_t) override {}
  void broadcast(void*, int64_t, int root) override {
    require(root == 0, "broadcast from rank ", root, " in a single process");
  }
  std::vector<double> allgather(const std::vector<double>& mine) override { return mine; }
  std::vector<uint64_t> allgather(uint64_t mine) override { return {mine}; }
  void barrier() override {}
  void abort_job(int) noexcept override {}
};

#ifdef ORTHOCONV_WITH_MPI

class MpiWorld final : public Communicator {
 public:
  MpiWorld() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      // FUNNELED: only the thread that called this makes MPI calls (the loader's worker and OpenMP never do).
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
      owns_mpi_ = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm local;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local);
    MPI_Comm_rank(local, &local_rank_);
    MPI_Comm_size(local, &local_size_);
    MPI_Comm_free(&local);
    char library[MPI_MAX_LIBRARY_VERSION_STRING] = {};
    int length = 0;
    MPI_Get_library_version(library, &length);
    std::string name(library, static_cast<size_t>(length));
    name = name.substr(0, name.find_first_of(",\n"));  // "Open MPI v4.1.4, package: ..." -> "Open MPI v4.1.4"
    description_ = "MPI (" + name + "), " + std::to_string(size_) + (size_ == 1 ? " rank" : " ranks");
#ifdef ORTHOCONV_WITH_NCCL
    description_ += std::string(", NCCL ") + cuda::nccl_version() + " for CUDA memory";
#endif
  }
  ~MpiWorld() override {
    // NCCL's communicator is left to the end of the process: destroying it from a static destructor could run
    // after the CUDA runtime has shut down.
#ifdef ORTHOCONV_WITH_NCCL
    (void)nccl_.release();
#endif
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_mpi_ && !finalized) MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  std::string description() const override { return description_; }

  void allreduce_sum(float* data, int64_t count, Device device) override {
    if (device == Device::cuda) {
#ifdef ORTHOCONV_WITH_NCCL
      if (!nccl_) {
        std::vector<unsigned char> id =
            rank_ == 0 ? cuda::nccl_unique_id() : std::vector<unsigned char>(cuda::kNcclIdBytes);
        broadcast(id.data(), static_cast<int64_t>(id.size()), 0);
        nccl_ = std::make_unique<cuda::NcclCommunicator>(id, size_, rank_);
      }
      nccl_->allreduce_sum(data, count);
      return;
#else
      throw NamingSettings<BackendError>({"device"},
                                         "an all-reduce of CUDA memory needs NCCL, and this build has none (rebuild "
                                         "with the CUDA toolkit's NCCL, or train with {0} cpu)");
#endif
    }
    for_chunks(count, [&](int64_t first, int chunk) {
      MPI_Allreduce(MPI_IN_PLACE, data + first, chunk, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    });
  }
  void allreduce_sum(double* data, int64_t count) override {
    for_chunks(count, [&](int64_t first, int chunk) {
      MPI_Allreduce(MPI_IN_PLACE, data + first, chunk, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    });
  }
  void allreduce_sum(int64_t* data, int64_t count) override {
    for_chunks(count, [&](int64_t first, int chunk) {
      MPI_Allreduce(MPI_IN_PLACE, data + first, chunk, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    });
  }
  void broadcast(void* data, int64_t bytes, int root) override {
    require(root >= 0 && root < size_, "broadcast from rank ", root, " of ", size_);
    char* bytes_data = static_cast<char*>(data);
    for_chunks(bytes,
               [&](int64_t first, int chunk) { MPI_Bcast(bytes_data + first, chunk, MPI_BYTE, root, MPI_COMM_WORLD); });
  }
  std::vector<double> allgather(const std::vector<double>& mine) override {
    require(mine.size() <= static_cast<size_t>(kChunk), "allgather of ", mine.size(), " values per rank: at most ",
            kChunk);
    const int count = static_cast<int>(mine.size());
    std::vector<int> counts(static_cast<size_t>(size_)), offsets(static_cast<size_t>(size_));
    MPI_Allgather(&count, 1, MPI_INT, counts.data(), 1, MPI_INT, MPI_COMM_WORLD);
    int64_t total = 0;
    for (int r = 0; r < size_; ++r) {
      offsets[static_cast<size_t>(r)] = static_cast<int>(total);
      total += counts[static_cast<size_t>(r)];
    }
    require(total <= kChunk, "allgather of ", total, " values in all: at most ", kChunk);
    std::vector<double> out(static_cast<size_t>(total));
    MPI_Allgatherv(mine.data(), count, MPI_DOUBLE, out.data(), counts.data(), offsets.data(), MPI_DOUBLE,
                   MPI_COMM_WORLD);
    return out;
  }
  std::vector<uint64_t> allgather(uint64_t mine) override {
    std::vector<uint64_t> out(static_cast<size_t>(size_));
    MPI_Allgather(&mine, 1, MPI_UINT64_T, out.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
    return out;
  }
  void barrier() override { MPI_Barrier(MPI_COMM_WORLD); }
  void abort_job(int code) noexcept override { MPI_Abort(MPI_COMM_WORLD, code); }

 private:
  // MPI counts are int: larger buffers go in chunks of at most 2^30 elements.
  static constexpr int64_t kChunk = int64_t{1} << 30;
  template <class F>
  static void for_chunks(int64_t count, F&& call) {
    for (int64_t first = 0; first < count; first += kChunk)
      call(first, static_cast<int>(std::min(kChunk, count - first)));
  }

  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  bool owns_mpi_ = false;
  std::string description_;
#ifdef ORTHOCONV_WITH_NCCL
  std::unique_ptr<cuda::NcclCommunicator> nccl_;
#endif
};

#endif  // ORTHOCONV_WITH_MPI

std::mutex g_world_mutex;
std::shared_ptr<Communicator> g_world;

}  // namespace

std::shared_ptr<Communicator> single_process_communicator() { return std::make_shared<SingleProcess>(); }

bool mpi_built() {
#ifdef ORTHOCONV_WITH_MPI
  return true;
#else
  return false;
#endif
}

bool nccl_built() {
#ifdef ORTHOCONV_WITH_NCCL
  return true;
#else
  return false;
#endif
}

bool mpi_launched() {
  if (!mpi_built()) return false;
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (const char* value = std::getenv(variable); value != nullptr && *value != '\0') return true;
  return false;
}

std::shared_ptr<Communicator> world_communicator() {
  std::lock_guard<std::mutex> lock(g_world_mutex);
  if (!g_world) {
#ifdef ORTHOCONV_WITH_MPI
    if (mpi_launched()) g_world = std::make_shared<MpiWorld>();
#endif
    if (!g_world) g_world = single_process_communicator();
  }
  return g_world;
}

std::shared_ptr<Communicator> current_communicator() {
  std::lock_guard<std::mutex> lock(g_world_mutex);
  return g_world;
}

void select_local_gpu(const Communicator& communicator) {
#ifdef ORTHOCONV_WITH_NCCL
  if (communicator.size() > 1) cuda::select_device(communicator.local_rank());
#else
  (void)communicator;
#endif
}

}  // namespace orthoconv
