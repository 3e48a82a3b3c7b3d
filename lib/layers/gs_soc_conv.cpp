#include "orthoconv/gs_soc_conv.hpp"

#include <charconv>
#include <sstream>

namespace orthoconv {

GroupCounts GroupCounts::parse(const std::string& text, const std::string& setting) {
  auto count = [&](const std::string& part) {
    int64_t value = 0;
    const auto [end, error] = std::from_chars(part.data(), part.data() + part.size(), value);
    require_setting(!part.empty() && error == std::errc() && end == part.data() + part.size() && value > 0, {setting},
                    "{0}: expected 'a,b', 'a,-' or 'a' with positive integers, got '", text, "'");
    return value;
  };
  GroupCounts out;
  const auto comma = text.find(',');
  out.first = count(text.substr(0, comma));
  if (comma != std::string::npos && text.substr(comma + 1) != "-") out.second = count(text.substr(comma + 1));
  return out;
}

std::string GroupCounts::text() const {
  return std::to_string(first) + "," + (second ? std::to_string(*second) : std::string("-"));
}

void GsSocConfig::validate() const {
  require(groups.first > 0, "GS-SOC first groups (a) must be positive, got ", groups.first);
  if (groups.second) require(*groups.second > 0, "GS-SOC second groups (b) must be positive, got ", *groups.second);
  SocConfig first = base;
  first.groups = groups.first;
  if (first.kernel != 1) first.path = SocPath::automatic;
  first.validate();
  if (groups.second) {
    require(base.out_channels % *groups.second == 0, "GS-SOC second groups (b = ", *groups.second,
            ") must divide out_channels (", base.out_channels, ")");
    if (paired)
      require(base.out_channels % (2 * *groups.second) == 0, "paired GS-SOC needs 2*b (", 2 * *groups.second,
              ") to divide out_channels (", base.out_channels, ")");
  }
}

GsSocConv::GsSocConv(const GsSocConfig& config, const std::shared_ptr<Backend>& backend) : config_(config) {
  config_.validate();
  const int64_t a = config_.groups.first;
  const int64_t c_in = config_.base.in_channels, c_out = config_.base.out_channels;
  bool shuffle_input = c_in % a == 0 && (!config_.paired || c_in % (2 * a) == 0);
  if (shuffle_input) input_shuffle_ = std::make_unique<ChannelShuffle>(c_in, a, config_.paired, false, backend);
  SocConfig first = config_.base;
  first.groups = a;
  if (first.kernel != 1) first.path = SocPath::automatic;  // base.path is for the 1x1 stages
  first_ = std::make_unique<SocConv>(first, backend);
  if (config_.groups.second) {
    const int64_t b = *config_.groups.second;
    middle_shuffle_ = std::make_unique<ChannelShuffle>(c_out, b, config_.paired, false, backend);
    SocConfig second = config_.base;
    second.in_channels = c_out;
    second.kernel = 1;
    second.stride = 1;
    second.groups = b;
    second.correction.reset();
    second.keep = KeepChannels::first;
    second.seed = config_.base.seed ^ 0x9e3779b97f4a7c15ULL;
    second_ = std::make_unique<SocConv>(second, backend);
  }
}

std::string GsSocConv::describe() const {
  std::ostringstream out;
  out << "gs-soc (" << config_.groups.text() << ")" << (config_.paired ? " paired" : "") << ": "
      << (input_shuffle_ ? "shuffle, " : "") << first_->describe();
  if (second_) out << ", shuffle, " << second_->describe();
  return out.str();
}

Shape GsSocConv::output_shape(const Shape& input) const { return first_->output_shape(input); }

std::vector<Parameter*> GsSocConv::parameters() {
  auto out = first_->parameters();
  if (second_)
    for (Parameter* p : second_->parameters()) out.push_back(p);
  return out;
}

std::vector<Buffer> GsSocConv::buffers() {
  auto out = first_->buffers();
  if (second_)
    for (const Buffer& b : second_->buffers()) out.push_back(b);
  return out;
}

void GsSocConv::set_training(bool training) {
  Layer::set_training(training);
  first_->set_training(training);
  if (second_) second_->set_training(training);
}

void GsSocConv::set_parameter_gradients(bool enabled) {
  Layer::set_parameter_gradients(enabled);
  first_->set_parameter_gradients(enabled);
  if (second_) second_->set_parameter_gradients(enabled);
}

void GsSocConv::forward(const Tensor& input, Tensor& output) {
  const Tensor* x = &input;
  if (input_shuffle_) {
    input_shuffle_->forward(input, shuffled_);
    x = &shuffled_;
  }
  if (!second_) {
    first_->forward(*x, output);
    return;
  }
  first_->forward(*x, first_out_);
  if (middle_shuffle_->is_identity()) {
    second_->forward(first_out_, output);
    return;
  }
  middle_shuffle_->forward(first_out_, middle_);
  second_->forward(middle_, output);
}

void GsSocConv::backward(const Tensor& diff_output, Tensor& diff_input) {
  const Tensor* d = &diff_output;
  if (second_) {
    if (middle_shuffle_->is_identity()) {
      second_->backward(diff_output, diff_b_);
    } else {
      second_->backward(diff_output, diff_a_);
      middle_shuffle_->backward(diff_a_, diff_b_);
    }
    d = &diff_b_;
  }
  if (!input_shuffle_) {
    first_->backward(*d, diff_input);
    return;
  }
  first_->backward(*d, diff_a_);
  input_shuffle_->backward(diff_a_, diff_input);
}

}  // namespace orthoconv
