// orthoconv/error.hpp: the one exception type the library throws.
//
// The library is linked into other people's programs, so it never calls exit() or abort(): every failure
// (bad settings, wrong shapes, a failed oneDNN/cuDNN call, unreadable files) becomes an orthoconv::Error
// whose message is one line naming the setting and the value. Only main() catches, prints and exits.
#pragma once

#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

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

// A ConfigError about named settings of a configuration struct (TrainConfig, ...). The message names each setting
// by its own name (its config.json key: "epochs", "weight_decay"); a program that exposes the settings under other
// names (the command line's --epochs, --weight-decay) writes the message with its names: message(name).
// The pattern holds {0}, {1}, ... where settings[0], settings[1], ... are named.
class SettingError : public ConfigError {
 public:
  SettingError(std::vector<std::string> settings, const std::string& pattern)
      : ConfigError(fill(settings, pattern, [](const std::string& key) { return key; })),
        settings_(std::move(settings)),
        pattern_(pattern) {}
  const std::vector<std::string>& settings() const { return settings_; }
  const std::string& pattern() const { return pattern_; }
  // The message with each setting written as name(setting).
  std::string message(const std::function<std::string(const std::string&)>& name) const {
    return fill(settings_, pattern_, name);
  }

 private:
  static std::string fill(const std::vector<std::string>& settings, std::string text,
                          const std::function<std::string(const std::string&)>& name) {
    for (size_t i = 0; i < settings.size(); ++i) {
      std::string marker = "{";  // appended, not "{" + ... + "}": GCC 12 warns falsely (-Wrestrict) on that
      marker += std::to_string(i);
      marker += '}';
      for (size_t at = text.find(marker); at != std::string::npos; at = text.find(marker, at)) {
        const std::string replacement = name(settings[i]);
        text.replace(at, marker.size(), replacement);
        at += replacement.size();
      }
    }
    return text;
  }
  std::vector<std::string> settings_;
  std::string pattern_;
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

// require_setting(condition, {"gamma", "head"}, "{0} (certificate regularization) needs {1} soc") throws
// SettingError.
template <typename... Parts>
inline void require_setting(bool condition, std::vector<std::string> settings, Parts&&... parts) {
  if (!condition) throw SettingError(std::move(settings), detail::concat(std::forward<Parts>(parts)...));
}

// require(condition, "groups (", g, ") must divide channels (", c, ")") throws ConfigError.
template <typename E = ConfigError, typename... Parts>
inline void require(bool condition, Parts&&... parts) {
  if (!condition) throw E(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace orthoconv
