// The LipConvnet architecture flags shared by `model-info`, `train` and `bench train`.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "commands.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv::apps {

struct ModelFlags {
  std::string conv = "gs-soc";
  std::string groups;  // default: "4,1" for gs-soc, "1" for soc
  int64_t depth = 15;
  int64_t width = 32;
  int64_t classes = 100;
  std::string activation = "maxmin";
  std::string head = "soc";
  std::string keep = "first";
  int train_terms = 5;
  int eval_terms = 12;

  ModelConfig config() const {
    ModelConfig c;
    c.conv = parse_conv_kind(conv);
    if (!groups.empty()) c.groups = GroupCounts::parse(groups);  // none: default_groups(c.conv)
    require(c.conv == ConvKind::gs_soc || !c.group_counts().second,
            "--conv soc takes one group count ('--groups 1' is plain SOC), "
            "got '",
            groups, "'; use --conv gs-soc for a pair");
    c.depth = depth;
    c.init_channels = width;
    c.classes = classes;
    c.activation = parse_activation(activation);
    c.head = parse_head(head);
    c.keep = parse_keep(keep);
    c.train_terms = train_terms;
    c.eval_terms = eval_terms;
    c.validate();
    return c;
  }
};

inline void add_model_flags(CLI::App& cmd, ModelFlags& f) {
  cmd.add_option("--conv", f.conv, "orthogonal convolution: soc | gs-soc")
      ->capture_default_str()
      ->check(CLI::IsMember({"soc", "gs-soc"}));
  cmd.add_option("--groups", f.groups, "gs-soc groups 'a,b' or 'a,-' (default 4,1); soc: one count (default 1)");
  cmd.add_option("--depth", f.depth, "LipConvnet depth N (5, 10, 15, ...)")->capture_default_str();
  cmd.add_option("--width", f.width, "channels of stage 1 (init channels)")->capture_default_str();
  cmd.add_option("--classes", f.classes, "number of classes")->capture_default_str();
  cmd.add_option("--activation", f.activation, "maxmin | maxmin-paired (paired shuffles)")
      ->capture_default_str()
      ->check(CLI::IsMember({"maxmin", "maxmin-paired"}));
  cmd.add_option("--head", f.head, "soc (1x1 SOC, the reference) | lln (unit-norm rows)")
      ->capture_default_str()
      ->check(CLI::IsMember({"soc", "lln"}));
  cmd.add_option("--downsample-keep", f.keep,
                 "stride-2 grouped layers keep the first c_out channels or the first "
                 "half of each group: first | per-group")
      ->capture_default_str()
      ->check(CLI::IsMember({"first", "per-group"}));
  cmd.add_option("--train-terms", f.train_terms, "series terms in training")->capture_default_str();
  cmd.add_option("--eval-terms", f.eval_terms, "series terms in evaluation")->capture_default_str();
}

}  // namespace orthoconv::apps
