// A user's program: one GS-SOC (4, 1) layer, forward and backward on buffers the program owns (Tensor::view),
// in evaluation mode. The layer is orthogonal, so it must preserve the norm of the input and of the gradient.
#include <orthoconv/orthoconv.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

double norm(const std::vector<float>& v) {
  double s = 0.0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

}  // namespace

int main() {
  try {
    const int64_t n = 2, c = 16, h = 8, w = 8;
    orthoconv::GsSocConfig config;
    config.base.in_channels = c;
    config.base.out_channels = c;
    config.base.kernel = 3;
    config.base.bias = false;  // an orthogonal map preserves norms exactly; a bias would shift them
    config.base.seed = 7;
    config.groups_first = 4;
    config.groups_second = 1;
    orthoconv::GsSocConv layer(config);
    layer.set_training(false);

    std::vector<float> input(n * c * h * w), output(input.size()), diff_output(input.size()), diff_input(input.size());
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : input) x = normal(rng);
    for (float& x : diff_output) x = normal(rng);

    const orthoconv::Shape shape{n, c, h, w};
    orthoconv::Tensor x = orthoconv::Tensor::view(input.data(), shape);
    orthoconv::Tensor y = orthoconv::Tensor::view(output.data(), shape);
    orthoconv::Tensor dy = orthoconv::Tensor::view(diff_output.data(), shape);
    orthoconv::Tensor dx = orthoconv::Tensor::view(diff_input.data(), shape);
    layer.forward(x, y);
    layer.backward(dy, dx);
    if (y.data() != output.data() || dx.data() != diff_input.data()) {
      std::fprintf(stderr, "consumer: the layer did not write into the user's buffers\n");
      return 1;
    }

    // 12 series terms in evaluation mode: orthogonal to float32 rounding (~1e-6); 1e-4 leaves ample margin.
    const double forward_ratio = norm(output) / norm(input), backward_ratio = norm(diff_input) / norm(diff_output);
    std::printf("consumer: %s\n  ||y||/||x|| = %.8f, ||dx||/||dy|| = %.8f\n", layer.describe().c_str(),
                forward_ratio, backward_ratio);
    if (!all_finite(output) || !all_finite(diff_input)) {
      std::fprintf(stderr, "consumer: non-finite output or gradient\n");
      return 1;
    }
    if (std::abs(forward_ratio - 1.0) > 1e-4 || std::abs(backward_ratio - 1.0) > 1e-4) {
      std::fprintf(stderr, "consumer: the layer does not preserve norms\n");
      return 1;
    }
    double grad_norm = 0.0;
    for (orthoconv::Parameter* p : layer.parameters()) grad_norm += norm(p->grad.to_vector());
    if (!(grad_norm > 0.0)) {
      std::fprintf(stderr, "consumer: backward left the parameter gradients at zero\n");
      return 1;
    }
    return 0;
  } catch (const orthoconv::Error& e) {
    std::fprintf(stderr, "consumer: orthoconv error: %s\n", e.what());
    return 1;
  }
}
