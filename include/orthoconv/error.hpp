// orthoconv/error.hpp: the one exception type the library throws.
//
// The library is linked into other people's programs, so it never calls exit() or abort(): every failure
// (bad settings, wrong shapes, a failed oneDNN/cuDNN call, unreadable files) becomes an orthoconv::Error
// whose message is one line naming the setting and the value. Only main() catches, prints and exits.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace orthoconv {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// A setting that can never work (groups not dividing channels, even kernel, ...).
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A tensor whose shape does not match what the layer was built for.
class ShapeError : public Error {
 public:
  using Error::Error;
};

// A vendor library (oneDNN, cuDNN, CUDA) reported a failure.
class BackendError : public Error {
 public:
  using Error::Error;
};

// A file that is missing, truncated, corrupt or unwritable.
class IoError : public Error {
 public:
  using Error::Error;
};

// Work abandoned because a stop was requested (the trainer's stop request, polled between batches): nothing is
// wrong, and nothing half-done was kept.
class Interrupted : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

// require(condition, "groups (", g, ") must divide channels (", c, ")") throws ConfigError.
template <typename E = ConfigError, typename... Parts>
inline void require(bool condition, Parts&&... parts) {
  if (!condition) throw E(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace orthoconv
