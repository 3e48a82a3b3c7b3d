// orthoconv/model_state.hpp: a LipConvnet's state in a Checkpoint (see docs/checkpoint.md).
//
// Tensors: every parameter under its model name ("stage1.block0.conv.first.weight" [g, C, C, k, k], ...),
// every power-iteration vector ("stage1.block0.conv.first.u1" [g, n], ...). Metadata: the format name and
// version, the architecture (ModelConfig fields one by one plus the canonical architecture() line), the series
// terms, the input normalization, and each SocConv's step counter ("step.<soc name>").
#pragma once

#include <string>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

constexpr const char* kCheckpointFormat = "orthoconv.lipconvnet";
constexpr int kCheckpointVersion = 1;

// Adds the model's tensors and metadata to `out` (values copied to the host).
void write_model_state(LipConvnet& model, const Normalization& norm, Checkpoint& out);

// Checks the format name and version; throws IoError naming `file` otherwise.
void check_checkpoint_format(const Checkpoint& checkpoint, const std::string& file);
// The architecture and normalization a checkpoint was written with (throws IoError naming `file`).
ModelConfig model_config_from_checkpoint(const Checkpoint& checkpoint, const std::string& file);
Normalization normalization_from_checkpoint(const Checkpoint& checkpoint, const std::string& file);

// Loads every parameter, buffer and step counter into `model`. The checkpoint's architecture must equal the
// model's (IoError "checkpoint F: architecture ... does not match ..."); a missing tensor or a wrong shape is an
// IoError naming the tensor. Nothing in the model changes unless everything is present and valid.
void read_model_state(const Checkpoint& checkpoint, const std::string& file, LipConvnet& model);

// "0.4914,0.4822,0.4465" with enough digits to round-trip float32; and back (throws ConfigError).
std::string format_floats(const float* values, size_t count);
std::vector<float> parse_floats(const std::string& text, const std::string& what);

}  // namespace orthoconv
