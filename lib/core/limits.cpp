// The bounds of include/orthoconv/limits.hpp.
#include "orthoconv/limits.hpp"

#include <omp.h>
#include <unistd.h>

#include <cstdio>

#include "orthoconv/error.hpp"

namespace orthoconv {

int64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<int64_t>(pages) * static_cast<int64_t>(page_size);
}

std::string format_bytes(double bytes) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int unit = 0;
  while (bytes >= 1024.0 && unit < 6) {
    bytes /= 1024.0;
    ++unit;
  }
  char text[64];
  if (unit == 0)
    std::snprintf(text, sizeof text, "%.0f bytes", bytes);
  else
    std::snprintf(text, sizeof text, bytes < 1e6 ? "%.1f %s" : "%.3g %s", bytes, units[unit]);
  return text;
}

void require_memory(double bytes, const std::string& what) {
  const int64_t memory = physical_memory_bytes();
  if (memory > 0 && !(bytes <= static_cast<double>(memory)))
    throw ConfigError(what + " needs at least " + format_bytes(bytes) + " of memory, more than this machine's " +
                      format_bytes(static_cast<double>(memory)));
}

int max_thread_count() { return omp_get_num_procs(); }

void require_thread_count(int threads, const std::string& setting) {
  const int limit = max_thread_count();
  require_setting(threads >= 0, {setting}, "{0} must be >= 0 (0: OpenMP's default), got ", threads);
  require_setting(threads <= limit, {setting}, "{0} ", threads, " is more than the ", limit,
                  " processors this process may use; more threads than processors only slow the run down");
  if (threads == 0)
    require_setting(omp_get_max_threads() <= limit, {setting}, "OpenMP's default thread count (OMP_NUM_THREADS) is ",
                    omp_get_max_threads(), ", more than the ", limit, " processors this process may use; set {0}",
                    " or OMP_NUM_THREADS to at most ", limit);
}

}  // namespace orthoconv
