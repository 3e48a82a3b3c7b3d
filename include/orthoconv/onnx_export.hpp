// orthoconv/onnx_export.hpp: a LipConvnet in evaluation mode as an ONNX model (standard operators only, opset 17),
// for other runtimes and for independent neural-network verifiers.
//
// The graph computes, from input "pixels" [N, 3, side, side] float32 in [0, 1] (R, G, B planes, x = byte / 255),
// output "logits" [N, classes] float32, the network's steps in order (the model's own list of steps):
//   normalization   Sub(mean [1,3,1,1]), Div(std [1,3,1,1]): (x - mean_c) / std_c, the reference's arithmetic
//   channel shuffle Gather on axis 1 (output channel d reads input channel source[d])
//   SocConv k > 1   pixel-unshuffle by the stride: SpaceToDepth then a Gather into orthoconv's channel order
//                   (c s^2 + p s + q for channel c, offset (p, q)); zero channels up to C g: Pad; the series by
//                   Horner's rule, p = x0, then for j = K..1: p = Add(x0, Conv(p, W_j)) with W_j = fl(1/j) A_n
//                   (the 1/j folded into the weights, as the float32 layer's scaled filter copies; A_n in ONNX's
//                   [g C, C, k, k] layout, "same" zero padding, `group` = g); keep c_out channels: Slice (the
//                   first c_out) or Gather (the first c_out / g of each group, keep=per-group); bias: Add.
//   SocConv 1 x 1   the matrix polynomial P = sum_{i<=K} A_n^i / i! per group, by Horner's rule in double from
//                   the float32 A_n, rounded once to float32; ONE Conv 1x1 (with its bias) by P, as a grouped Conv
//                   when there is nothing to fold, else by the dense c_out x (c_in s^2) matrix into which the
//                   unshuffle order, the zero channels and the kept rows are folded (after SpaceToDepth).
//   MaxMin          plain: Split in halves on axis 1, Min, Max, Concat; paired: Reshape [N, C/2, 2, H, W], Split on
//                   axis 2, Min, Max, Concat, Reshape back
//   flatten, head   Flatten (C, H, W order), then Gemm: the soc head's kept rows of P (its bias as Gemm's C), or the
//                   lln head's unit rows q_i = w_i / ||w_i|| (formed in double, rounded once) and bias.
// The batch dimension is symbolic ("N"). Metadata (ModelProto.metadata_props, see onnx_metadata): the architecture,
// the series terms, the verified Lipschitz bound L of the network for those terms, L_in of the normalization, the
// float32 rounding bound of the logits (network_bound.hpp: it holds for a runtime that computes every Conv / Gemm
// output as a float32 dot product, in any order, with or without FMA) and how logits become a certified radius.
// The model is checked with ONNX's own checker before it is written; the file is written atomically (temporary,
// fsync, rename): a failure leaves no partial file and an existing file unchanged.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "orthoconv/data.hpp"
#include "orthoconv/model.hpp"
#include "orthoconv/network_bound.hpp"

namespace orthoconv {

constexpr int kOnnxOpset = 17;  // the newest opset Debian bookworm's ONNX (1.12) writes and checks
constexpr const char* kOnnxInputName = "pixels";
constexpr const char* kOnnxOutputName = "logits";

// Whether this build can write ONNX (configured with libonnx-dev and libprotobuf-dev: ORTHOCONV_ONNX).
bool onnx_export_available();

// The metadata written into the model, in order (key, value): "orthoconv.architecture", "orthoconv.series_terms",
// "orthoconv.lipschitz" (L, for `terms` series terms), "orthoconv.lipschitz_input" (L_in), "orthoconv.head",
// "orthoconv.normalization.mean" / ".std", "orthoconv.rounding_float32_per_input_norm" and
// "orthoconv.rounding_float32_constant" (a, b: the error of each logit of the soc head's logit vector in l2, or of
// each lln logit, is at most a ||(x - mean) / std||_2 + b), "orthoconv.input", "orthoconv.certified_radius" (the
// formula in words). Numbers with 17 significant digits. `bound` must be verify_network(model, terms,
// Precision::float32, norm).
std::vector<std::pair<std::string, std::string>> onnx_metadata(LipConvnet& model, const Normalization& norm,
                                                               const NetworkBound& bound);

struct OnnxExportSummary {
  int terms = 0;
  int opset = kOnnxOpset;
  int64_t nodes = 0;
  int64_t weights = 0;  // float32 values in the initializers
  int64_t bytes = 0;    // the file's size
  NetworkBound bound;   // float32, for `terms`
  std::vector<std::pair<std::string, std::string>> metadata;
};

// Writes `model` (evaluation mode, `terms` series terms in every SocConv; 0: the model's eval_terms) to `path`.
// Throws ConfigError for terms out of 1..kMaxSeriesTerms, Error when this build has no ONNX (naming the packages),
// Error when ONNX's checker refuses the graph (a bug), IoError when the file cannot be written.
OnnxExportSummary export_onnx(LipConvnet& model, const Normalization& norm, const std::string& path, int terms = 0);

}  // namespace orthoconv
