// orthoconv/communicator.hpp: the processes of a data-parallel job (MPI ranks) and the few collectives that
// training and certification need.
//
// A job is N processes (ranks 0..N-1) started by an MPI launcher (mpirun, srun, mpiexec). Each rank holds the whole
// model; a global batch is split over the ranks (batch_part), each computes the gradient of its part, and one
// all-reduce of one flat gradient buffer per step sums the parts (MPI_Allreduce on the CPU, ncclAllReduce on CUDA
// device memory, with NCCL's unique id broadcast over MPI: llm.c's design). Evaluation and certification shard
// whole evaluation batches over the ranks (batch_range) and gather per-image results, so that every rank rebuilds
// exactly the report of one process.
//
// world_communicator() is the job this process belongs to: an MPI one when the library was built with MPI
// (ORTHOCONV_MPI) AND the process was started by an MPI launcher (mpi_launched(): Open MPI's
// OMPI_COMM_WORLD_SIZE, PMI_SIZE of Hydra / Slurm PMI-1/2, or PMIX_RANK); otherwise the single-process
// communicator, whose collectives copy or do nothing and which never touches MPI, so a program run without a
// launcher is exactly the single-process program. The MPI communicator initializes MPI (MPI_THREAD_FUNNELED) unless
// the host program already did, and finalizes it at exit only when it initialized it.
//
// Every collective must be called by every rank in the same order with the same sizes (MPI's rule); a rank that
// cannot go on calls abort_job() (the command line does so for any error), which ends every rank of the job with
// the given exit code instead of leaving the others waiting in a collective. Host pointers unless said otherwise.
// Thread-compatible: one thread of a process calls the collectives.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "orthoconv/tensor.hpp"

namespace orthoconv {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Rank among the ranks on this machine, and their count (one GPU per local rank).
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  bool root() const { return rank() == 0; }
  // "MPI (Open MPI 4.1.4), 2 ranks" / "single process": for the configuration table and the benchmarks.
  virtual std::string description() const = 0;

  // data[0..count) = the sum over the ranks of each rank's data[0..count), in place, the same bits on every rank.
  // `device`: where `data` lives. Device::cuda memory is reduced with NCCL on the CUDA backend's stream (the call
  // returns once the reduction is enqueued; work enqueued afterwards on that stream sees its result); BackendError
  // in builds without NCCL.
  virtual void allreduce_sum(float* data, int64_t count, Device device) = 0;
  virtual void allreduce_sum(double* data, int64_t count) = 0;
  virtual void allreduce_sum(int64_t* data, int64_t count) = 0;
  // data[0..bytes) of rank `root` copied to every rank.
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  // The concatenation, in rank order, of every rank's `mine` (sizes may differ between ranks), on every rank.
  virtual std::vector<double> allgather(const std::vector<double>& mine) = 0;
  virtual std::vector<uint64_t> allgather(uint64_t mine) = 0;
  virtual void barrier() = 0;
  // Ends every rank of the job with exit code `code` (MPI_Abort); the single-process communicator returns, so that
  // the caller exits by itself. Never throws.
  virtual void abort_job(int code) noexcept = 0;
};

// A job of one: rank 0 of 1.
std::shared_ptr<Communicator> single_process_communicator();
// The job this process belongs to (see the top of this file); created on the first call, the same object after.
std::shared_ptr<Communicator> world_communicator();
// The job if world_communicator() was called, else null; never starts MPI (for main()'s error path).
std::shared_ptr<Communicator> current_communicator();
// This library was built with MPI (ORTHOCONV_MPI), and with NCCL for the CUDA backend.
bool mpi_built();
bool nccl_built();
// Started by an MPI launcher (the environment variables above); false in builds without MPI.
bool mpi_launched();

// With more than one rank and the CUDA backend built with NCCL: makes GPU local_rank % (GPUs of this machine)
// current, so that each rank of a machine uses its own GPU. Call it before the CUDA backend's first use (it keeps
// the device current then). Does nothing for a single rank or in builds without NCCL. BackendError without a GPU.
void select_local_gpu(const Communicator& communicator);

// The part of a batch of `count` items that rank `rank` of `ranks` takes: [begin, end), contiguous, in rank order,
// sizes differing by at most one (count * rank / ranks .. count * (rank + 1) / ranks). A part may be empty.
struct Range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
Range batch_part(int64_t count, int rank, int ranks);
// The evaluation batches of `count` items in batches of `batch_size` that rank `rank` of `ranks` runs, as a range
// of items: whole batches, contiguous, so that every image is evaluated in the batch it has in one process.
Range batch_range(int64_t count, int64_t batch_size, int rank, int ranks);

}  // namespace orthoconv
