// Bad settings throw orthoconv::Error (never exit) with one message that names the setting and its value.
#include <catch2/catch.hpp>

#include <functional>

#include "reference.hpp"

using namespace orthoconv;
using Catch::Matchers::Contains;

namespace {

SocConfig valid() {
  SocConfig c;
  c.in_channels = c.out_channels = 8;
  c.kernel = 3;
  return c;
}

// Runs `body`, requires an orthoconv::Error whose message contains every one of `parts`, on one line.
void require_error(const std::function<void()>& body, const std::vector<std::string>& parts) {
  std::string message;
  try {
    body();
  } catch (const Error& e) {
    message = e.what();
  } catch (const std::exception& e) {
    FAIL("threw a non-orthoconv exception: " << e.what());
  }
  INFO("message: '" << message << "'");
  REQUIRE_FALSE(message.empty());  // it threw orthoconv::Error
  CHECK(message.find('\n') == std::string::npos);
  for (const std::string& part : parts) CHECK_THAT(message, Contains(part));
}

}  // namespace

TEST_CASE("SocConv rejects impossible settings with an orthoconv::Error naming the setting and the value",
          "[errors][soc]") {
  REQUIRE_NOTHROW(SocConv(valid()));
  SECTION("groups not dividing the channels") {
    SocConfig c = valid();
    c.groups = 3;
    require_error([&] { SocConv layer(c); }, {"groups", "3", "8"});
    CHECK_THROWS_AS(SocConv(c), ConfigError);
  }
  SECTION("even kernel") {
    SocConfig c = valid();
    c.kernel = 4;
    require_error([&] { SocConv layer(c); }, {"kernel", "4"});
  }
  SECTION("stride 3") {
    SocConfig c = valid();
    c.stride = 3;
    require_error([&] { SocConv layer(c); }, {"stride", "3"});
  }
  SECTION("zero input channels") {
    SocConfig c = valid();
    c.in_channels = 0;
    require_error([&] { SocConv layer(c); }, {"in_channels", "0"});
  }
  SECTION("zero output channels") {
    SocConfig c = valid();
    c.out_channels = 0;
    require_error([&] { SocConv layer(c); }, {"out_channels", "0"});
  }
  SECTION("zero training terms") {
    SocConfig c = valid();
    c.train_terms = 0;
    require_error([&] { SocConv layer(c); }, {"train_terms", "0"});
  }
  SECTION("zero evaluation terms") {
    SocConfig c = valid();
    c.eval_terms = 0;
    require_error([&] { SocConv layer(c); }, {"eval_terms", "0"});
  }
  SECTION("zero terms through set_terms") {
    SocConv layer(valid());
    require_error([&] { layer.set_terms(0, 12); }, {"terms", "0"});
  }
  SECTION("negative groups") {
    SocConfig c = valid();
    c.groups = -2;
    require_error([&] { SocConv layer(c); }, {"groups", "-2"});
  }
}

TEST_CASE("SocConv rejects inputs of the wrong shape with an orthoconv::Error naming the shape", "[errors][soc]") {
  SocConv layer(valid());
  Tensor y;
  SECTION("wrong channel count") {
    Tensor x(Shape{1, 4, 6, 6});
    require_error([&] { layer.forward(x, y); }, {"8", "channels", "[1, 4, 6, 6]"});
    CHECK_THROWS_AS(layer.forward(x, y), ShapeError);
  }
  SECTION("wrong rank") {
    Tensor x(Shape{8, 6, 6});
    require_error([&] { layer.forward(x, y); }, {"NCHW", "[8, 6, 6]"});
  }
  SECTION("height not divisible by the stride") {
    SocConfig c = valid();
    c.in_channels = 4;
    c.stride = 2;
    SocConv strided(c);
    Tensor x(Shape{1, 4, 5, 6});
    require_error([&] { strided.forward(x, y); }, {"stride", "2", "[1, 4, 5, 6]"});
  }
  SECTION("backward with a gradient of the wrong shape") {
    Tensor x(Shape{1, 8, 4, 4}), dx;
    layer.forward(x, y);
    Tensor dy(Shape{1, 8, 4, 5});
    require_error([&] { layer.backward(dy, dx); }, {"[1, 8, 4, 5]", "[1, 8, 4, 4]"});
  }
}

TEST_CASE("GsSocConv, ChannelShuffle and MaxMin reject impossible settings with an orthoconv::Error",
          "[errors][gs-soc][shuffle][maxmin]") {
  GsSocConfig gs;
  gs.base = valid();
  gs.groups.first = 4;
  SECTION("GS-SOC b not dividing the output channels") {
    gs.groups.second = 3;
    require_error([&] { GsSocConv layer(gs); }, {"b", "3", "out_channels", "8"});
  }
  SECTION("GS-SOC a not dividing the series channels") {
    gs.groups.first = 5;
    require_error([&] { GsSocConv layer(gs); }, {"groups", "5"});
  }
  SECTION("GS-SOC zero b") {
    gs.groups.second = 0;
    require_error([&] { GsSocConv layer(gs); }, {"b", "0"});
  }
  SECTION("GS-SOC paired needs 2b to divide the output channels") {
    gs.base.in_channels = gs.base.out_channels = 6;
    gs.groups = GroupCounts{2, 2};
    gs.paired = true;
    require_error([&] { GsSocConv layer(gs); }, {"2*b", "4", "6"});
  }
  SECTION("GS-SOC even kernel") {
    gs.base.kernel = 2;
    require_error([&] { GsSocConv layer(gs); }, {"kernel", "2"});
  }
  SECTION("ChannelShuffle groups not dividing the channels") {
    require_error([&] { ChannelShuffle layer(8, 3); }, {"groups", "3", "8"});
  }
  SECTION("ChannelShuffle zero channels") {
    require_error([&] { ChannelShuffle layer(0, 1); }, {"channels", "0"});
  }
  SECTION("ChannelShuffle input with the wrong channel count") {
    ChannelShuffle layer(8, 2);
    Tensor x(Shape{1, 6, 2, 2}), y;
    require_error([&] { layer.forward(x, y); }, {"8", "[1, 6, 2, 2]"});
  }
  SECTION("MaxMin odd channel count") {
    MaxMin layer;
    Tensor x(Shape{1, 5, 2, 2}), y;
    require_error([&] { layer.forward(x, y); }, {"channel", "[1, 5, 2, 2]"});
  }
}
