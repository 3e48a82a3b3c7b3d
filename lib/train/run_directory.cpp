// The output directory of a training run. See run_directory.hpp.
#include "train/run_directory.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv {

namespace fs = std::filesystem;

namespace {

// The files a trainer writes in its output directory (atomically, through "<name>.tmp-<pid>").
const std::vector<std::string> kRunFiles = {"last.safetensors", "best.safetensors", "metrics.jsonl", "metrics.csv",
                                            "config.json"};
constexpr const char* kLockFile = "train.lock";

// An exclusive flock on <out_dir>/train.lock, which then holds this process's id (named to a second trainer).
int lock_run_directory(const std::string& out_dir) {
  const std::string lock_path = (fs::path(out_dir) / kLockFile).string();
  const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw IoError("cannot open the run lock " + lock_path + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    char holder[32] = {};
    const ssize_t got = ::pread(fd, holder, sizeof holder - 1, 0);
    ::close(fd);
    std::string pid(holder, got > 0 ? static_cast<size_t>(got) : 0);
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    if (error == EWOULDBLOCK)
      throw NamingSettings<IoError>({"out"}, "the output directory " + out_dir + " is in use by another training run" +
                                                 (pid.empty() ? std::string() : " (pid " + pid + ")") +
                                                 ": wait for it to finish, or choose another {0}");
    throw IoError("cannot lock " + lock_path + ": " + std::strerror(error));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int error = errno;
    ::close(fd);
    throw IoError("cannot write the run lock " + lock_path + ": " + std::strerror(error));
  }
  return fd;
}

}  // namespace

int open_run_directory(const std::string& out_dir, const std::string& resume_from, std::FILE* log) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec || !fs::is_directory(out_dir))
    throw IoError("cannot create the output directory " + out_dir + ": " +
                  (ec ? ec.message() : std::string("not a directory")));
  if (::access(out_dir.c_str(), W_OK) != 0) throw IoError("the output directory " + out_dir + " is not writable");
  const int lock_fd = lock_run_directory(out_dir);
  try {  // the lock is released when the directory is refused
    for (const std::string& stale : remove_stale_temporaries(out_dir, kRunFiles))
      if (log) std::fprintf(log, "removed %s (left by an interrupted save)\n", stale.c_str());

    const std::string last = (fs::path(out_dir) / "last.safetensors").string();
    if (fs::exists(last, ec) && (resume_from.empty() || !fs::equivalent(resume_from, last, ec))) {
      if (resume_from.empty())
        throw NamingSettings<IoError>({"resume", "out"}, "the output directory " + out_dir +
                                                             " already holds a run (last.safetensors); pass {0} " +
                                                             out_dir + " to continue it, or choose another {1}");
      throw NamingSettings<IoError>(
          {"resume", "out"},
          "the output directory " + out_dir + " already holds another run (last.safetensors); resuming " + resume_from +
              " there would replace it: choose an empty {1}, or pass {0} " + out_dir + " to continue that run");
    }
  } catch (...) {
    ::close(lock_fd);
    throw;
  }
  return lock_fd;
}

}  // namespace orthoconv
