// orthoconv/certifying_pass.hpp: the certifying pass, a LipConvnet evaluated on the host in double precision.
//
// Why: a certificate compares a margin with L * eps. The float32 forward pass errs by up to ~1e-6 of the logits
// in practice, but its worst-case rounding bound at depth 15 is several logits (network_bound.hpp), so a
// float32 margin proves nothing. The same model evaluated in double has a worst-case rounding bound about 2^29
// times smaller (~1e-8 logits), which makes the rigorous certificate equal to the Lipschitz-only one.
//
// HostNetwork<Real> snapshots a LipConvnet in evaluation mode: each SocConv's scaled filter A_n (the float32
// values that soc_layer_bound bounds, widened exactly, so rho and the pass see the same operator), its bias, the
// channel shuffles, MaxMin's layout and the head. It does not advance power iteration. forward() computes, per
// image, from the raw bytes:
//   x0 = (p - 255 mean_c) / (255 std_c)     in double, p - 255 mean_c is exact (255 mean_c has at most 32
//                                           significant bits), so x0 = (p/255 - mean_c)/std_c with ONE rounding
//   each block: [shuffle] SocConv [shuffle, SocConv 1x1], MaxMin; flatten (C, H, W); the head (SocConv or lln)
// where a SocConv is: pixel-unshuffle, zero channels up to C*g, Horner p_j = x0 + (A_n p_{j+1}) / j for
// j = K..1 (every entry of A_n p is one dot product of C k k terms, then / j, then + x0), keep channels, + bias.
// The rounding analysis of verify_network(..., Precision::float64) covers exactly this operation structure.
// Real = float runs the same code in float32: the tests use it to check the analysis where rounding is visible.
// Images run in parallel (OpenMP), one per thread; the GEMMs are Eigen's.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "orthoconv/data.hpp"
#include "orthoconv/model.hpp"

namespace orthoconv {

template <class Real>
class HostNetwork {
 public:
  // The steps of model.steps(), in order. terms: series terms of every SocConv; by default the model's
  // evaluation terms (config().eval_terms, which every SocConv runs in evaluation mode), as verify_network.
  HostNetwork(LipConvnet& model, const Normalization& norm, std::optional<int> terms = std::nullopt);
  ~HostNetwork();
  HostNetwork(const HostNetwork&) = delete;
  HostNetwork& operator=(const HostNetwork&) = delete;

  int64_t classes() const;
  int64_t image_bytes() const;     // 3 * side * side
  double flops_per_image() const;  // 2 x the multiply-adds of the series and head GEMMs
  // pixels: n images of image_bytes() bytes (R, G, B planes, as CifarSplit stores them); logits [n, classes].
  void forward(const uint8_t* pixels, int64_t n, Real* logits) const;
  // The normalized input x0 of one image, as forward computes it (for tests and for ||x0||).
  std::vector<Real> normalize(const uint8_t* pixels) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

extern template class HostNetwork<float>;
extern template class HostNetwork<double>;
using Float64Network = HostNetwork<double>;

}  // namespace orthoconv
