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

// What an error whose message names settings keeps besides the message: the settings, each by its own name (its
// config.json key: "epochs", "weight_decay", "out"), and the pattern the message was written from, with {0}, {1},
// ... where settings[0], settings[1], ... are named. A program that exposes the settings under other names (the
// command line's --epochs, --weight-decay, --out) catches NamesSettings and writes the message with its names:
// message(name). what() (of the Error it is mixed into) names each setting by its own name.
class NamesSettings {
 public:
  NamesSettings(std::vector<std::string> settings, std::string pattern)
      : settings_(std::move(settings)), pattern_(std::move(pattern)) {}
  NamesSettings(const NamesSettings&) = default;
  NamesSettings& operator=(const NamesSettings&) = default;
  virtual ~NamesSettings() = default;
  const std::vector<std::string>& settings() const { return settings_; }
  const std::string& pattern() const { return pattern_; }
  // The message with each setting written as name(setting).
  std::string message(const std::function<std::string(const std::string&)>& name) const {
    return fill(settings_, pattern_, name);
  }
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

 private:
  std::vector<std::string> settings_;
  std::string pattern_;
};

// An Error of kind `Base` (IoError, BackendError, ...) whose message names settings (NamesSettings): "the output
// directory runs/a is in use ...; choose another {0}" with {"out"}.
template <typename Base>
class NamingSettings : public Base, public NamesSettings {
 public:
  NamingSettings(std::vector<std::string> settings, const std::string& pattern)
      : Base(fill(settings, pattern, [](const std::string& key) { return key; })),
        NamesSettings(std::move(settings), pattern) {}
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

// A ConfigError about named settings of a configuration struct (TrainConfig, ModelConfig, ...): a setting that can
// never work, named by its own name (NamesSettings).
class SettingError : public NamingSettings<ConfigError> {
 public:
  using NamingSettings::NamingSettings;
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
