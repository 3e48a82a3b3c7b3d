// orthoconv/model.hpp: LipConvnet-N, the 1-Lipschitz network of the SOC and GS-SOC papers.
//
// N = 5 * block_size. Five stages of block_size blocks; a block is one orthogonal convolution then MaxMin.
// In every stage the strides are [1, ..., 1, 2] (the stride-2 block last) and the kernels are 3, except the
// last block of stage 5, which is 1x1. A block maps in_planes -> planes * stride; stage 1 starts at 3 -> width
// (init_channels, 32); the next stage's planes are the previous stage's output. LipConvnet-15, width 32:
//   (3->32)(32->32)(32->64,s2) @32 | (64->64)x2 (64->128,s2) @16 | (128->128)x2 (128->256,s2) @8 |
//   (256->256)x2 (256->512,s2) @4 | (512->512)x2 (512->1024,k1,s2) @2 | head on 1024 features.
// The 1024 x (side/32)^2 features are flattened (C, H, W order) into [N, F, 1, 1] for the head:
//   head "soc": SocConv(F -> classes, 1x1, 1 group, bias): the series runs on max(F, classes) channels and
//               the first `classes` outputs are kept (the reference's last layer);
//   head "lln": LinearNormalized: y = (W_i / ||W_i||) . x + b_i, W [classes, F].
// Every layer is 1-Lipschitz (orthogonal, or a coordinate projection of one, or MaxMin), so the logits are
// 1-Lipschitz in the normalized input; the input normalization adds Normalization::lipschitz().
//
// Input [N, 3, side, side] NCHW float32 (side a multiple of 32); logits [N, classes] (row-major).
// Series terms: train_terms in training mode (5), eval_terms in evaluation mode (12).
// Memory (activations; soc_conv.hpp has the per-layer detail): every block keeps its convolution's and its
// MaxMin's outputs (a backward's inputs), a GS-SOC block also its shuffled input and its two middle tensors.
// Training: every SocConv also keeps its K+1 series terms, and the backward K+2 gradient terms: for LipConvnet-15
// GS-SOC (4,1) at batch 128 a training step peaks at 3.4 GB resident on the CPU. Evaluation: the series run in
// the backend's three shared buffers, so memory does not grow with the terms: a forward of 256 images peaks at
// 1.2 GB (`orthoconv certify --batch 256`, with the float64 pass: 1.4 GB).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "orthoconv/gs_soc_conv.hpp"
#include "orthoconv/layer.hpp"
#include "orthoconv/maxmin.hpp"
#include "orthoconv/soc_conv.hpp"

namespace orthoconv {

// The settings of a LipConvnet that are one of a few names. Each has one parse / name pair (as parse_keep /
// keep_name): the command line, config.json, checkpoints and tables write and read them only through these. A parse
// throws SettingError naming the setting (its config.json key: "conv", "activation", "head") and the text.
enum class ConvKind { soc, gs_soc };
ConvKind parse_conv_kind(const std::string& text);  // "soc" | "gs-soc"
std::string conv_kind_name(ConvKind kind);
enum class ActivationKind { maxmin, maxmin_paired };       // maxmin-paired: the GS-SOC shuffles are paired too
ActivationKind parse_activation(const std::string& text);  // "maxmin" | "maxmin-paired"
std::string activation_name(ActivationKind activation);
enum class HeadKind { soc, lln };
HeadKind parse_head(const std::string& text);  // "soc" | "lln"
std::string head_name(HeadKind head);
KeepChannels parse_keep(const std::string& text);  // "first" | "per-group"; the setting "downsample_keep"
std::string keep_name(KeepChannels keep);

// The groups a conv gets when none are given: (1, -) for soc (plain SOC), (4, 1) for gs-soc (the GS paper's).
GroupCounts default_groups(ConvKind conv);

struct ModelConfig {
  ConvKind conv = ConvKind::gs_soc;
  // gs-soc: (a, b) or (a, -); soc: (g, -), g the group count of every SocConv (1 = plain SOC). None given:
  // default_groups(conv), so that the defaults are valid for every conv kind (group_counts()).
  std::optional<GroupCounts> groups;
  int64_t depth = 15;          // N, a multiple of 5
  int64_t init_channels = 32;  // width
  int64_t classes = 100;
  ActivationKind activation = ActivationKind::maxmin;
  HeadKind head = HeadKind::soc;
  KeepChannels keep = KeepChannels::first;  // stride-2 grouped exponentials: the first c_out or per group
  int train_terms = 5;
  int eval_terms = 12;
  int64_t input_side = 32;
  uint64_t seed = 42;  // initialization
  // Power iterations of every SocConv at construction (0: the u, v come from a checkpoint, or only shapes are
  // needed), and in training-mode forwards (PowerSchedule: the reference's 50/1/200, or hold() to keep u, v).
  int init_iterations = 50;
  PowerSchedule power_schedule;

  // Throws ConfigError naming the setting: bad values, depth above kMaxDepth, terms above kMaxSeriesTerms, and
  // weights that could not fit in this machine's memory (checked from weight_values() before any allocation).
  void validate() const;
  int64_t block_size() const { return depth / 5; }
  // The groups the model is built with: `groups`, or default_groups(conv) when none are given.
  GroupCounts group_counts() const { return groups ? *groups : default_groups(conv); }
  // Float32 value counts from the configuration alone, in double so that none can overflow: checked against memory
  // before anything is allocated. Both are lower bounds of what the model allocates.
  struct Sizes {
    double weights = 0;      // every SocConv's M and the lln head's W (no biases, no power-iteration vectors)
    double activations = 0;  // per image: the outputs of every block's convolution and activation (kept by forward)
  };
  Sizes sizes() const;
  // "4,1", "4,-" (gs-soc: GroupCounts::text) or "1" (soc): the groups as --groups, config.json and checkpoints
  // write them; GroupCounts::parse reads them back.
  std::string groups_text() const;
  bool paired() const { return activation == ActivationKind::maxmin_paired; }
  // "gs-soc(4,1)", "gs-soc(4,-)", "soc" (or "soc(g4)"): for tables.
  std::string conv_label() const;
  // A canonical one-line description of everything that fixes the parameter shapes and the function computed
  // (conv, groups, depth, width, classes, activation, head, keep, input side). Checkpoints store it.
  std::string architecture() const;
};

// The `lln` head: rows of W normalized to unit norm, plus a bias. Input [N, F, 1, 1], output [N, classes, 1, 1].
// Backward: with q_i = w_i / ||w_i|| and g_i = sum_n dy_ni x_n, dW_i = (g_i - q_i (q_i . g_i)) / ||w_i||.
// Small (classes x F), so it runs on the host (through to_host / from_host on other devices).
class LinearNormalized : public Layer {
 public:
  LinearNormalized(int64_t features, int64_t classes, uint64_t seed, std::shared_ptr<Backend> backend = cpu_backend());
  std::string kind() const override { return "lln"; }
  std::string describe() const override;
  Shape output_shape(const Shape& input) const override;
  void forward(const Tensor& input, Tensor& output) override;
  void backward(const Tensor& diff_output, Tensor& diff_input) override;
  std::vector<Parameter*> parameters() override { return {&weight_, &bias_}; }
  Parameter& weight() { return weight_; }
  Parameter& bias() { return bias_; }
  // The normalized rows Q [classes, F], computed from the current W (host, double).
  std::vector<double> normalized_rows();

 private:
  int64_t features_, classes_;
  std::shared_ptr<Backend> backend_;
  Parameter weight_, bias_;
  std::vector<float> host_w_, host_x_, host_y_, host_dy_, host_dx_, host_g_;
  std::vector<double> norms_;
  Tensor staged_w_, staged_b_;  // device copies of the host gradients, added into Parameter::grad
  Shape input_shape_;

  void add_parameter_gradients(int64_t batch);  // from host_dy_ and host_x_ of the last forward / backward
};

struct NamedParameter {
  std::string name;  // "stage1.block0.conv.weight", "stage2.block1.conv.first.weight", "head.bias", ...
  Parameter* parameter;
};
struct NamedBuffer {
  std::string name;  // "stage1.block0.conv.u1", ...
  Tensor* tensor;
};
struct NamedSoc {
  std::string name;  // "stage1.block0.conv" or "stage1.block0.conv.first", "head"
  SocConv* soc;
};

// One step of a LipConvnet's evaluation, in the order the model's forward runs them: the one description of the
// network's structure. LipConvnet::steps() lists them; the float64 certifying pass, the verified bound
// (network_bound.hpp), the layer table, `bench layers`, the ONNX export and the tests are built from that list,
// and a test runs the steps one by one through their layers and gets the model's logits bit for bit.
//
// LipConvnet-N is, block by block (stage s = 1..5, block b = 0..block_size-1, prefix "stage<s>.block<b>"):
//   conv "soc":     soc      "<prefix>.conv"
//   conv "gs-soc":  shuffle  "<prefix>.conv.input_shuffle"   (only where the GS-SOC layer shuffles its input)
//                   soc      "<prefix>.conv.first"           (k x k, groups a, the block's stride)
//                   shuffle  "<prefix>.conv.middle_shuffle"  (b only; with b = 1 it is the identity permutation,
//                   soc      "<prefix>.conv.second"           which the model's forward skips: see is_identity())
//   activation:     maxmin   "<prefix>.activation"
// then flatten "flatten" ([1, C, H, W] -> [1, C*H*W, 1, 1], C, H, W order: the same values in the same order) and
// the head "head": soc (SocConv 1x1, F -> classes, the first `classes` outputs kept) or lln (LinearNormalized).
// What each kind carries (exactly one typed pointer is set, none for flatten; `layer` is the same object):
//   shuffle: `shuffle`  output channel destination()[c] = input channel c (channel_shuffle.hpp); shape unchanged.
//   soc:     `soc`      config() (channels, kernel, stride, groups, keep, bias), scaled_filter() (A_n), bias();
//                       series terms in evaluation: soc->config().eval_terms (= the model's eval_terms).
//   maxmin:  `maxmin`   paired() (maxmin.hpp); shape unchanged.
//   lln:     `lln`      weight(), bias(), normalized_rows().
// Shapes are one image's, NCHW: input [1, C, H, W] -> output [1, C', H', W'] (the head's output [1, classes, 1, 1]).
enum class StepKind { shuffle, soc, maxmin, flatten, lln };
const char* step_kind_name(StepKind kind);  // "shuffle", "soc", "maxmin", "flatten", "lln"

struct NetworkStep {
  StepKind kind = StepKind::flatten;
  std::string name;     // hierarchical, as above; a soc step's name prefixes its parameters and buffers
  std::string block;    // the layer-table row it belongs to: "stage1.block0", ..., "head"; "flatten" for flatten
  Shape input, output;  // one image
  // Runs the step: layer->forward(batch of `input`, batch of `output`) (any batch size); null for flatten.
  Layer* layer = nullptr;
  ChannelShuffle* shuffle = nullptr;
  SocConv* soc = nullptr;
  MaxMin* maxmin = nullptr;
  LinearNormalized* lln = nullptr;
  // The layer of the model's forward that contains this step (the block's SocConv or GsSocConv for shuffle and soc
  // steps, the MaxMin, the head); null for flatten.
  Layer* block_layer = nullptr;
};

// The steps of one convolution layer on `input` (one image, [1, C, H, W]), named under `name` as above (a plain
// SocConv is one soc step named `name`). LipConvnet::steps() is built from these; tools that run a single layer
// (bench layers) use them too. block_layer is the layer itself; block is `block`.
std::vector<NetworkStep> conv_steps(SocConv& conv, const std::string& name, const std::string& block,
                                    const Shape& input);
std::vector<NetworkStep> conv_steps(GsSocConv& conv, const std::string& name, const std::string& block,
                                    const Shape& input);

// One row of the layer table.
struct LayerRow {
  std::string name;         // "stage1.block0"
  std::string description;  // the conv's describe()
  Shape input, output;
  int64_t parameters = 0;
};

class LipConvnet {
 public:
  explicit LipConvnet(const ModelConfig& config, std::shared_ptr<Backend> backend = cpu_backend());
  ~LipConvnet();
  LipConvnet(const LipConvnet&) = delete;
  LipConvnet& operator=(const LipConvnet&) = delete;

  const ModelConfig& config() const { return config_; }
  Backend& backend() { return *backend_; }
  std::shared_ptr<Backend> backend_ptr() { return backend_; }

  // images [N, 3, side, side] (backend device) -> logits [N, classes] (backend device). Keeps what backward
  // needs. In training mode every SocConv advances its step counter (and power iteration).
  void forward(const Tensor& images, Tensor& logits);
  // ADDS parameter gradients (call zero_grad() first); diff_input, when given, receives dL/dimages.
  void backward(const Tensor& diff_logits, Tensor* diff_input = nullptr);

  void set_training(bool training);
  bool training() const { return training_; }
  // false: backward gives dL/dimages only and leaves every Parameter::grad untouched (Layer).
  void set_parameter_gradients(bool enabled);
  bool parameter_gradients() const { return parameter_gradients_; }
  void set_terms(int train_terms, int eval_terms);
  void set_power_schedule(const PowerSchedule& schedule);  // every SocConv's, and config().power_schedule
  // The precision of every SocConv's series convolutions in training mode (SocConv::set_precision; evaluation
  // is float32 whatever it is). Not part of the architecture: a checkpoint trained in bf16 is evaluated and
  // certified as any other. Throws ConfigError naming --precision where the backend cannot run it.
  void set_precision(ConvPrecision precision);
  void zero_grad();

  // Stable hierarchical names (see docs/checkpoint.md), in a fixed order.
  std::vector<NamedParameter> parameters();
  std::vector<NamedBuffer> buffers();   // power-iteration vectors
  std::vector<NamedSoc> soc_layers();   // every SocConv (step counters)
  int64_t parameter_count();            // trainable values (power-iteration vectors excluded)
  std::vector<LayerRow> layer_table();  // one row per block and the head, from steps()

  // Every step of the evaluation in order (NetworkStep above): fixed at construction, valid while the model lives.
  const std::vector<NetworkStep>& steps() { return steps_; }

  LinearNormalized* lln_head() { return lln_head_; }  // null for the soc head
  int64_t features() const { return features_; }      // head input size F

 private:
  struct Block {
    std::string name;
    std::unique_ptr<Layer> conv;
    SocConv* soc = nullptr;   // conv, when it is a SocConv
    GsSocConv* gs = nullptr;  // conv, when it is a GsSocConv
    std::unique_ptr<MaxMin> activation;
    Tensor conv_out, act_out;
  };
  ModelConfig config_;
  std::shared_ptr<Backend> backend_;
  std::vector<Block> blocks_;
  std::unique_ptr<Layer> head_;
  LinearNormalized* lln_head_ = nullptr;
  int64_t features_ = 0;
  bool training_ = true;
  bool parameter_gradients_ = true;
  Tensor head_out_;
  Tensor diff_a_, diff_b_;
  Shape input_shape_;
  std::vector<NetworkStep> steps_;

  // The constructor's parts, in its order.
  void add_blocks();                                               // blocks_ and features_
  void add_block(const std::string& name, const SocConfig& base);  // one conv + MaxMin
  SocConv* add_head();                                             // head_ (and lln_head_); the soc head or null
  void list_steps(SocConv* soc_head);                              // steps_
};

}  // namespace orthoconv
