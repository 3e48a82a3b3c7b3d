// orthoconv/vnnlib.hpp: VNN-LIB robustness properties of test images, for external verifiers of an exported model
// (onnx_export.hpp).
//
// orthoconv certifies l2 balls: no input x' with ||x' - x||_2 <= eps (pixels in [0, 1]) changes the prediction.
// VNN-LIB cannot express an l2 ball, so the property is the l-infinity box |x'_k - x_k| <= h with
// h = eps / sqrt(n), n = 3 side^2 the input size: every point of that box lies inside the l2 ball (||x' - x||_2 <=
// sqrt(n) h = eps), so a certificate at eps implies the property (the converse does not hold). The box is not
// clipped to [0, 1] (the certificate covers the whole ball). Bounds are printed with 17 significant digits after
// shrinking h by 1e-12 (absolute), so that the decimal box stays inside the real one around x = byte / 255.
// Variables: X_0 .. X_{n-1}, the ONNX model's input in C, H, W order; Y_0 .. Y_{classes-1}, its logits. As VNN-LIB
// asks, the assertions describe a counterexample (some Y_j >= Y_label, j != label): a verifier proves the property
// by showing them unsatisfiable.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace orthoconv {

// h for an l2 radius eps_numerator / 255 on a 3 x side x side input, before the 1e-12 shrink.
double vnnlib_box_half_width(int eps_numerator, int64_t side);

// The property for one image: `pixels` 3 side^2 bytes (R, G, B planes), `label` in [0, classes). `comments` are
// written first, one "; " line each (no newlines inside). Throws ConfigError for a bad label or side, or eps not
// in 1..16320.
std::string vnnlib_property(const uint8_t* pixels, int64_t side, int32_t label, int64_t classes, int eps_numerator,
                            const std::vector<std::string>& comments);

}  // namespace orthoconv
