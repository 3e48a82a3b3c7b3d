// A minimal raster line chart: filled rectangles, thick anti-alias-free lines, stb_easy_font text (its quads are
// axis-aligned rectangles, so text is drawn as rectangles too, optionally rotated for the y label).
#include "orthoconv/plot.hpp"

#include <stb/stb_easy_font.h>
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/error.hpp"

namespace orthoconv {

namespace {

using Color = std::array<unsigned char, 3>;

struct Canvas {
  int width, height;
  std::vector<unsigned char> pixels;
  Canvas(int w, int h) : width(w), height(h), pixels(static_cast<size_t>(w) * static_cast<size_t>(h) * 3, 255) {}

  void put(int x, int y, Color c) {
    if (x < 0 || y < 0 || x >= width || y >= height) return;
    auto* p = &pixels[(static_cast<size_t>(y) * static_cast<size_t>(width) + static_cast<size_t>(x)) * 3];
    p[0] = c[0];
    p[1] = c[1];
    p[2] = c[2];
  }
  void rect(int x0, int y0, int x1, int y1, Color c) {
    for (int y = std::min(y0, y1); y <= std::max(y0, y1); ++y)
      for (int x = std::min(x0, x1); x <= std::max(x0, x1); ++x) put(x, y, c);
  }
  void line(double x0, double y0, double x1, double y1, Color c, int thickness, bool dashed) {
    double length = std::hypot(x1 - x0, y1 - y0);
    int steps = std::max(1, static_cast<int>(length * 2));
    int half = thickness / 2;
    for (int i = 0; i <= steps; ++i) {
      double t = static_cast<double>(i) / steps;
      if (dashed && std::fmod(t * length, 16.0) > 9.0) continue;
      int x = static_cast<int>(std::lround(x0 + t * (x1 - x0)));
      int y = static_cast<int>(std::lround(y0 + t * (y1 - y0)));
      rect(x - half, y - half, x - half + thickness - 1, y - half + thickness - 1, c);
    }
  }
  // Text at (x, y) (top-left), scaled; rotated = reads bottom to top with its top-left at (x, y).
  void text(const std::string& s, int x, int y, int scale, Color c, bool rotated = false) {
    static char buffer[99999];
    int quads = stb_easy_font_print(0, 0, const_cast<char*>(s.c_str()), nullptr, buffer, sizeof(buffer));
    const float* v = reinterpret_cast<const float*>(buffer);
    for (int q = 0; q < quads; ++q) {
      const float* quad = v + q * 16;  // 4 vertices of (x, y, z, color) = 4 floats each
      float qx0 = quad[0], qy0 = quad[1], qx1 = quad[8], qy1 = quad[9];
      int ax0 = static_cast<int>(qx0 * scale), ay0 = static_cast<int>(qy0 * scale);
      int ax1 = static_cast<int>(qx1 * scale) - 1, ay1 = static_cast<int>(qy1 * scale) - 1;
      if (!rotated)
        rect(x + ax0, y + ay0, x + ax1, y + ay1, c);
      else
        rect(x + ay0, y - ax0, x + ay1, y - ax1, c);
    }
  }
  static int text_width(const std::string& s, int scale) {
    return stb_easy_font_width(const_cast<char*>(s.c_str())) * scale;
  }
};

std::string format_tick(double value) {
  char buffer[32];
  if (std::abs(value - std::round(value)) < 1e-9)
    std::snprintf(buffer, sizeof buffer, "%.0f", value);
  else
    std::snprintf(buffer, sizeof buffer, "%.2g", value);
  return buffer;
}

}  // namespace

void write_line_plot(const std::string& path, const PlotSpec& spec) {
  require(spec.width >= 200 && spec.height >= 150, "plot size ", spec.width, "x", spec.height, " is too small");
  require(spec.x_max > spec.x_min && spec.y_max > spec.y_min, "plot axis ranges must be increasing");
  require(spec.x_tick > 0 && spec.y_tick > 0, "plot ticks must be positive");
  Canvas canvas(spec.width, spec.height);
  const Color black{0, 0, 0}, grid{225, 225, 225}, dark{60, 60, 60};
  const int left = 90, right = spec.width - 30, top = 60, bottom = spec.height - 80;
  auto px = [&](double x) { return left + (x - spec.x_min) / (spec.x_max - spec.x_min) * (right - left); };
  auto py = [&](double y) { return bottom - (y - spec.y_min) / (spec.y_max - spec.y_min) * (bottom - top); };

  for (double x = spec.x_min; x <= spec.x_max + 1e-9; x += spec.x_tick) {
    int xi = static_cast<int>(std::lround(px(x)));
    canvas.rect(xi, top, xi, bottom, grid);
    canvas.rect(xi, bottom, xi, bottom + 6, black);
    std::string label = format_tick(x);
    canvas.text(label, xi - Canvas::text_width(label, 2) / 2, bottom + 12, 2, dark);
  }
  for (double y = spec.y_min; y <= spec.y_max + 1e-9; y += spec.y_tick) {
    int yi = static_cast<int>(std::lround(py(y)));
    canvas.rect(left, yi, right, yi, grid);
    canvas.rect(left - 6, yi, left, yi, black);
    std::string label = format_tick(y);
    canvas.text(label, left - 12 - Canvas::text_width(label, 2), yi - 6, 2, dark);
  }
  canvas.rect(left, top, left + 1, bottom, black);
  canvas.rect(left, bottom - 1, right, bottom, black);

  for (const auto& curve : spec.curves) {
    require(curve.x.size() == curve.y.size(), "plot curve '", curve.label, "' has ", curve.x.size(), " x and ",
            curve.y.size(), " y values");
    for (size_t i = 1; i < curve.x.size(); ++i)
      canvas.line(px(curve.x[i - 1]), py(curve.y[i - 1]), px(curve.x[i]), py(curve.y[i]), curve.color, 3, curve.dashed);
  }

  canvas.text(spec.title, (spec.width - Canvas::text_width(spec.title, 3)) / 2, 16, 3, black);
  canvas.text(spec.x_label, (left + right - Canvas::text_width(spec.x_label, 2)) / 2, spec.height - 36, 2, black);
  canvas.text(spec.y_label, 22, (top + bottom + Canvas::text_width(spec.y_label, 2)) / 2, 2, black, true);

  // Legend, top right.
  int legend_width = 0;
  for (const auto& curve : spec.curves) legend_width = std::max(legend_width, Canvas::text_width(curve.label, 2));
  int lx = right - legend_width - 70, ly = top + 12;
  int lh = static_cast<int>(spec.curves.size()) * 24 + 12;
  canvas.rect(lx - 10, ly - 8, right - 10, ly - 8 + lh, Color{255, 255, 255});
  canvas.rect(lx - 10, ly - 8, right - 10, ly - 8, dark);
  canvas.rect(lx - 10, ly - 8 + lh, right - 10, ly - 8 + lh, dark);
  canvas.rect(lx - 10, ly - 8, lx - 10, ly - 8 + lh, dark);
  canvas.rect(right - 10, ly - 8, right - 10, ly - 8 + lh, dark);
  for (const auto& curve : spec.curves) {
    canvas.line(lx, ly + 7, lx + 40, ly + 7, curve.color, 3, curve.dashed);
    canvas.text(curve.label, lx + 50, ly, 2, black);
    ly += 24;
  }

  // Encoded in memory, then written atomically like every other output (temporary file, fsync, rename).
  std::string png;
  auto append = [](void* context, void* data, int size) {
    static_cast<std::string*>(context)->append(static_cast<const char*>(data), static_cast<size_t>(size));
  };
  if (!stbi_write_png_to_func(append, &png, spec.width, spec.height, 3, canvas.pixels.data(), spec.width * 3))
    throw IoError(detail::concat("cannot encode plot ", path, " as PNG"));
  write_file_atomically(path, png);
}

}  // namespace orthoconv
