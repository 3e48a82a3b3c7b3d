// orthoconv/model_state.hpp: a LipConvnet's state in a Checkpoint (see docs/checkpoint.md).
//
// Tensors: every parameter under its model name ("stage1.block0.conv.first.weight" [g, C, C, k, k], ...),
// every power-iteration vector ("stage1.block0.conv.first.u1" [g, n], ...). Metadata: the format name and
// version, the architecture (ModelConfig fields one by one plus the canonical architecture() line), the series
// terms, the input normalization, and each SocConv's step counter ("step.<soc name>").
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

constexpr const char* kCheckpointFormat = "orthoconv.lipconvnet";
// Version 2: u4 is the (out, h, w) vector and v4 the in-channel vector of the fourth reshape, as in the reference
// code (version 1 had them under each other's names; read_model_state reads both).
constexpr int kCheckpointVersion = 2;

// Adds the model's tensors and metadata to `out` (values copied to the host).
void write_model_state(LipConvnet& model, const Normalization& norm, Checkpoint& out);

// Checks the format name and version (1 to kCheckpointVersion) and returns the version; throws IoError naming
// `file` otherwise.
int check_checkpoint_format(const Checkpoint& checkpoint, const std::string& file);
// The architecture and normalization a checkpoint was written with (throws IoError naming `file`).
ModelConfig model_config_from_checkpoint(const Checkpoint& checkpoint, const std::string& file);
Normalization normalization_from_checkpoint(const Checkpoint& checkpoint, const std::string& file);

// Loads every parameter, buffer and step counter into `model`. The checkpoint's architecture must equal the
// model's (IoError "checkpoint F: architecture ... does not match ..."); a missing tensor, a wrong shape or values
// check_tensor_values refuses are an IoError naming the tensor (by its name in the file). Nothing in the model
// changes unless everything is present and valid. Older format versions are converted on the way in (version 1:
// u4 and v4 are renamed).
void read_model_state(const Checkpoint& checkpoint, const std::string& file, LipConvnet& model);

// A trained LipConvnet read from a checkpoint, ready to evaluate.
struct LoadedModel {
  std::unique_ptr<LipConvnet> model;  // in evaluation mode, on the requested device
  Normalization normalization;        // the input normalization it was trained with (L_in = lipschitz())
};

// From a checkpoint file to an evaluation-ready model in one call: reads `path` (load_checkpoint), rebuilds the
// architecture from its metadata with no power iterations at construction (the checkpoint's u, v are loaded),
// loads every parameter, power-iteration vector and step counter (read_model_state: older format versions are
// converted) and sets evaluation mode. The evaluation's series terms are `eval_terms` when given (ConfigError
// unless in 1..kMaxSeriesTerms, as LipConvnet::set_terms), else the checkpoint's; the training terms stay the
// checkpoint's. The model can also be trained further (set_training(true)): it keeps the default PowerSchedule.
// Every evaluating command (certify, attack, verify --checkpoint) opens its model with this one call.
// Throws IoError naming the file for a bad checkpoint, Error when `device` is not available in this build.
LoadedModel load_model(const std::string& path, Device device = Device::cpu,
                       std::optional<int> eval_terms = std::nullopt);

// Refuses (IoError naming the file, the tensor and the index) a NaN or an infinity, and values whose squared norm
// exceeds float32's range (3.4e38): the power iteration, the scale sigma and the bounds square them, so such a
// tensor cannot be a trained model's and would turn certificates into NaN or null.
void check_tensor_values(const CheckpointTensor& tensor, const std::string& name, const std::string& file);

// Metadata `key` as a decimal integer in [min, max] (digits only, no spaces, sign only where min < 0), or an
// unsigned 64-bit one; IoError naming the file, the key and the text otherwise (or when missing).
int64_t metadata_int(const Checkpoint& checkpoint, const std::string& key, const std::string& file, int64_t min,
                     int64_t max);
uint64_t metadata_uint64(const Checkpoint& checkpoint, const std::string& key, const std::string& file);

// "0.4914,0.4822,0.4465" with enough digits to round-trip float32; and back (throws ConfigError).
std::string format_floats(const float* values, size_t count);
std::vector<float> parse_floats(const std::string& text, const std::string& what);

}  // namespace orthoconv
