// LipConvnet-N: the builder (stages, strides, kernels, widths), forward and backward through every layer, and
// the stable names of its parameters, buffers and SocConv step counters. See include/orthoconv/model.hpp.
#include <algorithm>
#include <charconv>
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

KeepChannels parse_keep(const std::string& text) {
  if (text == "first") return KeepChannels::first;
  if (text == "per-group") return KeepChannels::per_group;
  throw ConfigError("--downsample-keep must be 'first' or 'per-group', got '" + text + "'");
}

std::string keep_name(KeepChannels keep) { return keep == KeepChannels::first ? "first" : "per-group"; }

GroupCounts parse_groups(const std::string& text, const std::string& setting) {
  auto count = [&](const std::string& part) {
    int64_t value = 0;
    const auto [end, error] = std::from_chars(part.data(), part.data() + part.size(), value);
    require(!part.empty() && error == std::errc() && end == part.data() + part.size() && value > 0, setting,
            ": expected 'a,b', 'a,-' or 'a' with positive integers, got '", text, "'");
    return value;
  };
  GroupCounts out;
  const auto comma = text.find(',');
  out.first = count(text.substr(0, comma));
  if (comma != std::string::npos && text.substr(comma + 1) != "-") out.second = count(text.substr(comma + 1));
  return out;
}

std::string default_groups(const std::string& conv) { return conv == "soc" ? "1" : "4,1"; }

std::string ModelConfig::groups_text() const {
  std::string out = std::to_string(groups_first);
  if (conv == "gs-soc") out += "," + (groups_second ? std::to_string(*groups_second) : std::string("-"));
  return out;
}

ModelConfig::Sizes ModelConfig::sizes() const {
  // The builder's walk (LipConvnet::LipConvnet), stage by stage in closed form: block 0 maps the stage's input to
  // `planes`, blocks 1..n-2 keep `planes`, the last block doubles them with stride 2. A SocConv on c_in -> c_out
  // with stride s runs its series on C = max(c_out, c_in s^2) channels in g groups: g (C/g)^2 k^2 weights.
  auto soc = [](double c_in, double c_out, double stride, double kernel, double groups) {
    const double channels = std::max(c_out, c_in * stride * stride);
    return channels * channels * kernel * kernel / groups;
  };
  auto block = [&](double c_in, double c_out, double stride, double kernel) {
    if (conv == "soc") return soc(c_in, c_out, stride, kernel, static_cast<double>(groups_first));
    const double second = groups_second ? soc(c_out, c_out, 1, 1, static_cast<double>(*groups_second)) : 0.0;
    return soc(c_in, c_out, stride, kernel, static_cast<double>(groups_first)) + second;
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
  out.weights += head == "soc" ? soc(features, outputs, 1, 1, 1) : features * outputs;
  return out;
}

void ModelConfig::validate() const {
  require(conv == "soc" || conv == "gs-soc", "conv must be 'soc' or 'gs-soc', got '", conv, "'");
  require(groups_first > 0, "groups must be positive, got ", groups_first);
  require(!groups_second || *groups_second > 0, "second groups must be positive, got ", groups_second.value_or(0));
  require(conv == "gs-soc" || !groups_second,
          "conv 'soc' takes one group count (grouped SOC), not a pair; use "
          "--conv gs-soc for (a,b)");
  require(depth >= 5 && depth % 5 == 0, "depth must be a positive multiple of 5 (5, 10, 15, ...), got ", depth);
  require(depth <= kMaxDepth, "depth must be at most ", kMaxDepth, ", got ", depth);
  require(init_channels > 0, "init channels (width) must be positive, got ", init_channels);
  require(classes > 1, "classes must be at least 2, got ", classes);
  require(activation == "maxmin" || activation == "maxmin-paired",
          "activation must be 'maxmin' or 'maxmin-paired', got '", activation, "'");
  require(head == "soc" || head == "lln", "head must be 'soc' or 'lln', got '", head, "'");
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
  std::ostringstream out;
  if (conv == "soc") {
    out << "soc";
    if (groups_first != 1) out << "(g" << groups_first << ")";
  } else {
    out << "gs-soc(" << groups_first << ",";
    if (groups_second)
      out << *groups_second;
    else
      out << "-";
    out << ")";
  }
  return out.str();
}

std::string ModelConfig::architecture() const {
  std::ostringstream out;
  out << "lipconvnet-" << depth << " conv=" << conv_label() << " width=" << init_channels << " classes=" << classes
      << " activation=" << activation << " head=" << head << " keep=" << keep_name(keep) << " side=" << input_side;
  return out.str();
}

LipConvnet::~LipConvnet() = default;

LipConvnet::LipConvnet(const ModelConfig& config, std::shared_ptr<Backend> backend)
    : config_(config), backend_(std::move(backend)) {
  config_.validate();
  require(backend_ != nullptr, "LipConvnet needs a backend");
  int64_t in_planes = 3, side = config_.input_side;
  uint64_t layer_index = 0;
  for (int stage = 0; stage < 5; ++stage) {
    const int64_t planes = stage == 0 ? config_.init_channels : in_planes;
    for (int64_t b = 0; b < config_.block_size(); ++b) {
      const bool last = b == config_.block_size() - 1;
      const int64_t stride = last ? 2 : 1;
      const int64_t kernel = (last && stage == 4) ? 1 : 3;
      SocConfig base;
      base.in_channels = in_planes;
      base.out_channels = planes * stride;
      base.kernel = kernel;
      base.stride = stride;
      base.train_terms = config_.train_terms;
      base.eval_terms = config_.eval_terms;
      base.keep = config_.keep;
      base.seed = mix_seed(config_.seed, layer_index++);
      base.init_iterations = config_.init_iterations;
      base.schedule = config_.power_schedule;
      Block block;
      block.name = "stage" + std::to_string(stage + 1) + ".block" + std::to_string(b);
      try {
        if (config_.conv == "soc") {
          base.groups = config_.groups_first;
          auto soc = std::make_unique<SocConv>(base, backend_);
          block.soc = soc.get();
          block.conv = std::move(soc);
        } else {
          GsSocConfig gs;
          gs.base = base;
          gs.groups_first = config_.groups_first;
          gs.groups_second = config_.groups_second;
          gs.paired = config_.paired();
          auto layer = std::make_unique<GsSocConv>(gs, backend_);
          block.gs = layer.get();
          block.conv = std::move(layer);
        }
      } catch (const ConfigError& e) {
        throw ConfigError(block.name + " (" + std::to_string(base.in_channels) + "->" +
                          std::to_string(base.out_channels) + ", stride " + std::to_string(stride) + "): " + e.what());
      }
      block.activation = std::make_unique<MaxMin>(config_.paired(), backend_);
      if (backend_->device() != Device::cpu) {  // outputs live on the backend's device
        block.conv_out = Tensor(Shape{1}, backend_->device());
        block.act_out = Tensor(Shape{1}, backend_->device());
      }
      blocks_.push_back(std::move(block));
      in_planes = planes * stride;
      side /= stride;
    }
  }
  features_ = in_planes * side * side;
  const uint64_t head_seed = mix_seed(config_.seed, 1000003);
  SocConv* soc_head = nullptr;
  if (config_.head == "soc") {
    SocConfig head;
    head.in_channels = features_;
    head.out_channels = config_.classes;
    head.kernel = 1;
    head.stride = 1;
    head.groups = 1;
    head.train_terms = config_.train_terms;
    head.eval_terms = config_.eval_terms;
    head.seed = head_seed;
    head.init_iterations = config_.init_iterations;
    head.schedule = config_.power_schedule;
    auto layer = std::make_unique<SocConv>(head, backend_);
    soc_head = layer.get();
    head_ = std::move(layer);
  } else {
    auto lln = std::make_unique<LinearNormalized>(features_, config_.classes, head_seed, backend_);
    lln_head_ = lln.get();
    head_ = std::move(lln);
  }
  if (backend_->device() != Device::cpu) {
    head_out_ = Tensor(Shape{1}, backend_->device());
    diff_a_ = Tensor(Shape{1}, backend_->device());
    diff_b_ = Tensor(Shape{1}, backend_->device());
  }
  // The steps, in the order forward() runs them (model.hpp, NetworkStep).
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
  set_training(true);
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
