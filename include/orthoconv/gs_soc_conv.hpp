// orthoconv/gs_soc_conv.hpp: Group-and-Shuffle SOC (Gorbunov et al., NeurIPS 2024).
//
// GsSocConv with groups (a, b):
//   ChannelShuffle(a) on the input (skipped when c_in is not divisible by a)
//   -> SocConv k x k, a groups, the stride, c_in -> c_out
//   -> ChannelShuffle(b) on c_out channels
//   -> SocConv 1 x 1, b groups, stride 1, c_out -> c_out.
// The single-stage variant (a, -) stops after the grouped k x k SocConv. `paired` selects the paired shuffles.
// Each stage is orthogonal (or a coordinate projection of one), so the layer is 1-Lipschitz.
// (The reference code has a variant that computes the middle shuffle and discards it; this one applies it.)
// With b = 1 the middle shuffle is the identity: the forward and backward skip it (no pass over the activation).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "orthoconv/channel_shuffle.hpp"
#include "orthoconv/soc_conv.hpp"

namespace orthoconv {

// The group counts of a GS-SOC layer, (a, b) or (a, -), and of a model's convolutions (ModelConfig::groups; for
// conv soc only `first`, the group count of every SocConv). "No second stage" has one form: `second` empty.
// The one text form, as --groups, config.json and checkpoints write it: "a,b" or "a,-"; a conv soc model writes
// its one count "a" (ModelConfig::groups_text), which parse() reads as (a, -).
struct GroupCounts {
  int64_t first = 4;              // a
  std::optional<int64_t> second;  // b, or none: no second stage (GS-SOC (a, -), or conv soc)
  // "a,b", "a,-" or "a" with positive integers. Throws SettingError naming `setting` ("groups", "metadata
  // 'model.groups'", ...) and the text.
  static GroupCounts parse(const std::string& text, const std::string& setting = "groups");
  std::string text() const;  // "a,b" or "a,-"
  bool operator==(const GroupCounts& other) const { return first == other.first && second == other.second; }
};

struct GsSocConfig {
  SocConfig base;                       // in/out channels, kernel, stride, terms, ...; base.groups ignored;
                                        // base.path applies to the 1x1 stages (the k x k one takes the series)
  GroupCounts groups{4, std::nullopt};  // (a, b), or (a, -) for the single-stage variant
  bool paired = false;
  void validate() const;
};

class GsSocConv : public Layer {
 public:
  explicit GsSocConv(const GsSocConfig& config, const std::shared_ptr<Backend>& backend = cpu_backend());
  std::string kind() const override { return "gs-soc"; }
  std::string describe() const override;
  Shape output_shape(const Shape& input) const override;
  void forward(const Tensor& input, Tensor& output) override;
  void backward(const Tensor& diff_output, Tensor& diff_input) override;
  std::vector<Parameter*> parameters() override;
  std::vector<Buffer> buffers() override;
  void set_training(bool training) override;
  void set_parameter_gradients(bool enabled) override;

  SocConv& first() { return *first_; }
  SocConv* second() { return second_.get(); }
  const GsSocConfig& config() const { return config_; }
  bool shuffles_input() const { return static_cast<bool>(input_shuffle_); }
  // The shuffles applied before the first and before the second SocConv (null where there is none).
  const ChannelShuffle* input_shuffle() const { return input_shuffle_.get(); }
  const ChannelShuffle* middle_shuffle() const { return middle_shuffle_.get(); }
  ChannelShuffle* input_shuffle() { return input_shuffle_.get(); }
  ChannelShuffle* middle_shuffle() { return middle_shuffle_.get(); }

 private:
  GsSocConfig config_;
  std::unique_ptr<ChannelShuffle> input_shuffle_;
  std::unique_ptr<SocConv> first_;
  std::unique_ptr<ChannelShuffle> middle_shuffle_;
  std::unique_ptr<SocConv> second_;
  Tensor shuffled_, first_out_, middle_;
  Tensor diff_a_, diff_b_;
};

}  // namespace orthoconv
