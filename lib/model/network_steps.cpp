// The steps of a LipConvnet's evaluation (include/orthoconv/model.hpp, NetworkStep): the one place that says in
// which order a convolution layer's parts run; LipConvnet::steps() strings them together with the activations,
// the flatten and the head.
#include "orthoconv/model.hpp"

namespace orthoconv {

const char* step_kind_name(StepKind kind) {
  switch (kind) {
    case StepKind::shuffle:
      return "shuffle";
    case StepKind::soc:
      return "soc";
    case StepKind::maxmin:
      return "maxmin";
    case StepKind::flatten:
      return "flatten";
    case StepKind::lln:
      return "lln";
  }
  return "?";
}

namespace {

NetworkStep soc_step(SocConv& soc, const std::string& name, const std::string& block, const Shape& input,
                     Layer& block_layer) {
  NetworkStep step;
  step.kind = StepKind::soc;
  step.name = name;
  step.block = block;
  step.input = input;
  step.output = soc.output_shape(input);
  step.layer = &soc;
  step.soc = &soc;
  step.block_layer = &block_layer;
  return step;
}

NetworkStep shuffle_step(ChannelShuffle& shuffle, const std::string& name, const std::string& block, const Shape& input,
                         Layer& block_layer) {
  NetworkStep step;
  step.kind = StepKind::shuffle;
  step.name = name;
  step.block = block;
  step.input = input;
  step.output = shuffle.output_shape(input);
  step.layer = &shuffle;
  step.shuffle = &shuffle;
  step.block_layer = &block_layer;
  return step;
}

}  // namespace

std::vector<NetworkStep> conv_steps(SocConv& conv, const std::string& name, const std::string& block,
                                    const Shape& input) {
  return {soc_step(conv, name, block, input, conv)};
}

// GsSocConv::forward's order: [input shuffle] first [middle shuffle, second]. The middle shuffle is listed even
// where it is the identity (b = 1): the forward skips the copy, the step list keeps the permutation.
std::vector<NetworkStep> conv_steps(GsSocConv& conv, const std::string& name, const std::string& block,
                                    const Shape& input) {
  std::vector<NetworkStep> out;
  Shape shape = input;
  if (ChannelShuffle* shuffle = conv.input_shuffle()) {
    out.push_back(shuffle_step(*shuffle, name + ".input_shuffle", block, shape, conv));
    shape = out.back().output;
  }
  out.push_back(soc_step(conv.first(), name + ".first", block, shape, conv));
  shape = out.back().output;
  if (SocConv* second = conv.second()) {
    require<Error>(conv.middle_shuffle() != nullptr, name, ": a GS-SOC second stage without its shuffle");
    out.push_back(shuffle_step(*conv.middle_shuffle(), name + ".middle_shuffle", block, shape, conv));
    shape = out.back().output;
    out.push_back(soc_step(*second, name + ".second", block, shape, conv));
  }
  return out;
}

}  // namespace orthoconv
