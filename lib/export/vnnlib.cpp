// VNN-LIB properties (see include/orthoconv/vnnlib.hpp for the box and why it lies inside the l2 ball).
#include "orthoconv/vnnlib.hpp"

#include <cmath>
#include <cstdio>

#include "orthoconv/error.hpp"

namespace orthoconv {

double vnnlib_box_half_width(int eps_numerator, int64_t side) {
  require(eps_numerator >= 0, "VNN-LIB eps must be a non-negative numerator over 255, got ", eps_numerator);
  require(eps_numerator <= 255 * 64, "VNN-LIB eps (numerator over 255) is too large: ", eps_numerator);
  require(side > 0, "VNN-LIB image side must be positive, got ", side);
  return (static_cast<double>(eps_numerator) / 255.0) / std::sqrt(3.0 * static_cast<double>(side * side));
}

std::string vnnlib_property(const uint8_t* pixels, int64_t side, int32_t label, int64_t classes, int eps_numerator,
                            const std::vector<std::string>& comments) {
  require(classes >= 2, "VNN-LIB property: needs at least 2 classes, got ", classes);
  require(label >= 0 && label < classes, "VNN-LIB property: label ", label, " is not in 0..", classes - 1);
  const int64_t inputs = 3 * side * side;
  require(eps_numerator > 0, "VNN-LIB property: eps must be positive, got ", eps_numerator);
  // 1e-12 is far above the error of x + h here and of printing 17 digits (a few 1e-16 for values up to ~1).
  const double h = vnnlib_box_half_width(eps_numerator, side) - 1e-12;
  std::string out;
  out.reserve(static_cast<size_t>(inputs * 110 + classes * 60 + 2048));
  for (const std::string& line : comments) {
    require(line.find('\n') == std::string::npos, "VNN-LIB comment lines cannot hold a newline");
    out += "; " + line + "\n";
  }
  char text[160];
  out += "\n";
  for (int64_t k = 0; k < inputs; ++k) {
    std::snprintf(text, sizeof text, "(declare-const X_%lld Real)\n", static_cast<long long>(k));
    out += text;
  }
  out += "\n";
  for (int64_t j = 0; j < classes; ++j) {
    std::snprintf(text, sizeof text, "(declare-const Y_%lld Real)\n", static_cast<long long>(j));
    out += text;
  }
  out += "\n; the input box\n";
  for (int64_t k = 0; k < inputs; ++k) {
    const double x = static_cast<double>(pixels[k]) / 255.0;
    std::snprintf(text, sizeof text, "(assert (<= X_%lld %.17g))\n(assert (>= X_%lld %.17g))\n",
                  static_cast<long long>(k), x + h, static_cast<long long>(k), x - h);
    out += text;
  }
  out += "\n; a counterexample: some other class scores at least as high as the label\n(assert (or\n";
  for (int64_t j = 0; j < classes; ++j) {
    if (j == label) continue;
    std::snprintf(text, sizeof text, "  (and (>= Y_%lld Y_%d))\n", static_cast<long long>(j), label);
    out += text;
  }
  out += "))\n";
  return out;
}

}  // namespace orthoconv
