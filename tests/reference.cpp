// The double-precision reference: plain loops, written from the specification (see reference.hpp).
#include "reference.hpp"

#include <cmath>
#include <string>
#include <stdexcept>

namespace orthoconv::reference {

Vec to_double(const std::vector<float>& values) { return Vec(values.begin(), values.end()); }

Vec to_double(const Tensor& tensor) { return to_double(tensor.to_vector()); }

std::vector<float> to_float(const Vec& values) {
  std::vector<float> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = static_cast<float>(values[i]);
  return out;
}

Tensor to_tensor(const Vec& values, const Shape& shape) { return Tensor::from_vector(to_float(values), shape); }

double dot(const Vec& a, const Vec& b) {
  if (a.size() != b.size()) throw std::invalid_argument("reference::dot: size mismatch");
  double sum = 0.0;
  for (size_t i = 0; i < a.size(); ++i) sum += a[i] * b[i];
  return sum;
}

double norm(const Vec& a) { return std::sqrt(dot(a, a)); }

double max_relative_error(const Vec& actual, const Vec& expected) {
  if (actual.size() != expected.size()) throw std::invalid_argument("max_relative_error: size mismatch");
  double worst = 0.0, scale = 0.0;
  for (size_t i = 0; i < actual.size(); ++i) {
    worst = std::max(worst, std::abs(actual[i] - expected[i]));
    scale = std::max(scale, std::abs(expected[i]));
  }
  return scale > 0.0 ? worst / scale : worst;
}

double norm_relative_error(const Vec& actual, const Vec& expected) {
  if (actual.size() != expected.size()) throw std::invalid_argument("norm_relative_error: size mismatch");
  double diff = 0.0;
  for (size_t i = 0; i < actual.size(); ++i) diff += (actual[i] - expected[i]) * (actual[i] - expected[i]);
  const double scale = norm(expected);
  return scale > 0.0 ? std::sqrt(diff) / scale : std::sqrt(diff);
}

double round_to_bf16(double x) {
  if (std::isnan(x) || std::isinf(x) || x == 0.0) return x;
  // Spacing of bfloat16 numbers around |x|: 2^(e - 7) for 2^e <= |x| < 2^(e+1), subnormals below 2^-126.
  int exponent = 0;
  std::frexp(x, &exponent);  // |x| = m 2^exponent, m in [1/2, 1)
  const int e = std::max(exponent - 1, -126);
  const double spacing = std::ldexp(1.0, e - 7);
  const double rounded = std::nearbyint(x / spacing) * spacing;  // the default mode: nearest, ties to even
  if (std::abs(rounded) >= std::ldexp(1.0, 128)) return std::copysign(HUGE_VAL, x);  // overflow: infinity
  return rounded;
}

Vec round_to_bf16(const Vec& values) {
  Vec out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = round_to_bf16(values[i]);
  return out;
}

bool runs_precision(Backend& backend, ConvPrecision precision) {
  try {
    backend.check_precision(precision);
    return true;
  } catch (const ConfigError&) {
    return false;
  }
}

bool cpu_has_bf16() { return runs_precision(*cpu_backend(), ConvPrecision::bf16); }

AlwaysBf16::AlwaysBf16() { cpu_backend()->set_precision_choice(Backend::PrecisionChoice::always); }
AlwaysBf16::~AlwaysBf16() { cpu_backend()->set_precision_choice(Backend::PrecisionChoice::measured); }

Vec random_normal(size_t count, uint64_t seed, double stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  Vec out(count);
  for (double& x : out) x = normal(rng);
  return out;
}

Vec random_uniform(size_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  Vec out(count);
  for (double& x : out) x = uniform(rng);
  return out;
}

// ---- grouped convolution ----

namespace {

void check_sizes(const ConvDims& d, size_t a, int64_t expected_a, const char* what) {
  if (static_cast<int64_t>(a) != expected_a) throw std::invalid_argument(std::string("reference conv: bad ") + what);
  if (d.in_channels % d.groups || d.out_channels % d.groups || d.kernel % 2 == 0)
    throw std::invalid_argument("reference conv: bad dims");
}

// Calls body(input index, output index, weight index) for every multiply-add of the convolution.
template <typename Body>
void for_each_tap(const ConvDims& d, Body&& body) {
  const int64_t ci = d.in_channels / d.groups, co = d.out_channels / d.groups, k = d.kernel, pad = k / 2;
  for (int64_t n = 0; n < d.batch; ++n)
    for (int64_t g = 0; g < d.groups; ++g)
      for (int64_t o = 0; o < co; ++o)
        for (int64_t i = 0; i < ci; ++i)
          for (int64_t ky = 0; ky < k; ++ky)
            for (int64_t kx = 0; kx < k; ++kx) {
              const int64_t w = (((g * co + o) * ci + i) * k + ky) * k + kx;
              for (int64_t y = 0; y < d.height; ++y) {
                const int64_t sy = y + ky - pad;
                if (sy < 0 || sy >= d.height) continue;
                for (int64_t x = 0; x < d.width; ++x) {
                  const int64_t sx = x + kx - pad;
                  if (sx < 0 || sx >= d.width) continue;
                  const int64_t in = ((n * d.in_channels + g * ci + i) * d.height + sy) * d.width + sx;
                  const int64_t out = ((n * d.out_channels + g * co + o) * d.height + y) * d.width + x;
                  body(in, out, w);
                }
              }
            }
}

}  // namespace

Vec conv_forward(const ConvDims& d, const Vec& input, const Vec& weights) {
  check_sizes(d, input.size(), d.input_size(), "input size");
  check_sizes(d, weights.size(), d.weight_size(), "weight size");
  Vec out(static_cast<size_t>(d.output_size()), 0.0);
  for_each_tap(d, [&](int64_t in, int64_t o, int64_t w) { out[o] += weights[w] * input[in]; });
  return out;
}

Vec conv_backward_data(const ConvDims& d, const Vec& diff_output, const Vec& weights) {
  check_sizes(d, diff_output.size(), d.output_size(), "diff_output size");
  check_sizes(d, weights.size(), d.weight_size(), "weight size");
  Vec out(static_cast<size_t>(d.input_size()), 0.0);
  for_each_tap(d, [&](int64_t in, int64_t o, int64_t w) { out[in] += weights[w] * diff_output[o]; });
  return out;
}

Vec conv_backward_weights(const ConvDims& d, const Vec& input, const Vec& diff_output) {
  check_sizes(d, input.size(), d.input_size(), "input size");
  check_sizes(d, diff_output.size(), d.output_size(), "diff_output size");
  Vec out(static_cast<size_t>(d.weight_size()), 0.0);
  for_each_tap(d, [&](int64_t in, int64_t o, int64_t w) { out[w] += input[in] * diff_output[o]; });
  return out;
}

// ---- SOC pieces ----

void matmul(const MatmulDims& d, double alpha, const Vec& a, const Vec& b, double beta, double shift, Vec& c) {
  const bool summed = d.batch > 1 && d.stride_c == 0;  // one C: the sum over the batch
  const int64_t outputs = summed ? 1 : d.batch, terms = summed ? d.batch : 1;
  for (int64_t m = 0; m < outputs; ++m)
    for (int64_t r = 0; r < d.rows; ++r)
      for (int64_t q = 0; q < d.cols; ++q) {
        double sum = 0.0;
        for (int64_t n = m; n < m + terms; ++n) {
          if (b.empty()) {
            sum += d.transpose_a ? a.at(n * d.stride_a + q * d.rows + r) : a.at(n * d.stride_a + r * d.inner + q);
          } else {
            for (int64_t i = 0; i < d.inner; ++i) {
              const double x =
                  d.transpose_a ? a.at(n * d.stride_a + i * d.rows + r) : a.at(n * d.stride_a + r * d.inner + i);
              const double y =
                  d.transpose_b ? b.at(n * d.stride_b + q * d.inner + i) : b.at(n * d.stride_b + i * d.cols + q);
              sum += x * y;
            }
          }
        }
        double& out = c.at(m * d.stride_c + r * d.cols + q);
        out = alpha * sum + (beta == 0.0 ? 0.0 : beta * out) + (r == q ? shift : 0.0);
      }
}

Vec skew(const Vec& m, int64_t groups, int64_t c, int64_t k) {
  Vec a(m.size());
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t o = 0; o < c; ++o)
      for (int64_t i = 0; i < c; ++i)
        for (int64_t y = 0; y < k; ++y)
          for (int64_t x = 0; x < k; ++x) {
            const int64_t direct = (((g * c + o) * c + i) * k + y) * k + x;
            const int64_t transposed = (((g * c + i) * c + o) * k + (k - 1 - y)) * k + (k - 1 - x);
            a[direct] = 0.5 * (m[direct] - m[transposed]);
          }
  return a;
}

Vec pixel_unshuffle(const Vec& input, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t s) {
  const int64_t oh = height / s, ow = width / s;
  Vec out(input.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t y = 0; y < height; ++y)
        for (int64_t x = 0; x < width; ++x) {
          const int64_t p = y % s, q = x % s, i = y / s, j = x / s;
          const int64_t oc = c * s * s + s * p + q;
          out[((b * channels * s * s + oc) * oh + i) * ow + j] = input[((b * channels + c) * height + y) * width + x];
        }
  return out;
}

Vec pixel_shuffle(const Vec& input, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t s) {
  const int64_t ih = height / s, iw = width / s;
  Vec out(input.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t y = 0; y < height; ++y)
        for (int64_t x = 0; x < width; ++x) {
          const int64_t p = y % s, q = x % s, i = y / s, j = x / s;
          const int64_t ic = c * s * s + s * p + q;
          out[((b * channels + c) * height + y) * width + x] = input[((b * channels * s * s + ic) * ih + i) * iw + j];
        }
  return out;
}

namespace {

// The reference code's u_i / v_i index of filter entry (o, i, y, x) of one group: u1 [in, w] v1 [out, h],
// u2 [in, h] v2 [out, w], u3 [in, h, w] v3 [out], u4 [out, h, w] v4 [in] (its 5-D shapes without the unit axes).
int64_t u_index(int which, int64_t o, int64_t i, int64_t y, int64_t x, int64_t k) {
  switch (which) {
    case 0:
      return i * k + x;
    case 1:
      return i * k + y;
    case 2:
      return (i * k + y) * k + x;
    default:
      return (o * k + y) * k + x;
  }
}
int64_t v_index(int which, int64_t o, int64_t i, int64_t y, int64_t x, int64_t k) {
  switch (which) {
    case 0:
      return o * k + y;
    case 1:
      return o * k + x;
    case 2:
      return o;
    default:
      return i;
  }
}
std::array<int64_t, 4> u_lengths(int64_t c, int64_t k) { return {c * k, c * k, c * k * k, c * k * k}; }
std::array<int64_t, 4> v_lengths(int64_t c, int64_t k) { return {c * k, c * k, c, c}; }

void check_vector_sizes(const char* what, const std::array<Vec, 4>& u, const std::array<Vec, 4>& v, int64_t groups,
                        int64_t c, int64_t k) {
  for (int w = 0; w < 4; ++w)
    if (static_cast<int64_t>(u[w].size()) != groups * u_lengths(c, k)[w] ||
        static_cast<int64_t>(v[w].size()) != groups * v_lengths(c, k)[w])
      throw std::invalid_argument(std::string(what) + ": u" + std::to_string(w + 1) + "/v" + std::to_string(w + 1) +
                                  " have the wrong size");
}

// l2_normalize: x / max(||x||, 1e-12).
void l2_normalize(double* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  const double norm = std::max(std::sqrt(s), 1e-12);
  for (int64_t i = 0; i < n; ++i) x[i] /= norm;
}

}  // namespace

Vec power_sigma(const Vec& a, const std::array<Vec, 4>& u, const std::array<Vec, 4>& v, int64_t groups, int64_t c,
                int64_t k) {
  check_vector_sizes("power_sigma", u, v, groups, c, k);
  const auto ul = u_lengths(c, k), vl = v_lengths(c, k);
  Vec sigma(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) {
    double best = 0.0;
    for (int w = 0; w < 4; ++w) {
      double s = 0.0;
      for (int64_t o = 0; o < c; ++o)
        for (int64_t i = 0; i < c; ++i)
          for (int64_t y = 0; y < k; ++y)
            for (int64_t x = 0; x < k; ++x)
              s += a[(((g * c + o) * c + i) * k + y) * k + x] * u[w][g * ul[w] + u_index(w, o, i, y, x, k)] *
                   v[w][g * vl[w] + v_index(w, o, i, y, x, k)];
      best = w == 0 ? s : std::min(best, s);
    }
    sigma[g] = best;
  }
  return sigma;
}

Vec power_reshape(const Vec& a, int64_t g, int64_t c, int64_t k, int which) {
  const int64_t rows = v_lengths(c, k)[which], cols = u_lengths(c, k)[which];
  Vec matrix(static_cast<size_t>(rows * cols), 0.0);
  for (int64_t o = 0; o < c; ++o)
    for (int64_t i = 0; i < c; ++i)
      for (int64_t y = 0; y < k; ++y)
        for (int64_t x = 0; x < k; ++x)
          matrix[v_index(which, o, i, y, x, k) * cols + u_index(which, o, i, y, x, k)] +=
              a[(((g * c + o) * c + i) * k + y) * k + x];
  return matrix;
}

void add_sigma_gradient(const std::array<Vec, 4>& u, const std::array<Vec, 4>& v, const std::vector<int32_t>& which,
                        const Vec& coefficient, Vec& diff, int64_t groups, int64_t c, int64_t k) {
  check_vector_sizes("add_sigma_gradient", u, v, groups, c, k);
  const auto ul = u_lengths(c, k), vl = v_lengths(c, k);
  for (int64_t g = 0; g < groups; ++g) {
    const int w = which[static_cast<size_t>(g)];
    for (int64_t o = 0; o < c; ++o)
      for (int64_t i = 0; i < c; ++i)
        for (int64_t y = 0; y < k; ++y)
          for (int64_t x = 0; x < k; ++x)
            diff[(((g * c + o) * c + i) * k + y) * k + x] += coefficient[static_cast<size_t>(g)] *
                                                             u[w][g * ul[w] + u_index(w, o, i, y, x, k)] *
                                                             v[w][g * vl[w] + v_index(w, o, i, y, x, k)];
  }
}

void power_iterate(const Vec& a, std::array<Vec, 4>& u, std::array<Vec, 4>& v, int64_t groups, int64_t c, int64_t k,
                   int iterations) {
  check_vector_sizes("power_iterate", u, v, groups, c, k);
  const auto ul = u_lengths(c, k), vl = v_lengths(c, k);
  for (int it = 0; it < iterations; ++it)
    for (int w = 0; w < 4; ++w)
      for (int64_t g = 0; g < groups; ++g) {
        double* uw = u[w].data() + g * ul[w];
        double* vw = v[w].data() + g * vl[w];
        auto entry = [&](int64_t o, int64_t i, int64_t y, int64_t x) {
          return a[(((g * c + o) * c + i) * k + y) * k + x];
        };
        // v = l2_normalize((A * u).sum(axes not in v)), then u = l2_normalize((A * v).sum(axes not in u)).
        std::fill(vw, vw + vl[w], 0.0);
        for (int64_t o = 0; o < c; ++o)
          for (int64_t i = 0; i < c; ++i)
            for (int64_t y = 0; y < k; ++y)
              for (int64_t x = 0; x < k; ++x)
                vw[v_index(w, o, i, y, x, k)] += entry(o, i, y, x) * uw[u_index(w, o, i, y, x, k)];
        l2_normalize(vw, vl[w]);
        std::fill(uw, uw + ul[w], 0.0);
        for (int64_t o = 0; o < c; ++o)
          for (int64_t i = 0; i < c; ++i)
            for (int64_t y = 0; y < k; ++y)
              for (int64_t x = 0; x < k; ++x)
                uw[u_index(w, o, i, y, x, k)] += entry(o, i, y, x) * vw[v_index(w, o, i, y, x, k)];
        l2_normalize(uw, ul[w]);
      }
}

SocParams soc_params(SocConv& layer) {
  const SocConfig& c = layer.config();
  SocParams p;
  p.in_channels = c.in_channels;
  p.out_channels = c.out_channels;
  p.kernel = c.kernel;
  p.stride = c.stride;
  p.groups = c.groups;
  p.keep_per_group = c.keep == KeepChannels::per_group;
  p.terms = layer.terms();
  p.correction = c.effective_correction();
  p.weight = to_double(layer.weight().value);
  if (c.bias) p.bias = to_double(layer.bias().value);
  for (const Buffer& b : layer.buffers()) {
    const int index = b.name.size() == 2 ? b.name[1] - '1' : -1;
    if ((b.name[0] != 'u' && b.name[0] != 'v') || index < 0 || index > 3)
      throw std::invalid_argument("soc_params: unexpected buffer '" + b.name + "'");
    (b.name[0] == 'u' ? p.u : p.v)[index] = to_double(*b.tensor);
  }
  return p;
}

Vec soc_sigma(const SocParams& p) {
  if (!p.sigma.empty()) return p.sigma;
  return power_sigma(skew(p.weight, p.groups, p.group_channels(), p.kernel), p.u, p.v, p.groups, p.group_channels(),
                     p.kernel);
}

Vec soc_forward(const SocParams& p, const Vec& input, int64_t batch, int64_t height, int64_t width) {
  const int64_t s = p.stride, g = p.groups, c = p.group_channels(), k = p.kernel;
  const int64_t channels = g * c, unshuffled = p.in_channels * s * s;
  const int64_t h = height / s, w = width / s, plane = h * w;
  if (static_cast<int64_t>(input.size()) != batch * p.in_channels * height * width)
    throw std::invalid_argument("soc_forward: input size");

  // Scaled filter A_n = correction * A / (sigma + 1e-12), per group (unless given).
  Vec a = p.scaled;
  if (a.empty()) {
    a = skew(p.weight, g, c, k);
    const Vec sigma = soc_sigma(p);
    for (int64_t gi = 0; gi < g; ++gi) {
      const double scale = p.correction / (sigma[gi] + 1e-12);
      for (int64_t j = 0; j < c * c * k * k; ++j) a[gi * c * c * k * k + j] *= scale;
    }
  }

  // x0: unshuffle, zero channels up to C*g.
  const Vec unshuffled_input = s > 1 ? pixel_unshuffle(input, batch, p.in_channels, height, width, s) : input;
  Vec x(static_cast<size_t>(batch * channels * plane), 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t ch = 0; ch < unshuffled; ++ch)
      for (int64_t i = 0; i < plane; ++i)
        x[(b * channels + ch) * plane + i] = unshuffled_input[(b * unshuffled + ch) * plane + i];

  // y = sum_{i=0..K} A_n^i x / i!
  ConvDims d{batch, channels, channels, h, w, k, g};
  Vec term = x, y = x;
  for (int i = 1; i <= p.terms; ++i) {
    term = conv_forward(d, term, a);
    for (double& t : term) t /= i;
    for (size_t j = 0; j < y.size(); ++j) y[j] += term[j];
  }

  // Keep c_out channels (the first, or the first c_out/g of each group), add the bias.
  Vec out(static_cast<size_t>(batch * p.out_channels * plane));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t o = 0; o < p.out_channels; ++o) {
      const int64_t per_group = p.out_channels / g;
      const int64_t from = p.keep_per_group ? (o / per_group) * c + o % per_group : o;
      for (int64_t i = 0; i < plane; ++i)
        out[(b * p.out_channels + o) * plane + i] =
            y[(b * channels + from) * plane + i] + (p.bias.empty() ? 0.0 : p.bias[o]);
    }
  return out;
}

// ---- permutations and activations ----

std::vector<int64_t> shuffle_destination(int64_t n, int64_t g, bool paired) {
  std::vector<int64_t> dest(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    dest[i] = paired ? ((i / 2) % g) * (n / g) + 2 * (i / (2 * g)) + (i % 2) : (i % g) * (n / g) + i / g;
  return dest;
}

Vec permute_channels(const Vec& input, const std::vector<int64_t>& dest, int64_t batch, int64_t channels, int64_t plane,
                     bool inverse) {
  Vec out(input.size());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < plane; ++i) {
        const int64_t from = inverse ? dest[c] : c, to = inverse ? c : dest[c];
        out[(b * channels + to) * plane + i] = input[(b * channels + from) * plane + i];
      }
  return out;
}

Vec maxmin(const Vec& input, int64_t batch, int64_t channels, int64_t plane, bool paired) {
  Vec out(input.size());
  const int64_t half = channels / 2;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < half; ++c) {
      const int64_t ca = paired ? 2 * c : c, cb = paired ? 2 * c + 1 : c + half;
      for (int64_t i = 0; i < plane; ++i) {
        const double x = input[(b * channels + ca) * plane + i], y = input[(b * channels + cb) * plane + i];
        out[(b * channels + ca) * plane + i] = std::min(x, y);
        out[(b * channels + cb) * plane + i] = std::max(x, y);
      }
    }
  return out;
}

Vec maxmin_backward(const Vec& input, const Vec& diff_output, int64_t batch, int64_t channels, int64_t plane,
                    bool paired) {
  Vec out(input.size());
  const int64_t half = channels / 2;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < half; ++c) {
      const int64_t ca = paired ? 2 * c : c, cb = paired ? 2 * c + 1 : c + half;
      for (int64_t i = 0; i < plane; ++i) {
        const int64_t ia = (b * channels + ca) * plane + i, ib = (b * channels + cb) * plane + i;
        const bool a_is_min = input[ia] <= input[ib];
        out[ia] = a_is_min ? diff_output[ia] : diff_output[ib];
        out[ib] = a_is_min ? diff_output[ib] : diff_output[ia];
      }
    }
  return out;
}

void copy_channels(const Vec& src, int64_t src_channels, Vec& dst, int64_t dst_channels, int64_t batch, int64_t plane,
                   bool accumulate) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < dst_channels; ++c)
      for (int64_t i = 0; i < plane; ++i) {
        double& out = dst[(b * dst_channels + c) * plane + i];
        const double value = c < src_channels ? src[(b * src_channels + c) * plane + i] : 0.0;
        out = accumulate ? out + value : value;
      }
}

void add_bias(Vec& dst, const Vec& bias, int64_t batch, int64_t channels, int64_t plane) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < plane; ++i) dst[(b * channels + c) * plane + i] += bias[c];
}

void bias_backward(const Vec& diff_dst, Vec& diff_bias, int64_t batch, int64_t channels, int64_t plane) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < plane; ++i) diff_bias[c] += diff_dst[(b * channels + c) * plane + i];
}

double softmax_cross_entropy(const Vec& logits, const std::vector<int32_t>& labels, int64_t batch, int64_t classes,
                             Vec& diff, int64_t* correct) {
  diff.assign(logits.size(), 0.0);
  double loss = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    const double* z = logits.data() + b * classes;
    int64_t first_max = 0;
    for (int64_t j = 1; j < classes; ++j)
      if (z[j] > z[first_max]) first_max = j;
    double sum = 0.0;
    for (int64_t j = 0; j < classes; ++j) sum += std::exp(z[j] - z[first_max]);
    const double log_sum_exp = z[first_max] + std::log(sum);
    const int32_t label = labels[static_cast<size_t>(b)];
    loss += log_sum_exp - z[label];
    for (int64_t j = 0; j < classes; ++j)
      diff[b * classes + j] = (std::exp(z[j] - log_sum_exp) - (j == label ? 1.0 : 0.0)) / static_cast<double>(batch);
    if (first_max == label) ++*correct;
  }
  return loss;
}

void sgd_momentum(Vec& param, const Vec& grad, Vec& momentum, double lr, double momentum_coef, double weight_decay,
                  bool first_step) {
  for (size_t i = 0; i < param.size(); ++i) {
    const double d = grad[i] + weight_decay * param[i];
    momentum[i] = first_step ? d : momentum_coef * momentum[i] + d;
    param[i] -= lr * momentum[i];
  }
}

GsSocParams gs_soc_params(GsSocConv& layer) {
  GsSocParams p;
  const GsSocConfig& c = layer.config();
  p.groups = c.groups;
  p.paired = c.paired;
  const int64_t a = c.groups.first, c_in = c.base.in_channels;
  p.shuffle_input = c_in % a == 0 && (!c.paired || c_in % (2 * a) == 0);
  p.first = soc_params(layer.first());
  if (layer.second()) p.second = soc_params(*layer.second());
  return p;
}

Vec gs_soc_forward(const GsSocParams& p, const Vec& input, int64_t batch, int64_t height, int64_t width) {
  const int64_t c_in = p.first.in_channels;
  Vec x = p.shuffle_input ? permute_channels(input, shuffle_destination(c_in, p.groups.first, p.paired), batch, c_in,
                                             height * width)
                          : input;
  Vec y = soc_forward(p.first, x, batch, height, width);
  if (!p.groups.second) return y;
  const int64_t h = height / p.first.stride, w = width / p.first.stride, c_out = p.first.out_channels;
  y = permute_channels(y, shuffle_destination(c_out, *p.groups.second, p.paired), batch, c_out, h * w);
  return soc_forward(p.second, y, batch, h, w);
}

}  // namespace orthoconv::reference
