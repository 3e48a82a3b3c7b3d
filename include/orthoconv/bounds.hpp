// orthoconv/bounds.hpp: verified upper bounds on the Lipschitz constant of SOC layers.
//
// Why: SOC layers are orthogonal only in the limit. The series is truncated (K terms) and sigma comes from power
// iteration, which under-estimates a norm, so ||A_n|| can exceed the intended value. These functions bound what
// the layer really computes (in exact arithmetic; float32 rounding is accounted for separately).
//
// rho >= ||A_n||_2 on an n x n input: the zero-padded convolution on n x n is a restriction (a compression) of the
// circular convolution on any N x N grid with N >= n + k - 1, whose operator norm is the largest singular value
// over the N*N DFT frequencies of the per-frequency c x c matrices K(p, q) = sum_{y,x} A[:, :, y, x] w^(py + qx)
// (Sedghi et al., ICLR 2019). Each frequency's largest eigenvalue of K^H K is computed in double precision by a
// Hermitian eigen-solver; the result is inflated by a relative 1e-9 to cover the solver's rounding (the solver's
// backward error is ~1e-15 relative for these sizes).
// Layer bound: exp(A_n) is orthogonal (A_n is exactly skew: A = (M - M^T)/2 is computed exactly in float32), and
// the truncated series differs from it by sum_{i > K} A_n^i / i!, so ||exp_K(A_n)|| <= 1 + sum_{i > K} rho^i / i!.
// Pixel-unshuffle, channel padding and truncation are 1-Lipschitz.
#pragma once

#include <string>
#include <vector>

#include "orthoconv/soc_conv.hpp"

namespace orthoconv {

// Upper bound on the operator norm of the zero-padded "same" convolution by `filter` ([g, C, C, k, k], plain)
// on an input_side x input_side input (max over the groups).
double conv_spectral_norm_bound(const std::vector<float>& filter, int64_t groups, int64_t channels, int64_t kernel,
                                int64_t input_side);

// sum_{i > terms} rho^i / i!, summed until the terms stop contributing (rounded up).
double series_tail_bound(double rho, int terms);

struct SocLayerBound {
  std::string description;
  int64_t input_side = 0;  // spatial side the series runs on (after pixel-unshuffle)
  int terms = 0;
  double rho = 0.0;    // >= ||A_n||_2
  double bound = 0.0;  // >= the layer's Lipschitz constant (bias excluded)
};

// The bound of one SocConv in evaluation mode (its current M and power-iteration vectors), for an input of
// side `input_side` before the layer's stride, with `terms` series terms.
SocLayerBound soc_layer_bound(SocConv& layer, int64_t input_side, int terms);

}  // namespace orthoconv
