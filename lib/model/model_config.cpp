// ModelConfig: the LipConvnet settings, their parse / name pairs (conv kind, activation, head, keep), the default
// groups of each conv kind, validation, the sizes computed from the settings alone, and the texts that name a model
// (groups, conv label, architecture line). See include/orthoconv/model.hpp.
#include <algorithm>
#include <sstream>

#include "orthoconv/limits.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

namespace {

// A setting with two values and their texts: the one parse / name pair behind each of the four below. The parse
// error names the setting (main() turns it into the flag) and quotes both texts.
template <class Kind>
struct TwoValues {
  const char* setting;
  Kind first;
  const char* first_text;
  Kind second;
  const char* second_text;

  Kind parse(const std::string& text) const {
    if (text == first_text) return first;
    if (text == second_text) return second;
    throw SettingError({setting},
                       std::string("{0} must be '") + first_text + "' or '" + second_text + "', got '" + text + "'");
  }
  std::string name(Kind kind) const { return kind == first ? first_text : second_text; }
};

constexpr TwoValues<ConvKind> kConvKinds{"conv", ConvKind::soc, "soc", ConvKind::gs_soc, "gs-soc"};
constexpr TwoValues<ActivationKind> kActivations{"activation", ActivationKind::maxmin, "maxmin",
                                                 ActivationKind::maxmin_paired, "maxmin-paired"};
constexpr TwoValues<HeadKind> kHeads{"head", HeadKind::soc, "soc", HeadKind::lln, "lln"};
constexpr TwoValues<KeepChannels> kKeeps{"downsample_keep", KeepChannels::first, "first", KeepChannels::per_group,
                                         "per-group"};

}  // namespace

ConvKind parse_conv_kind(const std::string& text) { return kConvKinds.parse(text); }
std::string conv_kind_name(ConvKind kind) { return kConvKinds.name(kind); }
ActivationKind parse_activation(const std::string& text) { return kActivations.parse(text); }
std::string activation_name(ActivationKind activation) { return kActivations.name(activation); }
HeadKind parse_head(const std::string& text) { return kHeads.parse(text); }
std::string head_name(HeadKind head) { return kHeads.name(head); }
KeepChannels parse_keep(const std::string& text) { return kKeeps.parse(text); }
std::string keep_name(KeepChannels keep) { return kKeeps.name(keep); }

GroupCounts default_groups(ConvKind conv) {
  return conv == ConvKind::soc ? GroupCounts{1, std::nullopt} : GroupCounts{4, 1};
}

std::string ModelConfig::groups_text() const {
  const GroupCounts g = group_counts();
  return conv == ConvKind::soc ? std::to_string(g.first) : g.text();
}

ModelConfig::Sizes ModelConfig::sizes() const {
  // The builder's walk (LipConvnet::LipConvnet), stage by stage in closed form: block 0 maps the stage's input to
  // `planes`, blocks 1..n-2 keep `planes`, the last block doubles them with stride 2. A SocConv on c_in -> c_out
  // with stride s runs its series on C = max(c_out, c_in s^2) channels in g groups: g (C/g)^2 k^2 weights.
  auto soc = [](double c_in, double c_out, double stride, double kernel, double group_count) {
    const double channels = std::max(c_out, c_in * stride * stride);
    return channels * channels * kernel * kernel / group_count;
  };
  const GroupCounts g = group_counts();
  auto block = [&](double c_in, double c_out, double stride, double kernel) {
    if (conv == ConvKind::soc) return soc(c_in, c_out, stride, kernel, static_cast<double>(g.first));
    const double second = g.second ? soc(c_out, c_out, 1, 1, static_cast<double>(*g.second)) : 0.0;
    return soc(c_in, c_out, stride, kernel, static_cast<double>(g.first)) + second;
  };
  const double blocks = static_cast<double>(block_size());
  double in_planes = 3, side = static_cast<double>(input_side);
  Sizes out;
  for (int stage = 0; stage < 5; ++stage) {
    const double planes = stage == 0 ? static_cast<double>(init_channels) : in_planes;
    const double kernel = stage == 4 ? 1 : 3;  // the last block of stage 5 is 1x1
    if (blocks > 1) out.weights += block(in_planes, planes, 1, 3) + (blocks - 2) * block(planes, planes, 1, 3);
    out.weights += block(blocks > 1 ? planes : in_planes, 2 * planes, 2, kernel);
    // Two tensors per block: (blocks - 1) of planes x side^2, then 2 planes x (side / 2)^2.
    out.activations += 2 * ((blocks - 1) * planes * side * side + 2 * planes * (side / 2) * (side / 2));
    in_planes = 2 * planes;
    side /= 2;
  }
  const double features = in_planes * side * side, outputs = static_cast<double>(classes);
  out.weights += head == HeadKind::soc ? soc(features, outputs, 1, 1, 1) : features * outputs;
  return out;
}

void ModelConfig::validate() const {
  const GroupCounts g = group_counts();
  require(g.first > 0, "groups must be positive, got ", g.first);
  require(!g.second || *g.second > 0, "second groups must be positive, got ", g.second.value_or(0));
  require_setting(conv == ConvKind::gs_soc || !g.second, {"conv"},
                  "conv 'soc' takes one group count (grouped SOC), not a pair; use {0} gs-soc for (a,b)");
  require(depth >= 5 && depth % 5 == 0, "depth must be a positive multiple of 5 (5, 10, 15, ...), got ", depth);
  require(depth <= kMaxDepth, "depth must be at most ", kMaxDepth, ", got ", depth);
  require(init_channels > 0, "init channels (width) must be positive, got ", init_channels);
  require(classes > 1, "classes must be at least 2, got ", classes);
  require(train_terms > 0 && eval_terms > 0 && train_terms <= kMaxSeriesTerms && eval_terms <= kMaxSeriesTerms,
          "series terms must be in 1..", kMaxSeriesTerms, ", got ", train_terms, " (train) and ", eval_terms,
          " (eval)");
  require(init_iterations >= 0, "initial power iterations must be >= 0, got ", init_iterations);
  power_schedule.validate();
  require(input_side >= 32 && input_side % 32 == 0,
          "input side must be a positive multiple of 32 (five stride-2 "
          "stages), got ",
          input_side);
  // Every size is positive and the depth bounded: the weight count (in double) says whether the model can exist.
  std::ostringstream what;
  const double weights = sizes().weights;
  what << "LipConvnet-" << depth << " " << conv_label() << " with width " << init_channels << ", " << classes
       << " classes and input side " << input_side << " (" << weights << " weights)";
  require_memory(4.0 * weights, what.str());
}

std::string ModelConfig::conv_label() const {
  const GroupCounts g = group_counts();
  if (conv == ConvKind::gs_soc) return "gs-soc(" + g.text() + ")";
  return g.first == 1 ? std::string("soc") : "soc(g" + std::to_string(g.first) + ")";
}

std::string ModelConfig::architecture() const {
  std::ostringstream out;
  out << "lipconvnet-" << depth << " conv=" << conv_label() << " width=" << init_channels << " classes=" << classes
      << " activation=" << activation_name(activation) << " head=" << head_name(head) << " keep=" << keep_name(keep)
      << " side=" << input_side;
  return out.str();
}

}  // namespace orthoconv
