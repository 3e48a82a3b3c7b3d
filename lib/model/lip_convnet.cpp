// LipConvnet-N: the builder (stages, strides, kernels, widths), forward and backward through every layer, and
// the stable names of its parameters, buffers and SocConv step counters. See include/orthoconv/model.hpp.
#include <algorithm>
#include <sstream>

#include "orthoconv/limits.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

namespace {

// splitmix64: independent, reproducible seeds for each layer from the model seed.
uint64_t mix_seed(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (index + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

LipConvnet::~LipConvnet() = default;

LipConvnet::LipConvnet(const ModelConfig& config, std::shared_ptr<Backend> backend)
    : config_(config), backend_(std::move(backend)) {
  config_.validate();
  require(backend_ != nullptr, "LipConvnet needs a backend");
  add_blocks();
  SocConv* soc_head = add_head();
  if (backend_->device() != Device::cpu) {
    head_out_ = Tensor(Shape{1}, backend_->device());
    diff_a_ = Tensor(Shape{1}, backend_->device());
    diff_b_ = Tensor(Shape{1}, backend_->device());
  }
  list_steps(soc_head);
  set_training(true);
}

namespace {

// The settings every SocConv of the model shares (terms, power iteration), for one convolution.
SocConfig model_soc_config(const ModelConfig& config, int64_t in_channels, int64_t out_channels, int64_t kernel,
                           int64_t stride, uint64_t seed) {
  SocConfig soc;
  soc.in_channels = in_channels;
  soc.out_channels = out_channels;
  soc.kernel = kernel;
  soc.stride = stride;
  soc.train_terms = config.train_terms;
  soc.eval_terms = config.eval_terms;
  soc.seed = seed;
  soc.init_iterations = config.init_iterations;
  soc.schedule = config.power_schedule;
  return soc;
}

}  // namespace

// The builder's walk (model.hpp): five stages of block_size() blocks, the last block of each with stride 2, the last
// block of stage 5 with a 1x1 kernel; each block's layers seeded from the model seed in order.
void LipConvnet::add_blocks() {
  int64_t in_planes = 3, side = config_.input_side;
  uint64_t layer_index = 0;
  for (int stage = 0; stage < 5; ++stage) {
    const int64_t planes = stage == 0 ? config_.init_channels : in_planes;
    for (int64_t b = 0; b < config_.block_size(); ++b) {
      const bool last = b == config_.block_size() - 1;
      const int64_t stride = last ? 2 : 1;
      const int64_t kernel = (last && stage == 4) ? 1 : 3;
      SocConfig base =
          model_soc_config(config_, in_planes, planes * stride, kernel, stride, mix_seed(config_.seed, layer_index++));
      base.keep = config_.keep;
      add_block("stage" + std::to_string(stage + 1) + ".block" + std::to_string(b), base);
      in_planes = planes * stride;
      side /= stride;
    }
  }
  features_ = in_planes * side * side;
}

// One block: the convolution (a SocConv for conv soc, a GsSocConv for gs-soc) on `base`, then MaxMin.
void LipConvnet::add_block(const std::string& name, const SocConfig& base) {
  Block block;
  block.name = name;
  try {
    if (config_.conv == ConvKind::soc) {
      SocConfig soc = base;
      soc.groups = config_.group_counts().first;
      auto layer = std::make_unique<SocConv>(soc, backend_);
      block.soc = layer.get();
      block.conv = std::move(layer);
    } else {
      GsSocConfig gs;
      gs.base = base;
      gs.groups = config_.group_counts();
      gs.paired = config_.paired();
      auto layer = std::make_unique<GsSocConv>(gs, backend_);
      block.gs = layer.get();
      block.conv = std::move(layer);
    }
  } catch (const ConfigError& e) {
    throw ConfigError(block.name + " (" + std::to_string(base.in_channels) + "->" + std::to_string(base.out_channels) +
                      ", stride " + std::to_string(base.stride) + "): " + e.what());
  }
  block.activation = std::make_unique<MaxMin>(config_.paired(), backend_);
  if (backend_->device() != Device::cpu) {  // outputs live on the backend's device
    block.conv_out = Tensor(Shape{1}, backend_->device());
    block.act_out = Tensor(Shape{1}, backend_->device());
  }
  blocks_.push_back(std::move(block));
}

// The head on the features_ flattened values: a 1x1 SocConv (returned) or LinearNormalized (lln_head_, null returned).
SocConv* LipConvnet::add_head() {
  const uint64_t head_seed = mix_seed(config_.seed, 1000003);
  if (config_.head == HeadKind::lln) {
    auto lln = std::make_unique<LinearNormalized>(features_, config_.classes, head_seed, backend_);
    lln_head_ = lln.get();
    head_ = std::move(lln);
    return nullptr;
  }
  SocConfig head = model_soc_config(config_, features_, config_.classes, 1, 1, head_seed);
  head.groups = 1;
  auto layer = std::make_unique<SocConv>(head, backend_);
  SocConv* soc_head = layer.get();
  head_ = std::move(layer);
  return soc_head;
}

// The steps, in the order forward() runs them (model.hpp, NetworkStep): each block's conv_steps and its MaxMin,
// flatten, the head.
void LipConvnet::list_steps(SocConv* soc_head) {
  Shape shape{1, 3, config_.input_side, config_.input_side};
  for (Block& block : blocks_) {
    const std::vector<NetworkStep> conv = block.soc ? conv_steps(*block.soc, block.name + ".conv", block.name, shape)
                                                    : conv_steps(*block.gs, block.name + ".conv", block.name, shape);
    steps_.insert(steps_.end(), conv.begin(), conv.end());
    NetworkStep activation;
    activation.kind = StepKind::maxmin;
    activation.name = block.name + ".activation";
    activation.block = block.name;
    activation.input = steps_.back().output;
    activation.output = block.activation->output_shape(activation.input);
    activation.maxmin = block.activation.get();
    activation.layer = activation.block_layer = block.activation.get();
    shape = activation.output;
    steps_.push_back(activation);
  }
  NetworkStep flatten;
  flatten.kind = StepKind::flatten;
  flatten.name = flatten.block = "flatten";
  flatten.input = shape;
  flatten.output = Shape{1, features_, 1, 1};
  steps_.push_back(flatten);
  if (soc_head) {
    steps_.push_back(conv_steps(*soc_head, "head", "head", flatten.output).front());
  } else {
    NetworkStep head;
    head.kind = StepKind::lln;
    head.name = head.block = "head";
    head.input = flatten.output;
    head.output = lln_head_->output_shape(head.input);
    head.lln = lln_head_;
    head.layer = head.block_layer = lln_head_;
    steps_.push_back(head);
  }
}

void LipConvnet::forward(const Tensor& images, Tensor& logits) {
  require<ShapeError>(images.shape().rank() == 4 && images.dim(1) == 3 && images.dim(2) == config_.input_side &&
                          images.dim(3) == config_.input_side && images.dim(0) > 0,
                      "LipConvnet expects images [N, 3, ", config_.input_side, ", ", config_.input_side, "], got ",
                      images.shape().str());
  input_shape_ = images.shape();
  const Tensor* x = &images;
  for (Block& block : blocks_) {
    block.conv->forward(*x, block.conv_out);
    block.activation->forward(block.conv_out, block.act_out);
    x = &block.act_out;
  }
  const int64_t n = images.dim(0);
  Tensor flat = x->reshaped(Shape{n, features_, 1, 1});
  head_->forward(flat, head_out_);
  if (logits.device() != backend_->device()) logits = Tensor(Shape{n, config_.classes}, backend_->device());
  logits.resize(Shape{n, config_.classes});
  backend_->copy(head_out_.data(), logits.data(), logits.numel());
}

void LipConvnet::backward(const Tensor& diff_logits, Tensor* diff_input) {
  require<ShapeError>(!input_shape_.dims().empty(), "LipConvnet::backward called before forward");
  const int64_t n = input_shape_[0];
  check_shape(diff_logits, Shape{n, config_.classes}, "LipConvnet::backward diff_logits");
  Tensor d4 = diff_logits.reshaped(Shape{n, config_.classes, 1, 1});
  head_->backward(d4, diff_a_);
  Tensor d = diff_a_.reshaped(blocks_.back().act_out.shape());
  for (size_t i = blocks_.size(); i-- > 0;) {
    Block& block = blocks_[i];
    block.activation->backward(d, diff_b_);
    Tensor& target = (i == 0 && diff_input != nullptr) ? *diff_input : diff_a_;
    block.conv->backward(diff_b_, target);
    d = target;
  }
}

void LipConvnet::set_training(bool training) {
  training_ = training;
  for (Block& block : blocks_) {
    block.conv->set_training(training);
    block.activation->set_training(training);
  }
  head_->set_training(training);
}

void LipConvnet::set_parameter_gradients(bool enabled) {
  parameter_gradients_ = enabled;
  for (Block& block : blocks_) block.conv->set_parameter_gradients(enabled);
  head_->set_parameter_gradients(enabled);
}

void LipConvnet::set_terms(int train_terms, int eval_terms) {
  require(train_terms > 0 && eval_terms > 0 && train_terms <= kMaxSeriesTerms && eval_terms <= kMaxSeriesTerms,
          "series terms must be in 1..", kMaxSeriesTerms, ", got ", train_terms, " (train) and ", eval_terms,
          " (eval)");
  config_.train_terms = train_terms;
  config_.eval_terms = eval_terms;
  for (NamedSoc& s : soc_layers()) s.soc->set_terms(train_terms, eval_terms);
}

void LipConvnet::set_power_schedule(const PowerSchedule& schedule) {
  schedule.validate();
  config_.power_schedule = schedule;
  for (NamedSoc& s : soc_layers()) s.soc->set_schedule(schedule);
}

void LipConvnet::set_precision(ConvPrecision precision) {
  backend_->check_precision(precision);
  for (NamedSoc& s : soc_layers()) s.soc->set_precision(precision);
}

void LipConvnet::zero_grad() {
  for (NamedParameter& p : parameters()) backend_->fill(p.parameter->grad.data(), p.parameter->grad.numel(), 0.0f);
}

std::vector<NamedSoc> LipConvnet::soc_layers() {
  std::vector<NamedSoc> out;
  for (const NetworkStep& step : steps_)
    if (step.soc) out.push_back({step.name, step.soc});
  return out;
}

std::vector<NamedParameter> LipConvnet::parameters() {
  std::vector<NamedParameter> out;
  for (NamedSoc& s : soc_layers())
    for (Parameter* p : s.soc->parameters()) out.push_back({s.name + "." + p->name, p});
  if (lln_head_) {
    out.push_back({"head.weight", &lln_head_->weight()});
    out.push_back({"head.bias", &lln_head_->bias()});
  }
  return out;
}

std::vector<NamedBuffer> LipConvnet::buffers() {
  std::vector<NamedBuffer> out;
  for (NamedSoc& s : soc_layers())
    for (const Buffer& b : s.soc->buffers()) out.push_back({s.name + "." + b.name, b.tensor});
  return out;
}

int64_t LipConvnet::parameter_count() {
  int64_t count = 0;
  for (NamedParameter& p : parameters()) count += p.parameter->value.numel();
  return count;
}

// A row per block and the head: the block's input, its convolution's output (the activation keeps the shape), the
// description of the block's layers and the parameters of its steps.
std::vector<LayerRow> LipConvnet::layer_table() {
  std::vector<LayerRow> rows;
  for (const NetworkStep& step : steps_) {
    if (!step.block_layer) continue;  // flatten
    if (rows.empty() || rows.back().name != step.block) {
      LayerRow row;
      row.name = step.block;
      row.description = step.block_layer->describe();
      row.input = step.input;
      row.output = step.output;
      rows.push_back(row);
    } else if (step.kind == StepKind::maxmin) {
      rows.back().description += ", " + step.maxmin->describe();
    } else {
      rows.back().output = step.output;
    }
    if (step.kind == StepKind::soc || step.kind == StepKind::lln)
      rows.back().parameters += step.layer->parameter_count();
  }
  return rows;
}

}  // namespace orthoconv
