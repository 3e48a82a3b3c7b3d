// orthoconv/plot.hpp: a small line-chart writer (PNG through stb_image_write, text through stb_easy_font).
//
// Enough for the certificate report: a few curves over a common x axis, optional horizontal reference lines,
// axes with ticks and labels, a legend and a title. Written atomically (temporary file, rename).
#pragma once

#include <array>
#include <string>
#include <vector>

namespace orthoconv {

struct PlotCurve {
  std::string label;
  std::vector<double> x, y;
  std::array<unsigned char, 3> color{31, 119, 180};
  bool dashed = false;
};

struct PlotSpec {
  std::string title, x_label, y_label;
  double x_min = 0.0, x_max = 1.0, y_min = 0.0, y_max = 100.0;
  double x_tick = 0.1, y_tick = 10.0;
  std::vector<PlotCurve> curves;  // a curve with two points at the same y is drawn as a horizontal line
  int width = 900, height = 620;
};

void write_line_plot(const std::string& path, const PlotSpec& spec);

}  // namespace orthoconv
