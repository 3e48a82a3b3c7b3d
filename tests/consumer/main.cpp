// A program built against the installed orthoconv package (docs/library.md walks through it):
//   1. load a trained LipConvnet from a checkpoint, in one call;
//   2. evaluate a batch of CIFAR-100 test images (random pixels when no dataset directory is given);
//   3. compute certified l2 radii, and check one: a perturbation inside the radius cannot change the prediction;
//   4. use GS-SOC layers inside one's own network: forward, backward, a few SGD steps.
// Usage: orthoconv_consumer CHECKPOINT [CIFAR100_DIR]
#include <orthoconv/orthoconv.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace orthoconv;

namespace {

double norm(const std::vector<float>& v) {
  double s = 0.0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

// Logits [n, classes] on the host for images [n, 3, 32, 32] on the host, whatever the model's device.
std::vector<float> logits_of(LipConvnet& model, const Tensor& host_images) {
  Backend& be = model.backend();
  Tensor images = host_images, logits;
  if (be.device() != Device::cpu) {
    images = Tensor(host_images.shape(), be.device());
    be.from_host(host_images.data(), images.data(), host_images.numel());
  }
  model.forward(images, logits);
  std::vector<float> out(static_cast<size_t>(logits.numel()));
  be.to_host(logits.data(), out.data(), logits.numel());
  return out;
}

// Part 4: a network of our own, two GS-SOC (4, 1) layers with MaxMin between, 16 channels, no bias: every map
// is orthogonal, so the network preserves the norm of its input (and of the gradient, backwards).
struct MyNetwork {
  GsSocConv first, second;
  MaxMin activation;
  Tensor hidden, activated, diff_activated, diff_hidden;

  static GsSocConfig layer(uint64_t seed) {
    GsSocConfig config;
    config.base.in_channels = config.base.out_channels = 16;
    config.base.kernel = 3;
    config.base.bias = false;
    config.base.seed = seed;
    config.groups = GroupCounts{4, 1};
    return config;
  }
  MyNetwork() : first(layer(1)), second(layer(2)) {}

  void set_training(bool training) {
    first.set_training(training);
    second.set_training(training);
  }
  void forward(const Tensor& x, Tensor& y) {
    first.forward(x, hidden);
    activation.forward(hidden, activated);
    second.forward(activated, y);
  }
  void backward(const Tensor& dy, Tensor& dx) {  // after forward; adds the parameter gradients
    second.backward(dy, diff_activated);
    activation.backward(diff_activated, diff_hidden);
    first.backward(diff_hidden, dx);
  }
  void zero_grad() {
    first.zero_grad();
    second.zero_grad();
  }
  std::vector<Parameter*> parameters() {
    std::vector<Parameter*> out = first.parameters();
    for (Parameter* p : second.parameters()) out.push_back(p);
    return out;
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: orthoconv_consumer CHECKPOINT [CIFAR100_DIR]\n");
    return 2;
  }
  try {
    set_thread_count(2);  // runtime.hpp: every CPU loop and oneDNN primitive

    // ---- 1. A trained model, ready to evaluate: architecture, weights, u and v, evaluation mode ----
    const Device device = cuda_available() ? Device::cuda : Device::cpu;
    LoadedModel loaded = load_model(argv[1], device);
    LipConvnet& model = *loaded.model;
    const Normalization& normalization = loaded.normalization;
    std::printf("model: %s on %s, %d series terms\n", model.config().architecture().c_str(),
                device_name(device).c_str(), model.config().eval_terms);

    // ---- 2. A batch of test images, normalized as in training ----
    CifarSplit test;
    if (argc == 3) {
      test = load_cifar100(find_cifar100(argv[2]), "test");
    } else {  // random pixels and labels: the same code path, nothing to download
      std::mt19937 rng(7);
      test.pixels.resize(16 * kCifarPixels);
      for (uint8_t& p : test.pixels) p = static_cast<uint8_t>(rng() % 256);
      for (int i = 0; i < 16; ++i) test.fine_labels.push_back(static_cast<int32_t>(rng() % 100));
      test.coarse_labels.assign(16, 0);
    }
    std::vector<int64_t> indices;
    for (int64_t i = 0; i < 16; ++i) indices.push_back(i);
    Batch batch;
    make_batch(test, indices, normalization, batch);
    const std::vector<float> logits = logits_of(model, batch.images);
    const int64_t classes = model.config().classes;

    // ---- 3. Certified radii: ||delta||_2 < radius (pixels in [0, 1]) cannot change the prediction ----
    const double input_lipschitz = normalization.lipschitz();  // of x -> (x - mean) / std
    Certifier certifier({36, 72, 108}, input_lipschitz);
    if (model.lln_head()) certifier.use_lln(model.lln_head()->normalized_rows(), classes, model.features());
    certifier.add_batch(logits.data(), 16, classes, batch.labels.data());
    const CertifyReport& report = certifier.report();
    std::printf("batch: %lld images, clean accuracy %.2f%%, certified at 36/255 %.2f%%, mean radius %.4f\n",
                static_cast<long long>(report.images), 100.0 * report.clean_accuracy(),
                100.0 * report.certified_accuracy(36), report.mean_radius());

    // Check the certificate of the image with the largest radius (soc head: margin / (sqrt(2) L_in)): a random
    // perturbation of 0.9 of its radius in pixel space, which is delta / std in the normalized input.
    int64_t best = 0;
    std::vector<ImageCertificate> certificates;
    for (int64_t i = 0; i < 16; ++i) {
      certificates.push_back(certify_margin(&logits[i * classes], classes, batch.labels[i], input_lipschitz));
      if (certificates[i].radius > certificates[best].radius) best = i;
    }
    if (!model.lln_head() && certificates[best].radius > 1e-3) {
      std::vector<float> delta(kCifarPixels);
      std::mt19937 rng(3);
      std::normal_distribution<float> normal;
      for (float& d : delta) d = normal(rng);
      const double scale = 0.9 * certificates[best].radius / norm(delta);
      Tensor perturbed(Shape{1, 3, 32, 32});
      for (int64_t i = 0; i < kCifarPixels; ++i)
        perturbed.at(i) = batch.images.at(best * kCifarPixels + i) +
                          static_cast<float>(scale * delta[i] / normalization.std[i / 1024]);
      const std::vector<float> moved = logits_of(model, perturbed);
      const ImageCertificate after = certify_margin(moved.data(), classes, batch.labels[best], input_lipschitz);
      std::printf("image %lld: radius %.4f, prediction %d; perturbed by 0.9 radius: prediction %d\n",
                  static_cast<long long>(best), certificates[best].radius, certificates[best].predicted,
                  after.predicted);
      if (after.predicted != certificates[best].predicted) {
        std::fprintf(stderr, "consumer: a perturbation inside the certified radius changed the prediction\n");
        return 1;
      }
    }

    // ---- 4. GS-SOC layers in a network of our own ----
    MyNetwork net;
    const Shape shape{2, 16, 8, 8};
    std::vector<float> input(static_cast<size_t>(shape.numel())), target(input.size()), output(input.size());
    std::mt19937 rng(5);
    std::normal_distribution<float> normal;
    for (float& x : input) x = normal(rng);
    for (float& x : target) x = normal(rng);
    Tensor x = Tensor::view(input.data(), shape);  // our buffers, no copies
    Tensor y = Tensor::view(output.data(), shape);
    Tensor dy(shape), dx;

    // Evaluation mode (12 terms): orthogonal to float32 rounding, forward and backward.
    net.set_training(false);
    net.forward(x, y);
    for (int64_t i = 0; i < dy.numel(); ++i) dy.at(i) = normal(rng);
    net.backward(dy, dx);
    const double forward_ratio = norm(output) / norm(input);
    const double backward_ratio = norm(dx.to_vector()) / norm(dy.to_vector());
    std::printf("my network: ||y||/||x|| = %.7f, ||dx||/||dy|| = %.7f\n", forward_ratio, backward_ratio);
    if (std::abs(forward_ratio - 1.0) > 1e-4 || std::abs(backward_ratio - 1.0) > 1e-4) {
      std::fprintf(stderr, "consumer: the network does not preserve norms\n");
      return 1;
    }

    // Training mode: loss = ||y - target||^2 / 2, SGD on every parameter (CPU tensors here).
    net.set_training(true);
    std::vector<double> losses;
    for (int step = 0; step < 4; ++step) {
      net.forward(x, y);
      double loss = 0.0;
      for (int64_t i = 0; i < dy.numel(); ++i) {
        dy.at(i) = output[static_cast<size_t>(i)] - target[static_cast<size_t>(i)];
        loss += 0.5 * dy.at(i) * dy.at(i);
      }
      losses.push_back(loss);
      net.zero_grad();
      net.backward(dy, dx);
      for (Parameter* p : net.parameters())
        for (int64_t i = 0; i < p->value.numel(); ++i) p->value.at(i) -= 0.01f * p->grad.at(i);
    }
    std::printf("my network: loss %.4f -> %.4f -> %.4f -> %.4f\n", losses[0], losses[1], losses[2], losses[3]);
    for (size_t i = 1; i < losses.size(); ++i)
      if (!(losses[i] < losses[i - 1])) {
        std::fprintf(stderr, "consumer: SGD did not decrease the loss\n");
        return 1;
      }
    return 0;
  } catch (const Error& e) {  // every library failure: one line
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
}
