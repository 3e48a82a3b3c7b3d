// orthoconv/channel_shuffle.hpp: the ChShuffle channel permutations used between grouped layers.
//
// ChannelShuffle(g) on n channels (g divides n): channel i goes to position (i mod g) * (n/g) + floor(i/g).
// Paired variant (channel pairs move together; 2g divides n): i goes to
//   (floor(i/2) mod g) * (n/g) + 2 * floor(i / (2g)) + (i mod 2).
// A permutation is orthogonal: 1-Lipschitz with an exact inverse (inverse = true applies it backwards).
#pragma once

#include <vector>

#include "orthoconv/layer.hpp"

namespace orthoconv {

// destination[i] for each source channel i.
std::vector<int32_t> channel_shuffle_permutation(int64_t channels, int64_t groups, bool paired);

class ChannelShuffle : public Layer {
 public:
  ChannelShuffle(int64_t channels, int64_t groups, bool paired = false, bool inverse = false,
                 std::shared_ptr<Backend> backend = cpu_backend());
  std::string kind() const override { return "channel-shuffle"; }
  std::string describe() const override;
  Shape output_shape(const Shape& input) const override;
  void forward(const Tensor& input, Tensor& output) override;
  void backward(const Tensor& diff_output, Tensor& diff_input) override;
  const std::vector<int32_t>& destination() const { return destination_; }
  bool is_identity() const;  // one group: every channel stays where it is

 private:
  int64_t channels_, groups_;
  bool paired_, inverse_;
  std::shared_ptr<Backend> backend_;
  std::vector<int32_t> destination_;  // forward permutation
  std::vector<int32_t> source_;       // its inverse
};

}  // namespace orthoconv
