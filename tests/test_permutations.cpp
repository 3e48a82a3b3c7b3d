// ChannelShuffle and its paired variant are exactly the permutations, checked element by element:
//   plain:  channel i -> (i mod g)(n/g) + floor(i/g)
//   paired: channel i -> (floor(i/2) mod g)(n/g) + 2 floor(i/(2g)) + (i mod 2)
// and inverse = true undoes them. MaxMin's forward is exactly [min(A, B), max(A, B)] (plain halves / pairs).
// Permutations and min/max are exact in float32, so every comparison here is ==.
#include <catch2/catch.hpp>

#include "reference.hpp"

using namespace orthoconv;

namespace {

// Every element carries its own (batch, channel, pixel) identity, so a misplaced element is detected.
Tensor labelled(int64_t batch, int64_t channels, int64_t plane_h, int64_t plane_w) {
  Tensor t(Shape{batch, channels, plane_h, plane_w});
  for (int64_t i = 0; i < t.numel(); ++i) t.at(i) = static_cast<float>(i);
  return t;
}

}  // namespace

TEST_CASE("ChannelShuffle moves channel i to (i mod g)(n/g) + floor(i/g), element by element", "[shuffle]") {
  for (int64_t n : {4, 8, 12, 16})
    for (int64_t g : {1, 2, 4}) {
      if (n % g) continue;
      INFO("n " << n << ", g " << g);
      const auto dest = channel_shuffle_permutation(n, g, false);
      for (int64_t i = 0; i < n; ++i) CHECK(dest[static_cast<size_t>(i)] == (i % g) * (n / g) + i / g);

      ChannelShuffle layer(n, g);
      const int64_t batch = 2, h = 2, w = 3, plane = h * w;
      Tensor x = labelled(batch, n, h, w), y;
      layer.forward(x, y);
      REQUIRE(y.shape() == x.shape());
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t p = 0; p < plane; ++p)
            CHECK(y.at((b * n + (i % g) * (n / g) + i / g) * plane + p) == x.at((b * n + i) * plane + p));
    }
  // A concrete case from the definition: n = 8, g = 2 interleaves evens then odds.
  CHECK(channel_shuffle_permutation(8, 2, false) == std::vector<int32_t>{0, 4, 1, 5, 2, 6, 3, 7});
}

TEST_CASE("paired ChannelShuffle moves pair members together: i -> (floor(i/2) mod g)(n/g) + 2 floor(i/2g) + i mod 2",
          "[shuffle]") {
  for (int64_t n : {8, 12, 16})
    for (int64_t g : {1, 2, 3, 4}) {
      if (n % (2 * g)) continue;
      INFO("n " << n << ", g " << g);
      ChannelShuffle layer(n, g, true);
      const int64_t batch = 2, plane = 4;
      Tensor x = labelled(batch, n, 2, 2), y;
      layer.forward(x, y);
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < n; ++i) {
          const int64_t to = ((i / 2) % g) * (n / g) + 2 * (i / (2 * g)) + (i % 2);
          CHECK(layer.destination()[static_cast<size_t>(i)] == to);
          for (int64_t p = 0; p < plane; ++p) CHECK(y.at((b * n + to) * plane + p) == x.at((b * n + i) * plane + p));
        }
    }
  CHECK(channel_shuffle_permutation(8, 2, true) == std::vector<int32_t>{0, 1, 4, 5, 2, 3, 6, 7});
}

TEST_CASE("ChannelShuffle with inverse = true inverts the forward permutation (both variants)", "[shuffle]") {
  for (bool paired : {false, true})
    for (int64_t g : {2, 4}) {
      const int64_t n = 16;
      INFO("g " << g << (paired ? " paired" : ""));
      ChannelShuffle forward(n, g, paired), inverse(n, g, paired, true);
      Tensor x = labelled(3, n, 2, 2), y, back, back_other_order;
      forward.forward(x, y);
      CHECK(y.to_vector() != x.to_vector());  // not the identity, so the round trip below means something
      inverse.forward(y, back);
      CHECK(back.to_vector() == x.to_vector());
      inverse.forward(x, y);
      forward.forward(y, back_other_order);
      CHECK(back_other_order.to_vector() == x.to_vector());
      // The inverse layer is the reference permutation applied backwards.
      inverse.forward(x, y);
      const auto expected = reference::permute_channels(reference::to_double(x),
                                                        reference::shuffle_destination(n, g, paired), 3, n, 4, true);
      CHECK(reference::to_double(y) == expected);
    }
}

TEST_CASE("ChannelShuffle into one group is the identity (GsSocConv skips it), into more groups it is not",
          "[shuffle]") {
  for (bool paired : {false, true}) {
    CHECK(ChannelShuffle(8, 1, paired).is_identity());
    CHECK_FALSE(ChannelShuffle(8, 2, paired).is_identity());
    CHECK_FALSE(ChannelShuffle(12, 3, paired, true).is_identity());
  }
  CHECK(ChannelShuffle(8, 8).is_identity());  // groups of one channel: also the identity
}

TEST_CASE("MaxMin forward: plain halves [min(A,B), max(A,B)] and paired (2i, 2i+1) = (min, max)", "[maxmin]") {
  // One sample, 4 channels, 2 pixels: A = channels 0,1; B = channels 2,3.
  const Shape in{1, 4, 1, 2};
  Tensor x = Tensor::from_vector({5, -1, 2, 7, 3, 0, 4, -2}, in), y;
  MaxMin plain(false);
  plain.forward(x, y);
  // ch0 = min(ch0, ch2) = (3, -1); ch1 = min(ch1, ch3) = (2, -2); ch2 = max(ch0, ch2) = (5, 0); ch3 = (4, 7)
  CHECK(y.to_vector() == std::vector<float>{3, -1, 2, -2, 5, 0, 4, 7});
  MaxMin paired(true);
  paired.forward(x, y);
  // pairs (ch0, ch1) and (ch2, ch3): ch0 = min = (2, -1), ch1 = max = (5, 7), ch2 = (3, -2), ch3 = (4, 0)
  CHECK(y.to_vector() == std::vector<float>{2, -1, 5, 7, 3, -2, 4, 0});
}
