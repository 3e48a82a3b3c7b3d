// A LipConvnet's parameters, power-iteration vectors, step counters and architecture, to and from a
// Checkpoint. Loading validates everything before touching the model, so a bad file changes nothing.
#include "orthoconv/model_state.hpp"

#include <cmath>
#include <cstdio>
#include <sstream>

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

int64_t meta_int(const Checkpoint& c, const std::string& key, const std::string& file) {
  const std::string& text = meta_of(c, key, file);
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty())
    throw IoError("checkpoint " + file + ": metadata '" + key + "' is not an integer: '" + text + "'");
  return value;
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

std::string groups_text(const ModelConfig& m) {
  std::string out = std::to_string(m.groups_first);
  if (m.conv == "gs-soc") out += "," + (m.groups_second ? std::to_string(*m.groups_second) : std::string("-"));
  return out;
}

}  // namespace

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
  out.metadata["model.conv"] = m.conv;
  out.metadata["model.groups"] = groups_text(m);
  out.metadata["model.depth"] = std::to_string(m.depth);
  out.metadata["model.width"] = std::to_string(m.init_channels);
  out.metadata["model.classes"] = std::to_string(m.classes);
  out.metadata["model.activation"] = m.activation;
  out.metadata["model.head"] = m.head;
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
  const int64_t version = meta_int(checkpoint, "format_version", file);
  if (version < 1 || version > kCheckpointVersion)
    throw IoError("checkpoint " + file + ": format version " + std::to_string(version) +
                  " is not supported (this build reads versions 1 to " + std::to_string(kCheckpointVersion) + ")");
  return static_cast<int>(version);
}

ModelConfig model_config_from_checkpoint(const Checkpoint& checkpoint, const std::string& file) {
  check_checkpoint_format(checkpoint, file);
  ModelConfig m;
  try {
    m.conv = meta_of(checkpoint, "model.conv", file);
    const std::string groups = meta_of(checkpoint, "model.groups", file);
    const auto comma = groups.find(',');
    m.groups_first = std::stoll(groups.substr(0, comma));
    m.groups_second.reset();
    if (comma != std::string::npos && groups.substr(comma + 1) != "-") m.groups_second = std::stoll(groups.substr(comma + 1));
    m.depth = meta_int(checkpoint, "model.depth", file);
    m.init_channels = meta_int(checkpoint, "model.width", file);
    m.classes = meta_int(checkpoint, "model.classes", file);
    m.activation = meta_of(checkpoint, "model.activation", file);
    m.head = meta_of(checkpoint, "model.head", file);
    m.keep = parse_keep(meta_of(checkpoint, "model.downsample_keep", file));
    m.input_side = meta_int(checkpoint, "model.input_side", file);
    m.seed = static_cast<uint64_t>(std::stoull(meta_of(checkpoint, "model.seed", file)));
    m.train_terms = static_cast<int>(meta_int(checkpoint, "series.train_terms", file));
    m.eval_terms = static_cast<int>(meta_int(checkpoint, "series.eval_terms", file));
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
    return &it->second;
  };
  for (NamedParameter& p : model.parameters()) targets.push_back({&p.parameter->value, find(p.name, p.parameter->value)});
  for (NamedBuffer& b : model.buffers()) targets.push_back({b.tensor, find(b.name, *b.tensor)});
  std::vector<std::pair<SocConv*, int64_t>> steps;
  for (NamedSoc& s : model.soc_layers()) {
    const int64_t step = meta_int(checkpoint, "step." + s.name, file);
    if (step < 0) throw IoError("checkpoint " + file + ": negative step counter for '" + s.name + "'");
    steps.push_back({s.soc, step});
  }
  Backend& be = model.backend();
  for (Target& t : targets) be.from_host(t.source->values.data(), t.tensor->data(), t.tensor->numel());
  for (auto& [soc, step] : steps) soc->set_step(step);
}

LoadedModel load_model(const std::string& path, Device device) {
  const Checkpoint checkpoint = load_checkpoint(path);
  ModelConfig config = model_config_from_checkpoint(checkpoint, path);
  LoadedModel out;
  out.normalization = normalization_from_checkpoint(checkpoint, path);
  config.init_iterations = 0;  // u, v come from the checkpoint
  out.model = std::make_unique<LipConvnet>(config, backend_for(device));
  read_model_state(checkpoint, path, *out.model);
  out.model->set_training(false);
  return out;
}

}  // namespace orthoconv
