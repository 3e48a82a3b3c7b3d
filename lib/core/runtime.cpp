// Process-wide run-time controls and statistics: OpenMP threads, peak resident memory, CPU time. See
// include/orthoconv/runtime.hpp.
#include "orthoconv/runtime.hpp"

#include <omp.h>
#include <sys/resource.h>

#include "orthoconv/limits.hpp"

namespace orthoconv {

void set_thread_count(int n) {
  require_thread_count(n);
  if (n > 0) omp_set_num_threads(n);
}

int thread_count() { return omp_get_max_threads(); }

double process_cpu_seconds() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

int64_t peak_rss_bytes() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;
}

}  // namespace orthoconv
