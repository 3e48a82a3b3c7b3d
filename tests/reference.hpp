// tests/reference.hpp: a naive double-precision reference of every layer, for the tests to compare against.
//
// Written straight from the formulas with plain loops, sharing no code with lib/: if a backend or a
// layer and this file agree, both read the specification the same way. Everything is double precision, so the
// reference is exact to ~1e-15 relative and any difference of a float32 implementation beyond float rounding
// (~6e-8 per operation) is a bug. Layouts: activations NCHW, row-major; filters [g, c_out/g, c_in/g, k, k].
// All convolutions: stride 1, odd square kernel k, zero "same" padding k/2 (cross-correlation, as in oneDNN).
//
// Reusable by every test file: include "reference.hpp" (the tests directory is on the include path).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <vector>

#include "orthoconv/orthoconv.hpp"

namespace orthoconv::reference {

using Vec = std::vector<double>;

// ---- small helpers ----
Vec to_double(const std::vector<float>& values);
Vec to_double(const Tensor& tensor);
std::vector<float> to_float(const Vec& values);
Tensor to_tensor(const Vec& values, const Shape& shape);
double dot(const Vec& a, const Vec& b);
double norm(const Vec& a);
// max |a - b| / max |b|: the error normalised by the reference's magnitude (0 when both are zero).
double max_relative_error(const Vec& actual, const Vec& expected);
// ||a - b||_2 / ||b||_2.
double norm_relative_error(const Vec& actual, const Vec& expected);
// bfloat16 rounding (8-bit significand, round to nearest, ties to even, overflow to infinity; NaN stays NaN),
// computed in double arithmetic from the definition (the nearest multiple of the spacing 2^(e-7)), not from
// the bit pattern. Returns the rounded value as a double (exactly representable in float and bfloat16).
double round_to_bf16(double x);
Vec round_to_bf16(const Vec& values);
// Whether this CPU runs bf16 (AVX512-BF16 in oneDNN's ISA query; tests of bf16 warn and return without it), and
// Backend::PrecisionChoice::always on the CPU backend for a scope (every shape with a oneDNN bf16 kernel runs it,
// whatever the timings; the measured choice again afterwards).
bool runs_precision(Backend& backend, ConvPrecision precision);  // check_precision does not refuse it
bool cpu_has_bf16();
struct AlwaysBf16 {
  AlwaysBf16();
  ~AlwaysBf16();
  AlwaysBf16(const AlwaysBf16&) = delete;
  AlwaysBf16& operator=(const AlwaysBf16&) = delete;
};
// Deterministic N(0, stddev^2) / U(-1, 1) vectors.
Vec random_normal(size_t count, uint64_t seed, double stddev = 1.0);
Vec random_uniform(size_t count, uint64_t seed);

// ---- grouped convolution ----
struct ConvDims {
  int64_t batch = 1;
  int64_t in_channels = 1;
  int64_t out_channels = 1;
  int64_t height = 1;
  int64_t width = 1;
  int64_t kernel = 1;
  int64_t groups = 1;
  int64_t input_size() const { return batch * in_channels * height * width; }
  int64_t output_size() const { return batch * out_channels * height * width; }
  int64_t weight_size() const { return out_channels * (in_channels / groups) * kernel * kernel; }
};

// y[n, o, y, x] = sum_{i in group(o), ky, kx} w[g, o', i', ky, kx] * x[n, i, y + ky - k/2, x + kx - k/2].
Vec conv_forward(const ConvDims& dims, const Vec& input, const Vec& weights);
// The adjoint in the input: dx = conv^T(dy).
Vec conv_backward_data(const ConvDims& dims, const Vec& diff_output, const Vec& weights);
// The adjoint in the weights: dw = gradient of <dy, conv(x, w)> in w.
Vec conv_backward_weights(const ConvDims& dims, const Vec& input, const Vec& diff_output);

// ---- small matrices ----
// Backend::matmul's contract: for b < batch, C_b = alpha op(A_b) op(B_b) + beta C_b + shift I on row-major
// matrices at pointer + b * stride (stride_c == 0, batch > 1: one C, alpha times the sum of the products);
// b empty: op(B_b) = I. `c` is updated in place (beta == 0 ignores its values).
struct MatmulDims {
  int64_t batch = 1, rows = 1, cols = 1, inner = 1;
  bool transpose_a = false, transpose_b = false;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;
  MatmulShape shape() const {  // the same product for Backend::matmul
    return {batch, rows, cols, inner, transpose_a, transpose_b, stride_a, stride_b, stride_c};
  }
};
void matmul(const MatmulDims& dims, double alpha, const Vec& a, const Vec& b, double beta, double shift, Vec& c);

// ---- SOC pieces ----
// A = (M - M^T) / 2 on [groups, C, C, k, k]: M^T swaps the channel axes and flips both spatial axes.
Vec skew(const Vec& m, int64_t groups, int64_t channels, int64_t kernel);
// input[b, c, s*i + p, s*j + q] -> output[b, c*s*s + s*p + q, i, j].
Vec pixel_unshuffle(const Vec& input, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t stride);
// The inverse: input[b, c*s*s + s*p + q, i, j] -> output[b, c, s*i + p, s*j + q] (channels: the output's).
Vec pixel_shuffle(const Vec& input, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t stride);
// Reshape `which` (0..3) of group g of a [groups, C, C, k, k] filter as a dense row-major matrix: rows indexed as
// v_which, columns as u_which (the layouts named below). v = A u and u = A^T v are the power iteration's products.
Vec power_reshape(const Vec& filter, int64_t group, int64_t channels, int64_t kernel, int which);
// The gradient of sigma_g = <A_g, u_w (x) v_w> in A for w = which[g], times coefficient[g], added to diff_filter:
// diff[g, o, i, y, x] += coefficient[g] * u_w[u index of (o, i, y, x)] * v_w[v index of (o, i, y, x)].
void add_sigma_gradient(const std::array<Vec, 4>& u, const std::array<Vec, 4>& v, const std::vector<int32_t>& which,
                        const Vec& coefficient, Vec& diff_filter, int64_t groups, int64_t channels, int64_t kernel);
// The reference code's power-iteration vectors (GS-SOC skew_ortho_conv.py, fantastic_four / SOC.update_sigma), per
// group without the unit axes of its 5-D shapes: u1 [in, w] v1 [out, h]; u2 [in, h] v2 [out, w];
// u3 [in, h, w] v3 [out]; u4 [out, h, w] v4 [in]. u[i] / v[i] hold `groups` vectors back to back
// (SocConv::buffers() u1..u4, v1..v4).
// Per group g: min over i of <A_g, u_i (x) v_i>.
Vec power_sigma(const Vec& skew_filter, const std::array<Vec, 4>& u, const std::array<Vec, 4>& v, int64_t groups,
                int64_t channels, int64_t kernel);
// `iterations` rounds of the reference's update rule, in place: for i = 1..4,
//   v_i = l2_normalize((A * u_i).sum(the axes v_i lacks)), then u_i = l2_normalize((A * v_i).sum(the axes u_i lacks))
// with l2_normalize(x) = x / max(||x||, 1e-12) per group.
void power_iterate(const Vec& skew_filter, std::array<Vec, 4>& u, std::array<Vec, 4>& v, int64_t groups,
                   int64_t channels, int64_t kernel, int iterations);

// Everything that defines one SocConv's function. Fill it from a layer with soc_params().
struct SocParams {
  int64_t in_channels = 0, out_channels = 0, kernel = 3, stride = 1, groups = 1;
  bool keep_per_group = false;
  int terms = 5;
  double correction = 0.7;
  Vec weight;               // M [groups, C, C, k, k]
  Vec bias;                 // [out_channels], empty for none
  std::array<Vec, 4> u, v;  // power-iteration vectors (held fixed)
  Vec sigma;                // if not empty, used as given; else power_sigma(skew(weight), u, v)
  Vec scaled;               // if not empty, A_n as given (weight, sigma and correction are then unused)
  int64_t series_channels() const { return std::max(out_channels, in_channels * stride * stride); }
  int64_t group_channels() const { return series_channels() / groups; }
};

// The layer's current M, bias, u, v (as they are now: call after the forward whose function you want),
// correction, stride, ... and `terms` (SocConv::terms() of its current mode).
SocParams soc_params(SocConv& layer);
// The sigma a SocParams implies (given, or computed from M, u, v).
Vec soc_sigma(const SocParams& params);
// SocConv's function: unshuffle, zero channels up to C*g, y = sum_{i=0..K} A_n^i x / i! with
// A_n = correction * A / (sigma + 1e-12) per group, keep c_out channels, add the bias.
Vec soc_forward(const SocParams& params, const Vec& input, int64_t batch, int64_t height, int64_t width);

// ---- permutations and activations ----
// destination[i] = (i mod g)(n/g) + floor(i/g); paired: (floor(i/2) mod g)(n/g) + 2 floor(i/(2g)) + (i mod 2).
std::vector<int64_t> shuffle_destination(int64_t channels, int64_t groups, bool paired);
// out[b, destination[c]] = in[b, c]; inverse: out[b, c] = in[b, destination[c]].
Vec permute_channels(const Vec& input, const std::vector<int64_t>& destination, int64_t batch, int64_t channels,
                     int64_t plane, bool inverse = false);
// Plain: [min(A, B), max(A, B)] of the halves; paired: min / max of channel pairs (2i, 2i+1).
Vec maxmin(const Vec& input, int64_t batch, int64_t channels, int64_t plane, bool paired);

// The gradient of MaxMin: out[min slot] takes the gradient of the min output, out[max slot] that of the max, where
// the min of a pair (a, b) (a the first half's / even channel) is a when a <= b (ties: min from a, max from b).
Vec maxmin_backward(const Vec& input, const Vec& diff_output, int64_t batch, int64_t channels, int64_t plane,
                    bool paired);
// dst[b, c, :] (+)= src[b, c, :] for c < min(src_channels, dst_channels); without accumulate the channels of dst
// beyond src_channels become 0 (channel padding / truncation and their gradients).
void copy_channels(const Vec& src, int64_t src_channels, Vec& dst, int64_t dst_channels, int64_t batch, int64_t plane,
                   bool accumulate);
// dst[b, c, :] += bias[c];  bias_backward: diff_bias[c] += sum over b and the plane of diff_dst[b, c, :].
void add_bias(Vec& dst, const Vec& bias, int64_t batch, int64_t channels, int64_t plane);
void bias_backward(const Vec& diff_dst, Vec& diff_bias, int64_t batch, int64_t channels, int64_t plane);

// ---- loss and optimizer ----
// Softmax cross-entropy of row-major logits [batch, classes]: diff = (softmax(logits) - onehot(label)) / batch;
// returns the summed per-image loss (natural log); *correct counts rows whose FIRST arg-max equals the label.
double softmax_cross_entropy(const Vec& logits, const std::vector<int32_t>& labels, int64_t batch, int64_t classes,
                             Vec& diff_logits, int64_t* correct);
// PyTorch's SGD with momentum, one step: d = grad + wd param; buf = first ? d : m buf + d; param -= lr buf.
void sgd_momentum(Vec& param, const Vec& grad, Vec& momentum, double lr, double momentum_coef, double weight_decay,
                  bool first_step);

// GS-SOC (a, b) / (a, -): shuffle(a) when it applies -> SOC k x k, a groups -> shuffle(b) -> SOC 1 x 1, b groups.
struct GsSocParams {
  bool shuffle_input = true;
  GroupCounts groups;  // second empty: single stage
  bool paired = false;
  SocParams first, second;
};
GsSocParams gs_soc_params(GsSocConv& layer);
Vec gs_soc_forward(const GsSocParams& params, const Vec& input, int64_t batch, int64_t height, int64_t width);

// Central finite differences of a scalar function of a vector, in double: d/dx_j f at x, step h, every j.
template <typename F>
Vec finite_difference_gradient(F&& f, Vec x, double h) {
  Vec grad(x.size());
  for (size_t j = 0; j < x.size(); ++j) {
    const double keep = x[j];
    x[j] = keep + h;
    const double plus = f(x);
    x[j] = keep - h;
    const double minus = f(x);
    x[j] = keep;
    grad[j] = (plus - minus) / (2.0 * h);
  }
  return grad;
}

}  // namespace orthoconv::reference
