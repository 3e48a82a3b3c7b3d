#include "orthoconv/channel_shuffle.hpp"

#include <sstream>

namespace orthoconv {

std::vector<int32_t> channel_shuffle_permutation(int64_t channels, int64_t groups, bool paired) {
  require(channels > 0, "ChannelShuffle channels must be positive, got ", channels);
  require(groups > 0, "ChannelShuffle groups must be positive, got ", groups);
  require(channels % groups == 0, "ChannelShuffle groups (", groups, ") must divide channels (", channels, ")");
  if (paired)
    require(channels % (2 * groups) == 0, "paired ChannelShuffle needs 2 * groups (", 2 * groups,
            ") to divide channels (", channels, ")");
  const int64_t per_group = channels / groups;
  std::vector<int32_t> destination(static_cast<size_t>(channels));
  for (int64_t i = 0; i < channels; ++i) {
    int64_t to = paired ? ((i / 2) % groups) * per_group + 2 * (i / (2 * groups)) + (i % 2)
                        : (i % groups) * per_group + i / groups;
    destination[static_cast<size_t>(i)] = static_cast<int32_t>(to);
  }
  return destination;
}

ChannelShuffle::ChannelShuffle(int64_t channels, int64_t groups, bool paired, bool inverse,
                               std::shared_ptr<Backend> backend)
    : channels_(channels), groups_(groups), paired_(paired), inverse_(inverse), backend_(std::move(backend)) {
  auto forward = channel_shuffle_permutation(channels, groups, paired);
  std::vector<int32_t> backward(forward.size());
  for (size_t i = 0; i < forward.size(); ++i) backward[static_cast<size_t>(forward[i])] = static_cast<int32_t>(i);
  destination_ = inverse ? backward : forward;
  source_ = inverse ? forward : backward;
}

bool ChannelShuffle::is_identity() const {
  for (size_t i = 0; i < destination_.size(); ++i)
    if (destination_[i] != static_cast<int32_t>(i)) return false;
  return true;
}

std::string ChannelShuffle::describe() const {
  std::ostringstream out;
  out << "channel-shuffle " << channels_ << " ch, groups " << groups_ << (paired_ ? " paired" : "")
      << (inverse_ ? " inverse" : "");
  return out.str();
}

Shape ChannelShuffle::output_shape(const Shape& input) const {
  require<ShapeError>(input.rank() == 4 && input[1] == channels_, "ChannelShuffle expects NCHW with ", channels_,
                      " channels, got shape ", input.str());
  return input;
}

void ChannelShuffle::forward(const Tensor& input, Tensor& output) {
  output.resize(output_shape(input.shape()), backend_->device());
  backend_->permute_channels(input.data(), output.data(), destination_.data(), input.dim(0), channels_,
                             input.dim(2) * input.dim(3));
}

void ChannelShuffle::backward(const Tensor& diff_output, Tensor& diff_input) {
  diff_input.resize(output_shape(diff_output.shape()), backend_->device());
  backend_->permute_channels(diff_output.data(), diff_input.data(), source_.data(), diff_output.dim(0), channels_,
                             diff_output.dim(2) * diff_output.dim(3));
}

}  // namespace orthoconv
