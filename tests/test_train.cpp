// Training: the backend's cross-entropy and SGD primitives against their formulas, the per-iteration lr
// schedule, the certificate regularizer's gradient, bit-exact --resume, and every bad input of the issue (truncated
// checkpoint, wrong architecture, missing tensor, unwritable output, unknown flag or value, non-finite loss),
// each failing with one clear message and leaving what was written intact.
#include <catch2/catch.hpp>

#include "cli_helpers.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/certify.hpp"
#include "orthoconv/trainer.hpp"
#include "reference.hpp"

using namespace orthoconv;
namespace fs = std::filesystem;

namespace {

std::string fresh_dir(const std::string& name) {
  const fs::path dir = fs::path(ORTHOCONV_TEST_BINARY_DIR) / ("train-" + std::to_string(getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir.parent_path());
  return dir.string();
}

// A synthetic CIFAR-like split: random pixels, labels < classes.
CifarSplit synthetic_split(int64_t images, int64_t classes, uint64_t seed) {
  CifarSplit s;
  s.path = "synthetic";
  std::mt19937_64 rng(seed);
  s.pixels.resize(static_cast<size_t>(images * kCifarPixels));
  for (auto& p : s.pixels) p = static_cast<uint8_t>(rng() & 0xff);
  for (int64_t i = 0; i < images; ++i) {
    s.fine_labels.push_back(static_cast<int32_t>(rng() % static_cast<uint64_t>(classes)));
    s.coarse_labels.push_back(0);
  }
  return s;
}

TrainConfig tiny_config(const std::string& out) {
  TrainConfig c;
  // Plain SOC (1 group) of width 8: every channel count is a multiple of 16, so every convolution of this tiny
  // net has a JIT kernel in oneDNN 2.6 and the suite stays fast; the grouped layers are covered by test_model.cpp.
  c.model.conv = "soc";
  c.model.groups_first = 1;
  c.model.groups_second.reset();
  c.model.depth = 5;
  c.model.init_channels = 8;
  c.model.classes = 10;
  c.out_dir = out;
  c.epochs = 2;
  c.batch_size = 64;
  c.lr = 0.05;
  c.eval_batch = 64;
  c.threads = 1;  // reductions in a fixed order
  return c;
}

std::vector<float> values_of(Tensor& t) { return t.to_vector(); }

using Result = orthoconv::testing::CliResult;
using orthoconv::testing::slurp;

}  // namespace

TEST_CASE("softmax_cross_entropy: loss, accuracy and the mean-reduction gradient", "[train]") {
  auto be = cpu_backend();
  const int64_t batch = 3, classes = 5;
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(static_cast<size_t>(batch * classes)), diff(logits.size());
  for (float& x : logits) x = normal(rng);
  const std::vector<int32_t> labels{4, 0, 2};
  double loss = 0.0;
  int64_t correct = 0;
  be->softmax_cross_entropy(logits.data(), labels.data(), batch, classes, diff.data(), &loss, &correct);

  auto reference_loss = [&](const std::vector<float>& x) {
    double total = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      double sum = 0.0;
      for (int64_t j = 0; j < classes; ++j) sum += std::exp(static_cast<double>(x[b * classes + j]));
      total += std::log(sum) - x[b * classes + labels[b]];
    }
    return total;
  };
  CHECK(loss == Approx(reference_loss(logits)).epsilon(1e-12));
  int64_t expected_correct = 0;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t arg = 0;
    for (int64_t j = 1; j < classes; ++j)
      if (logits[b * classes + j] > logits[b * classes + arg]) arg = j;
    expected_correct += arg == labels[b];
  }
  CHECK(correct == expected_correct);
  // Gradient of the MEAN loss against central differences on the float inputs (the actual float step is used;
  // the loss is evaluated in double, so the quotient is accurate to ~1e-9; the float gradient to 6e-8).
  for (size_t i = 0; i < logits.size(); ++i) {
    std::vector<float> up = logits, down = logits;
    up[i] += 1e-2f;
    down[i] -= 1e-2f;
    const double numeric = (reference_loss(up) - reference_loss(down)) /
                           (static_cast<double>(up[i]) - down[i]) / static_cast<double>(batch);
    INFO("logit " << i);
    CHECK(diff[i] == Approx(numeric).margin(2e-5));
  }
  const std::vector<int32_t> bad{0, 5, 1};
  CHECK_THROWS_AS(be->softmax_cross_entropy(logits.data(), bad.data(), batch, classes, diff.data(), &loss, &correct),
                  ConfigError);
}

TEST_CASE("sgd_momentum follows PyTorch: d = g + wd p, buf = first ? d : m buf + d, p -= lr buf", "[train]") {
  auto be = cpu_backend();
  std::vector<float> p{1.0f, -2.0f, 0.5f}, g{0.1f, 0.2f, -0.3f}, buf(3, 123.0f);
  const float lr = 0.1f, m = 0.9f, wd = 5e-4f;
  std::vector<float> ep = p, ebuf(3);
  be->sgd_momentum(p.data(), g.data(), buf.data(), 3, lr, m, wd, true);
  for (int i = 0; i < 3; ++i) {
    float d = g[i] + wd * ep[i];
    ebuf[i] = d;  // the first step ignores the old buffer
    ep[i] -= lr * d;
  }
  for (int i = 0; i < 3; ++i) {
    CHECK(buf[i] == Approx(ebuf[i]).epsilon(1e-7));
    CHECK(p[i] == Approx(ep[i]).epsilon(1e-7));
  }
  be->sgd_momentum(p.data(), g.data(), buf.data(), 3, lr, m, wd, false);
  for (int i = 0; i < 3; ++i) {
    float d = g[i] + wd * ep[i];
    ebuf[i] = m * ebuf[i] + d;
    ep[i] -= lr * ebuf[i];
  }
  for (int i = 0; i < 3; ++i) {
    CHECK(buf[i] == Approx(ebuf[i]).epsilon(1e-7));
    CHECK(p[i] == Approx(ep[i]).epsilon(1e-7));
  }
}

TEST_CASE("the learning rate drops x0.1 at 50% and 75% of the iterations, stepped per iteration", "[train]") {
  TrainConfig c;
  CHECK(scheduled_lr(c, 0, 100) == Approx(0.1));
  CHECK(scheduled_lr(c, 49, 100) == Approx(0.1));
  CHECK(scheduled_lr(c, 50, 100) == Approx(0.01));
  CHECK(scheduled_lr(c, 74, 100) == Approx(0.01));
  CHECK(scheduled_lr(c, 75, 100) == Approx(0.001));
  CHECK(scheduled_lr(c, 99, 100) == Approx(0.001));
  // 391 iterations per epoch x 200 epochs (the paper): milestones 39100 and 58650.
  CHECK(scheduled_lr(c, 39099, 78200) == Approx(0.1));
  CHECK(scheduled_lr(c, 39100, 78200) == Approx(0.01));
  CHECK(scheduled_lr(c, 58650, 78200) == Approx(0.001));
}

TEST_CASE("certificate regularization adds -gamma/N * d relu(r)/d logits through the top-2 margin", "[train]") {
  // With lr = 0 and weight decay 0 the step changes nothing, and the head's bias gradient equals the logit
  // gradient summed over the batch (the soc head adds its bias last), so the regularizer's contribution is the
  // difference of the bias gradients with and without gamma.
  ModelConfig mc;
  mc.conv = "soc";
  mc.groups_second.reset();
  mc.groups_first = 1;
  mc.depth = 5;
  mc.init_channels = 4;
  mc.classes = 10;
  std::mt19937_64 rng(2);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> host(static_cast<size_t>(4 * 3 * 32 * 32));
  for (float& x : host) x = normal(rng);
  Tensor images = Tensor::from_vector(host, Shape{4, 3, 32, 32});
  const std::vector<int32_t> labels{1, 2, 3, 4};
  const double gamma = 0.5, L = 4.0;

  auto head_bias_grad = [&](double g) {
    LipConvnet model(mc);
    Sgd sgd(model);
    TrainStep step(model, sgd, g, L);
    step.run(images, labels, 0.0f, 0.0f, 0.0f);
    for (auto& p : model.parameters())
      if (p.name == "head.bias") return p.parameter->grad.to_vector();
    return std::vector<float>{};
  };
  // The logits of that first step, from an identical model (same seed): forward in training mode once.
  LipConvnet probe(mc);
  Tensor logits;
  probe.forward(images, logits);
  std::vector<double> expected(10, 0.0);
  const double c = gamma / (4.0 * std::sqrt(2.0) * L);
  for (int i = 0; i < 4; ++i) {
    const float* f = logits.data() + i * 10;
    int y = labels[i], runner = y == 0 ? 1 : 0;
    for (int j = 0; j < 10; ++j)
      if (j != y && f[j] > f[runner]) runner = j;
    if (f[y] > f[runner]) {
      expected[y] -= c;
      expected[runner] += c;
    }
  }
  auto with = head_bias_grad(gamma);
  auto without = head_bias_grad(0.0);
  REQUIRE(with.size() == 10);
  for (int j = 0; j < 10; ++j) CHECK(with[j] - without[j] == Approx(expected[j]).margin(1e-6));
}

TEST_CASE("resume after epoch 1 continues bit for bit (256 images, batch 64, 2 epochs vs 1 + 1)", "[train][resume]") {
  CifarSplit train = synthetic_split(320, 10, 1), test = synthetic_split(64, 10, 2);
  const std::string a = fresh_dir("straight"), b = fresh_dir("interrupted");
  TrainConfig ca = tiny_config(a), cb = tiny_config(b);
  ca.val_split = cb.val_split = 64;  // 256 training images, 64 held out: best.safetensors too

  Trainer straight(ca, train, test, nullptr);
  straight.prepare();
  straight.run();
  {
    Trainer first(cb, train, test, nullptr);
    first.prepare();
    first.run(1);  // "interrupted" after epoch 1
    CHECK(first.epochs_done() == 1);
  }
  Trainer resumed(cb, train, test, nullptr);
  resumed.prepare((fs::path(b) / "last.safetensors").string());
  CHECK(resumed.epochs_done() == 1);
  resumed.run();
  REQUIRE(resumed.epochs_done() == 2);

  auto pa = straight.model().parameters(), pb = resumed.model().parameters();
  REQUIRE(pa.size() == pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i].name);
    CHECK(values_of(pa[i].parameter->value) == values_of(pb[i].parameter->value));
  }
  auto ba = straight.model().buffers(), bb = resumed.model().buffers();
  for (size_t i = 0; i < ba.size(); ++i) CHECK(values_of(*ba[i].tensor) == values_of(*bb[i].tensor));
  auto sa = straight.model().soc_layers(), sb = resumed.model().soc_layers();
  for (size_t i = 0; i < sa.size(); ++i) CHECK(sa[i].soc->step() == sb[i].soc->step());
  REQUIRE(straight.history().size() == 2);
  REQUIRE(resumed.history().size() == 2);
  for (size_t e = 0; e < 2; ++e) {
    const EpochMetrics &x = straight.history()[e], &y = resumed.history()[e];
    CHECK(x.train_loss == y.train_loss);
    CHECK(x.train_accuracy == y.train_accuracy);
    CHECK(x.test_loss == y.test_loss);
    CHECK(x.test_accuracy == y.test_accuracy);
    CHECK(x.certified == y.certified);
    CHECK(x.mean_radius == y.mean_radius);
    CHECK(x.val_certified == y.val_certified);
    CHECK(x.lr == y.lr);
    CHECK(x.step == y.step);
  }
  // The files agree too: the momentum buffers and the metrics logs (minus wall-clock columns).
  Checkpoint ka = load_checkpoint((fs::path(a) / "last.safetensors").string());
  Checkpoint kb = load_checkpoint((fs::path(b) / "last.safetensors").string());
  REQUIRE(ka.tensors.size() == kb.tensors.size());
  for (auto& [name, t] : ka.tensors) {
    INFO(name);
    REQUIRE(kb.tensors.count(name) == 1);
    CHECK(t.values == kb.tensors.at(name).values);
  }
  CHECK(ka.metadata.at("train.step") == kb.metadata.at("train.step"));
  CHECK(fs::exists(fs::path(a) / "best.safetensors"));
  CHECK(fs::exists(fs::path(b) / "metrics.jsonl"));
  std::ifstream jsonl(fs::path(b) / "metrics.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(jsonl, line)) ++lines;
  CHECK(lines == 2);
}

TEST_CASE("bf16 training is recorded in config.json, every metrics line and the checkpoint, resume keeps it, "
          "evaluation runs float32", "[train][bf16]") {
  if (!orthoconv::reference::cpu_has_bf16()) {
    WARN("no AVX512-BF16 on this CPU: bf16 training not tested");
    return;
  }
  orthoconv::reference::AlwaysBf16 always;
  CifarSplit train = synthetic_split(128, 10, 3), test = synthetic_split(64, 10, 4);
  const std::string dir = fresh_dir("bf16");
  TrainConfig config = tiny_config(dir);
  config.precision = ConvPrecision::bf16;
  {
    Trainer trainer(config, train, test, nullptr);
    trainer.prepare();
    trainer.run(1);
    REQUIRE(trainer.history().size() == 1);
    CHECK(trainer.history()[0].precision == "bf16");
    // The test metrics of a bf16 run are those of float32 evaluation: the checkpoint written after the epoch,
    // loaded into a model that never heard of bf16, evaluates to the same numbers bit for bit.
    LipConvnet fresh(config.model);
    read_model_state(load_checkpoint((fs::path(dir) / "last.safetensors").string()), "last", fresh);
    std::vector<int64_t> indices(64);
    for (int64_t i = 0; i < 64; ++i) indices[static_cast<size_t>(i)] = i;
    const CertifyReport r = evaluate_model(fresh, test, indices, config.normalization, config.eps, config.eval_batch);
    CHECK(trainer.history()[0].test_loss == r.mean_loss());
    CHECK(trainer.history()[0].test_accuracy == r.clean_accuracy());
    CHECK(trainer.history()[0].mean_radius == r.mean_radius());
  }
  CHECK(slurp((fs::path(dir) / "config.json").string()).find("\"precision\": \"bf16\"") != std::string::npos);
  CHECK(slurp((fs::path(dir) / "metrics.jsonl").string()).find("\"precision\":\"bf16\"") != std::string::npos);
  CHECK(slurp((fs::path(dir) / "metrics.csv").string()).find(",bf16,") != std::string::npos);
  const Checkpoint saved = load_checkpoint((fs::path(dir) / "last.safetensors").string());
  CHECK(saved.metadata.at("train.precision") == "bf16");
  CHECK(TrainConfig::from_json(saved.metadata.at("train.config")).precision == ConvPrecision::bf16);
  // Resuming with another precision is refused, naming the flag; with the same one it continues.
  TrainConfig other = config;
  other.precision = ConvPrecision::fp32;
  Trainer refused(other, train, test, nullptr);
  REQUIRE_THROWS_WITH(refused.prepare((fs::path(dir) / "last.safetensors").string()),
                      Catch::Contains("--precision") && Catch::Contains("bf16"));
  Trainer resumed(config, train, test, nullptr);
  resumed.prepare((fs::path(dir) / "last.safetensors").string());
  resumed.run();
  CHECK(resumed.epochs_done() == 2);
  CHECK(resumed.history().back().precision == "bf16");
  // A config.json from before --precision (no key) reads as fp32.
  std::string legacy = config.to_json();
  const size_t at = legacy.find("  \"precision\": \"bf16\",\n");
  REQUIRE(at != std::string::npos);
  legacy.erase(at, std::string("  \"precision\": \"bf16\",\n").size());
  CHECK(TrainConfig::from_json(legacy).precision == ConvPrecision::fp32);
}

TEST_CASE("a precision the device cannot run (tf32 on the CPU) or an unknown one: one error naming --precision",
          "[train][bf16][errors]") {
  TrainConfig config = tiny_config(fresh_dir("tf32-on-cpu"));
  config.precision = ConvPrecision::tf32;
  REQUIRE_THROWS_WITH(config.validate(), Catch::Contains("--precision tf32") && Catch::Contains("--device cpu"));
  REQUIRE_THROWS_WITH(parse_conv_precision("fp16"), Catch::Contains("--precision") && Catch::Contains("fp16"));
  REQUIRE_THROWS_AS(cpu_backend()->check_precision(ConvPrecision::tf32), ConfigError);
}

TEST_CASE("bad checkpoints: truncated, wrong architecture, missing tensor -> one IoError, nothing changed", "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 3), test = synthetic_split(64, 10, 4);
  const std::string dir = fresh_dir("bad-checkpoints");
  TrainConfig c = tiny_config(dir);
  c.epochs = 1;
  {
    Trainer t(c, train, test, nullptr);
    t.prepare();
    t.run();
  }
  const std::string good = (fs::path(dir) / "last.safetensors").string();
  const std::string original = slurp(good);

  SECTION("truncated") {
    const std::string cut = (fs::path(dir) / "truncated.safetensors").string();
    {
      std::ofstream out(cut, std::ios::binary);
      out << original.substr(0, original.size() / 2);
    }
    Trainer t(c, train, test, nullptr);
    CHECK_THROWS_AS(t.prepare(cut), IoError);
  }
  SECTION("wrong architecture") {
    TrainConfig other = c;
    other.model.groups_first = 2;  // grouped SOC: same flags otherwise
    Trainer t(other, train, test, nullptr);
    CHECK_THROWS_WITH(t.prepare(good), Catch::Contains("architecture"));
  }
  SECTION("missing tensor") {
    Checkpoint k = load_checkpoint(good);
    k.tensors.erase("stage2.block0.conv.weight");
    const std::string broken = (fs::path(dir) / "missing.safetensors").string();
    save_checkpoint(broken, k);
    ModelConfig mc = model_config_from_checkpoint(k, broken);
    LipConvnet model(mc);
    auto before = model.parameters().front().parameter->value.to_vector();
    CHECK_THROWS_WITH(read_model_state(k, broken, model), Catch::Contains("stage2.block0.conv.weight"));
    CHECK(model.parameters().front().parameter->value.to_vector() == before);  // validated before any copy
  }
  SECTION("a fresh run refuses an output directory that already holds one") {
    Trainer t(c, train, test, nullptr);
    CHECK_THROWS_WITH(t.prepare(), Catch::Contains("--resume"));
  }
  CHECK((slurp(good) == original));  // the run's checkpoint is untouched by every failure
}

TEST_CASE("an output directory that cannot be created fails before training", "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 3), test = synthetic_split(64, 10, 4);
  const std::string dir = fresh_dir("not-a-directory");
  fs::create_directories(fs::path(dir).parent_path());
  { std::ofstream(dir) << "a file"; }
  TrainConfig c = tiny_config((fs::path(dir) / "run").string());
  Trainer t(c, train, test, nullptr);
  CHECK_THROWS_AS(t.prepare(), IoError);
  CHECK(slurp(dir) == "a file");
}

TEST_CASE("a non-finite loss stops training with a clear message and keeps the last good checkpoint", "[train][errors]") {
  // 2 steps per epoch, 6 in all: the lr schedule keeps 1e38 / 1e37 in epoch 2, which overflows the parameters
  // (the layers normalize M by its spectral norm, so the loss itself may stay finite until the floats are inf).
  CifarSplit train = synthetic_split(128, 10, 5), test = synthetic_split(64, 10, 6);
  const std::string dir = fresh_dir("diverge");
  TrainConfig c = tiny_config(dir);
  c.epochs = 3;
  {
    Trainer t(c, train, test, nullptr);
    t.prepare();
    t.run(1);
  }
  const std::string last = (fs::path(dir) / "last.safetensors").string();
  const std::string good = slurp(last);
  TrainConfig wild = c;
  wild.lr = 1e38;  // the updates overflow the parameters to inf within a few steps; the loss turns NaN
  Trainer t(wild, train, test, nullptr);
  t.prepare(last);
  CHECK_THROWS_WITH(t.run(), Catch::Contains("non-finite") && Catch::Contains("last.safetensors"));
  CHECK((slurp(last) == good));
  Checkpoint k = load_checkpoint(last);
  CHECK(k.metadata.at("train.epoch") == "1");
}

#ifdef ORTHOCONV_CLI_PATH
using orthoconv::testing::run_cli;

TEST_CASE("train / certify / model-info: bad flags and values give one line and a non-zero exit", "[train][cli]") {
  const std::string missing = fresh_dir("cli-missing");
  const std::string cases[] = {
      "train --no-such-flag",
      "train --conv dense",
      "train --groups 4,x",
      "train --depth 12 --data /nonexistent",
      "train --data /nonexistent/cifar --out " + missing,
      "train --head soft",
      "certify --checkpoint /nonexistent.safetensors",
      "certify",
      "model-info --depth 7",
      "model-info --conv soc --groups 4,1",
  };
  for (const std::string& args : cases) {
    Result r = run_cli(args);
    INFO("orthoconv " << args << "\nexit " << r.exit_code << "\nstderr: " << r.err << "\nstdout: " << r.out);
    CHECK(r.exit_code != 0);
    CHECK(r.exit_code < 128);
    CHECK(orthoconv::testing::line_count(r.err) == 1);
  }
  CHECK_FALSE(fs::exists(fs::path(missing) / "last.safetensors"));
}

TEST_CASE("model-info --json gives the paper's GS-SOC (4,1) count", "[train][cli]") {
  Result r = run_cli("model-info --conv gs-soc --groups 4,1 --depth 15 --classes 100 --json");
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("\"parameters\":8905060") != std::string::npos);
}
TEST_CASE("train --precision bf16 on a CPU without AVX512-BF16 (DNNL_MAX_CPU_ISA=AVX512_CORE) fails with one line "
          "naming --precision, before writing anything", "[train][cli][bf16]") {
  const std::string out = fresh_dir("cli-no-bf16");
  ::setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE", 1);  // read by the child's oneDNN; this process's ISA is fixed already
  Result r = run_cli("train --precision bf16 --depth 5 --width 8 --epochs 1 --out " + out);
  Result bench = run_cli("bench train --precision fp32,bf16 --depth 5 --steps 1");
  ::unsetenv("DNNL_MAX_CPU_ISA");
  for (const Result& x : {r, bench}) {
    INFO("exit " << x.exit_code << "\nstderr: " << x.err);
    CHECK(x.exit_code != 0);
    CHECK(x.exit_code < 128);
    CHECK(orthoconv::testing::line_count(x.err) == 1);
    CHECK(x.err.find("--precision bf16") != std::string::npos);
    CHECK(x.err.find("AVX512-BF16") != std::string::npos);
  }
  CHECK_FALSE(fs::exists(fs::path(out) / "config.json"));
  Result tf32 = run_cli("train --precision tf32 --out " + out);
  CHECK(tf32.exit_code != 0);
  CHECK(tf32.err.find("--precision tf32") != std::string::npos);
}
#endif
