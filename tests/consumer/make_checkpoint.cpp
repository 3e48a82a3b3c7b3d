// Writes a LipConvnet checkpoint the way `orthoconv train` does (write_model_state + save_checkpoint), for the
// consumer program to load: a small GS-SOC (4, 1) LipConvnet-5 of width 8 on CIFAR-100, after one SGD step.
// Usage: make_checkpoint OUT.safetensors
#include <orthoconv/orthoconv.hpp>

#include <cstdio>
#include <random>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_checkpoint OUT.safetensors\n");
    return 2;
  }
  try {
    orthoconv::ModelConfig config;  // conv gs-soc (4, 1), 100 classes, soc head
    config.depth = 5;
    config.init_channels = 8;
    orthoconv::LipConvnet model(config);
    orthoconv::Sgd sgd(model);
    orthoconv::TrainStep step(model, sgd, 0.0, orthoconv::Normalization{}.lipschitz());
    orthoconv::Tensor images(orthoconv::Shape{4, 3, 32, 32});
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (int64_t i = 0; i < images.numel(); ++i) images.at(i) = normal(rng);
    step.run(images, {3, 14, 15, 92}, 0.1f, 0.9f, 5e-4f);

    orthoconv::Checkpoint checkpoint;
    orthoconv::write_model_state(model, orthoconv::Normalization{}, checkpoint);
    orthoconv::save_checkpoint(argv[1], checkpoint);
    std::printf("make_checkpoint: %s (%s)\n", argv[1], config.architecture().c_str());
    return 0;
  } catch (const orthoconv::Error& e) {
    std::fprintf(stderr, "make_checkpoint: %s\n", e.what());
    return 1;
  }
}
