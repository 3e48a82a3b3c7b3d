// orthoconv/runtime.hpp: process-wide run-time controls and statistics.
//
// Threads: every CPU loop of the library and every oneDNN primitive runs on OpenMP's thread team, so one setting
// controls them all. The CUDA backend's settings are in cuda_options.hpp.
#pragma once

#include <cstdint>

namespace orthoconv {

// Sets OpenMP's thread count for this process (oneDNN and every loop); n == 0 leaves the current setting. Throws
// ConfigError unless require_thread_count (limits.hpp) accepts n (0 to the processors this process may use).
void set_thread_count(int n);
// The threads a parallel region started now would use.
int thread_count();

// Peak resident set size of this process so far, bytes (getrusage; never decreases).
int64_t peak_rss_bytes();
// CPU time of this process so far (user + system, every thread), seconds (getrusage): on a machine shared with
// other jobs a run's wall time includes the neighbours' time slices, its CPU time mostly does not.
double process_cpu_seconds();

}  // namespace orthoconv
