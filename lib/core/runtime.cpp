// Process-wide run-time controls: OpenMP threads, peak resident memory. See include/orthoconv/runtime.hpp.
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

int64_t peak_rss_bytes() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;
}

}  // namespace orthoconv
