// orthoconv/limits.hpp: the bounds that sizes, counts and thread numbers are checked against BEFORE anything is
// allocated or multiplied, so that a setting too large (a flag, config.json or crafted checkpoint metadata) is one
// ConfigError naming it, never std::bad_alloc, an overflowed product, a runtime crash or the kernel's OOM killer.
#pragma once

#include <cstdint>
#include <string>

namespace orthoconv {

// LipConvnet-N: the papers go to N = 40; a deeper net is refused (its per-layer objects alone would exhaust memory
// long before its weights do, and every layer multiplies the verified bound).
constexpr int64_t kMaxDepth = 1000;
// Taylor terms of a SOC exponential: 12 already leave a truncation error below float32 rounding for the trained
// layers (docs/certificates.md); each term is a convolution, so a huge count is a hang, not more accuracy.
constexpr int kMaxSeriesTerms = 100;
// Training steps (epochs x steps per epoch): the schedule's milestones floor(total * fraction) are computed in
// double, exact up to 2^53.
constexpr int64_t kMaxTrainingSteps = int64_t{1} << 53;

// Physical memory of this machine in bytes (sysconf), or 0 when unknown (then no memory check is made).
int64_t physical_memory_bytes();
// Throws ConfigError "<what> needs at least X of memory, more than this machine's Y" when `bytes` (a LOWER bound
// of what will be allocated, computed in double so it cannot overflow) exceeds physical memory.
void require_memory(double bytes, const std::string& what);
// "1.5 GiB", "117 TiB": for messages.
std::string format_bytes(double bytes);

// The processors this process may run on (OpenMP's omp_get_num_procs: the affinity mask). More OpenMP threads
// than that only slow oneDNN down, and far more crash the runtimes (oneDNN's per-thread scratchpads, libgomp's
// team arrays on the stack).
int max_thread_count();
// A thread count: 0 (OpenMP's default, which must itself be within the bound: OMP_NUM_THREADS) or
// 1..max_thread_count(). Throws SettingError naming `setting` (the command line writes "threads" as --threads).
void require_thread_count(int threads, const std::string& setting = "threads");

}  // namespace orthoconv
