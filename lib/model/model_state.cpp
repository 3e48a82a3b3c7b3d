// A LipConvnet's parameters, power-iteration vectors, step counters and architecture, to and from a
// Checkpoint. Loading validates everything before touching the model, so a bad file changes nothing.
#include "orthoconv/model_state.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

#include "orthoconv/limits.hpp"

namespace orthoconv {

namespace {

std::vector<float> to_host_vector(Backend& be, const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  be.to_host(t.data(), out.data(), t.numel());
  return out;
}

const std::string& meta_of(const Checkpoint& c, const std::string& key, const std::string& file) {
  auto it = c.metadata.find(key);
  if (it == c.metadata.end()) throw IoError("checkpoint " + file + ": missing metadata '" + key + "'");
  return it->second;
}

// Where format version `version` stored the tensor the current version calls `name`. Version 1 had the fourth
// reshape's vectors under each other's names (its u4 was the in-channel vector, its v4 the (out, h, w) vector:
// the reference's v4 and u4); the values are the same, so converting is renaming.
std::string stored_name(const std::string& name, int64_t version) {
  if (version >= 2 || name.size() < 3) return name;
  const std::string tail = name.substr(name.size() - 3);
  if (tail == ".u4") return name.substr(0, name.size() - 3) + ".v4";
  if (tail == ".v4") return name.substr(0, name.size() - 3) + ".u4";
  return name;
}

}  // namespace

int64_t metadata_int(const Checkpoint& checkpoint, const std::string& key, const std::string& file, int64_t min,
                     int64_t max) {
  const std::string& text = meta_of(checkpoint, key, file);
  int64_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || error != std::errc() || end != text.data() + text.size() || value < min || value > max)
    throw IoError("checkpoint " + file + ": metadata '" + key + "' = '" + text.substr(0, 40) +
                  (text.size() > 40 ? "..." : "") + "' is not an integer in " + std::to_string(min) + ".." +
                  std::to_string(max));
  return value;
}

uint64_t metadata_uint64(const Checkpoint& checkpoint, const std::string& key, const std::string& file) {
  const std::string& text = meta_of(checkpoint, key, file);
  uint64_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || error != std::errc() || end != text.data() + text.size())
    throw IoError("checkpoint " + file + ": metadata '" + key + "' = '" + text.substr(0, 40) +
                  (text.size() > 40 ? "..." : "") + "' is not an unsigned 64-bit integer");
  return value;
}

void check_tensor_values(const CheckpointTensor& tensor, const std::string& name, const std::string& file) {
  // Checked in double: the squared norm of any float32 tensor is finite there.
  double squares = 0.0, largest = 0.0;
  size_t largest_at = 0;
  for (size_t i = 0; i < tensor.values.size(); ++i) {
    const float x = tensor.values[i];
    if (!std::isfinite(x))
      throw IoError("checkpoint " + file + ": tensor '" + name + "' holds " + (std::isnan(x) ? "NaN" : "an infinity") +
                    " at index " + std::to_string(i) + " of " + std::to_string(tensor.values.size()) +
                    " (a corrupt file or a diverged run)");
    const double magnitude = std::fabs(static_cast<double>(x));
    squares += magnitude * magnitude;
    if (magnitude > largest) {
      largest = magnitude;
      largest_at = i;
    }
  }
  if (squares > static_cast<double>(std::numeric_limits<float>::max())) {
    char detail[160];
    std::snprintf(detail, sizeof detail,
                  "squared norm %.3g exceeds float32's range (largest |value| %.3g at index %zu)", squares, largest,
                  largest_at);
    throw IoError("checkpoint " + file + ": tensor '" + name +
                  "' holds values too large for float32 arithmetic: " + detail + "; not a trained model");
  }
}

std::string format_floats(const float* values, size_t count) {
  std::string out;
  char buf[64];
  for (size_t i = 0; i < count; ++i) {
    std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(values[i]));
    if (i) out += ",";
    out += buf;
  }
  return out;
}

std::vector<float> parse_floats(const std::string& text, const std::string& what) {
  std::vector<float> out;
  std::stringstream in(text);
  std::string part;
  while (std::getline(in, part, ',')) {
    size_t used = 0;
    float value = 0.0f;
    try {
      value = std::stof(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    require(used == part.size() && !part.empty() && std::isfinite(value), what,
            ": expected comma-separated numbers, got '", text, "'");
    out.push_back(value);
  }
  require(!out.empty(), what, ": expected comma-separated numbers, got '", text, "'");
  return out;
}

void write_model_state(LipConvnet& model, const Normalization& norm, Checkpoint& out) {
  Backend& be = model.backend();
  const ModelConfig& m = model.config();
  out.metadata["format"] = kCheckpointFormat;
  out.metadata["format_version"] = std::to_string(kCheckpointVersion);
  out.metadata["architecture"] = m.architecture();
  out.metadata["model.conv"] = conv_kind_name(m.conv);
  out.metadata["model.groups"] = m.groups_text();
  out.metadata["model.depth"] = std::to_string(m.depth);
  out.metadata["model.width"] = std::to_string(m.init_channels);
  out.metadata["model.classes"] = std::to_string(m.classes);
  out.metadata["model.activation"] = activation_name(m.activation);
  out.metadata["model.head"] = head_name(m.head);
  out.metadata["model.downsample_keep"] = keep_name(m.keep);
  out.metadata["model.input_side"] = std::to_string(m.input_side);
  out.metadata["model.seed"] = std::to_string(m.seed);
  out.metadata["series.train_terms"] = std::to_string(m.train_terms);
  out.metadata["series.eval_terms"] = std::to_string(m.eval_terms);
  out.metadata["normalization.mean"] = format_floats(norm.mean.data(), 3);
  out.metadata["normalization.std"] = format_floats(norm.std.data(), 3);
  char lip[64];
  std::snprintf(lip, sizeof(lip), "%.9g", static_cast<double>(norm.lipschitz()));
  out.metadata["normalization.lipschitz"] = lip;
  for (NamedParameter& p : model.parameters())
    out.tensors[p.name] = CheckpointTensor{p.parameter->value.shape().dims(), to_host_vector(be, p.parameter->value)};
  for (NamedBuffer& b : model.buffers())
    out.tensors[b.name] = CheckpointTensor{b.tensor->shape().dims(), to_host_vector(be, *b.tensor)};
  for (NamedSoc& s : model.soc_layers()) out.metadata["step." + s.name] = std::to_string(s.soc->step());
}

int check_checkpoint_format(const Checkpoint& checkpoint, const std::string& file) {
  const std::string& format = meta_of(checkpoint, "format", file);
  if (format != kCheckpointFormat)
    throw IoError("checkpoint " + file + ": format '" + format + "' is not '" + kCheckpointFormat + "'");
  const int64_t version = metadata_int(checkpoint, "format_version", file, 0, std::numeric_limits<int64_t>::max());
  if (version < 1 || version > kCheckpointVersion)
    throw IoError("checkpoint " + file + ": format version " + std::to_string(version) +
                  " is not supported (this build reads versions 1 to " + std::to_string(kCheckpointVersion) + ")");
  return static_cast<int>(version);
}

ModelConfig model_config_from_checkpoint(const Checkpoint& checkpoint, const std::string& file) {
  check_checkpoint_format(checkpoint, file);
  ModelConfig m;
  try {
    m.conv = parse_conv_kind(meta_of(checkpoint, "model.conv", file));
    m.groups = GroupCounts::parse(meta_of(checkpoint, "model.groups", file), "metadata 'model.groups'");
    constexpr int64_t kLargest = std::numeric_limits<int64_t>::max();
    m.depth = metadata_int(checkpoint, "model.depth", file, 5, kMaxDepth);
    m.init_channels = metadata_int(checkpoint, "model.width", file, 1, kLargest);
    m.classes = metadata_int(checkpoint, "model.classes", file, 2, kLargest);
    m.activation = parse_activation(meta_of(checkpoint, "model.activation", file));
    m.head = parse_head(meta_of(checkpoint, "model.head", file));
    m.keep = parse_keep(meta_of(checkpoint, "model.downsample_keep", file));
    m.input_side = metadata_int(checkpoint, "model.input_side", file, 32, kLargest);
    m.seed = metadata_uint64(checkpoint, "model.seed", file);
    m.train_terms = static_cast<int>(metadata_int(checkpoint, "series.train_terms", file, 1, kMaxSeriesTerms));
    m.eval_terms = static_cast<int>(metadata_int(checkpoint, "series.eval_terms", file, 1, kMaxSeriesTerms));
    m.validate();
  } catch (const IoError&) {
    throw;
  } catch (const std::exception& e) {
    throw IoError("checkpoint " + file + ": invalid architecture metadata: " + e.what());
  }
  const std::string& stored = meta_of(checkpoint, "architecture", file);
  if (stored != m.architecture())
    throw IoError("checkpoint " + file + ": architecture line '" + stored + "' disagrees with its fields ('" +
                  m.architecture() + "')");
  return m;
}

Normalization normalization_from_checkpoint(const Checkpoint& checkpoint, const std::string& file) {
  Normalization norm;
  try {
    auto mean = parse_floats(meta_of(checkpoint, "normalization.mean", file), "normalization.mean");
    auto std = parse_floats(meta_of(checkpoint, "normalization.std", file), "normalization.std");
    require(mean.size() == 3 && std.size() == 3, "normalization needs 3 means and 3 stds");
    for (int i = 0; i < 3; ++i) {
      require(std[i] > 0, "normalization std must be positive");
      norm.mean[i] = mean[i];
      norm.std[i] = std[i];
    }
  } catch (const IoError&) {
    throw;
  } catch (const std::exception& e) {
    throw IoError("checkpoint " + file + ": invalid normalization metadata: " + e.what());
  }
  return norm;
}

void read_model_state(const Checkpoint& checkpoint, const std::string& file, LipConvnet& model) {
  const int version = check_checkpoint_format(checkpoint, file);
  const std::string& stored = meta_of(checkpoint, "architecture", file);
  if (stored != model.config().architecture())
    throw IoError("checkpoint " + file + ": architecture '" + stored + "' does not match the requested '" +
                  model.config().architecture() + "'");
  // Validate everything first: names, shapes, sizes, step counters.
  struct Target {
    Tensor* tensor;
    const CheckpointTensor* source;
  };
  std::vector<Target> targets;
  auto find = [&](const std::string& current_name, const Tensor& t) -> const CheckpointTensor* {
    const std::string name = stored_name(current_name, version);
    auto it = checkpoint.tensors.find(name);
    if (it == checkpoint.tensors.end()) throw IoError("checkpoint " + file + ": missing tensor '" + name + "'");
    if (it->second.shape != t.shape().dims())
      throw IoError("checkpoint " + file + ": tensor '" + name + "' has shape " + Shape(it->second.shape).str() +
                    ", expected " + t.shape().str());
    if (static_cast<int64_t>(it->second.values.size()) != t.numel())
      throw IoError("checkpoint " + file + ": tensor '" + name + "' holds " + std::to_string(it->second.values.size()) +
                    " values, expected " + std::to_string(t.numel()));
    check_tensor_values(it->second, name, file);
    return &it->second;
  };
  for (NamedParameter& p : model.parameters())
    targets.push_back({&p.parameter->value, find(p.name, p.parameter->value)});
  for (NamedBuffer& b : model.buffers()) targets.push_back({b.tensor, find(b.name, *b.tensor)});
  std::vector<std::pair<SocConv*, int64_t>> steps;
  for (NamedSoc& s : model.soc_layers()) {
    steps.push_back({s.soc, metadata_int(checkpoint, "step." + s.name, file, 0, kMaxTrainingSteps)});
  }
  Backend& be = model.backend();
  for (Target& t : targets) be.from_host(t.source->values.data(), t.tensor->data(), t.tensor->numel());
  for (auto& [soc, step] : steps) soc->set_step(step);
}

LoadedModel load_model(const std::string& path, Device device, std::optional<int> eval_terms) {
  const Checkpoint checkpoint = load_checkpoint(path);
  ModelConfig config = model_config_from_checkpoint(checkpoint, path);
  LoadedModel out;
  out.normalization = normalization_from_checkpoint(checkpoint, path);
  config.init_iterations = 0;  // u, v come from the checkpoint
  out.model = std::make_unique<LipConvnet>(config, backend_for(device));
  read_model_state(checkpoint, path, *out.model);
  out.model->set_training(false);
  if (eval_terms) out.model->set_terms(out.model->config().train_terms, *eval_terms);
  return out;
}

}  // namespace orthoconv
