// Training: the backend's cross-entropy and SGD primitives against their formulas, the per-iteration lr
// schedule, the certificate regularizer's gradient, bit-exact --resume, and every bad input of the issue (truncated
// checkpoint, wrong architecture, missing tensor, unwritable output, unknown flag or value, non-finite loss),
// each failing with one clear message and leaving what was written intact.
#include <catch2/catch.hpp>

#include "cli_helpers.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/certify.hpp"
#include "orthoconv/runtime.hpp"
#include "orthoconv/trainer.hpp"
#include "reference.hpp"

using namespace orthoconv;
using orthoconv::testing::synthetic_split;
namespace fs = std::filesystem;

namespace {

std::string fresh_dir(const std::string& name) {
  static const orthoconv::testing::TempDir base;  // removed, with every run directory in it, at exit
  const fs::path dir = base.path / name;
  fs::remove_all(dir);
  fs::create_directories(dir.parent_path());
  return dir.string();
}

TrainConfig tiny_config(const std::string& out) {
  TrainConfig c;
  // Plain SOC (1 group) of width 8: every channel count is a multiple of 16, so every convolution of this tiny
  // net has a JIT kernel in oneDNN 2.6 and the suite stays fast; the grouped layers are covered by test_model.cpp.
  c.model.conv = ConvKind::soc;
  c.model.groups = GroupCounts{1, std::nullopt};
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

// A fresh run of `config` (stop_after: as Trainer::run), its trainer gone at return (the directory unlocked).
void train_fresh(const TrainConfig& config, const CifarSplit& train, const CifarSplit& test, int64_t stop_after = 0) {
  Trainer t(config, train, test, nullptr);
  t.prepare();
  t.run(stop_after);
}

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
    const double numeric = (reference_loss(up) - reference_loss(down)) / (static_cast<double>(up[i]) - down[i]) /
                           static_cast<double>(batch);
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
  mc.conv = ConvKind::soc;
  mc.groups = GroupCounts{1, std::nullopt};
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

TEST_CASE(
    "bf16 training is recorded in config.json, every metrics line and the checkpoint, resume keeps it, "
    "evaluation runs float32",
    "[train][bf16]") {
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
  {
    Trainer refused(other, train, test, nullptr);  // holds the run directory's lock until it is gone
    REQUIRE_THROWS_WITH(refused.prepare((fs::path(dir) / "last.safetensors").string()),
                        Catch::Contains("resume: precision differs from the checkpoint's (bf16)"));
  }
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

TEST_CASE("write_training_state and read_training_state are one format: what is written reads back the same",
          "[train][checkpoint]") {
  TrainingState state;
  state.config = tiny_config(fresh_dir("training-state"));
  state.config.model.seed = state.config.seed;
  state.epochs_done = 2;
  state.step = 11;
  state.progress.steps = 3;
  state.progress.loss_sum = 12.5;
  state.progress.correct = 7;
  state.progress.images = 24;
  state.progress.seconds = 0.25;
  state.best_metric = 0.375;
  state.best_epoch = 1;
  for (int64_t epoch = 1; epoch <= 2; ++epoch) {
    EpochMetrics m;
    m.epoch = epoch;
    m.step = 4 * epoch;
    m.lr = 0.1 / static_cast<double>(epoch);
    m.train_loss = 4.5 - static_cast<double>(epoch);
    m.evaluated = epoch == 2;
    m.test_accuracy = 0.125;
    m.certified[36] = 0.0625;
    state.history.push_back(m);
  }
  Checkpoint c;
  write_training_state(state, c);
  const TrainingState back = read_training_state(c, "memory");
  CHECK(back.config.to_json() == state.config.to_json());
  CHECK(back.epochs_done == state.epochs_done);
  CHECK(back.step == state.step);
  CHECK(back.progress.steps == state.progress.steps);
  CHECK(back.progress.loss_sum == state.progress.loss_sum);
  CHECK(back.progress.correct == state.progress.correct);
  CHECK(back.progress.images == state.progress.images);
  CHECK(back.progress.seconds == state.progress.seconds);
  CHECK(back.best_metric == state.best_metric);
  CHECK(back.best_epoch == state.best_epoch);
  REQUIRE(back.history.size() == state.history.size());
  for (size_t i = 0; i < back.history.size(); ++i) CHECK(back.history[i].json() == state.history[i].json());
  // At an epoch's end there is no progress to record, and none is read back.
  state.progress = EpochProgress{};
  Checkpoint at_end;
  write_training_state(state, at_end);
  CHECK(at_end.metadata.count("train.epoch_progress") == 0);
  CHECK(read_training_state(at_end, "memory").progress.steps == 0);
}

TEST_CASE("TrainConfig errors name the setting by its config.json key, and the caller may write it under its own name",
          "[train][errors]") {
  TrainConfig c = tiny_config(fresh_dir("setting-names"));
  c.weight_decay = -1;
  try {
    c.validate();
    FAIL("a negative weight decay was accepted");
  } catch (const SettingError& e) {
    CHECK(std::string(e.what()) == "weight_decay must be >= 0, got -1");
    CHECK(e.settings() == std::vector<std::string>{"weight_decay"});
    CHECK(e.message([](const std::string& key) { return "<" + key + ">"; }) == "<weight_decay> must be >= 0, got -1");
  }
  c.weight_decay = 0;
  c.gamma = 1;
  c.model.head = HeadKind::lln;
  try {
    c.validate();
    FAIL("gamma with an lln head was accepted");
  } catch (const SettingError& e) {
    CHECK(std::string(e.what()) == "gamma (certificate regularization) needs head soc");
    CHECK(e.message([](const std::string& key) { return key == "gamma" ? "G" : "H"; }) ==
          "G (certificate regularization) needs H soc");
  }
  // Devices: one parse/name pair.
  for (Device d : {Device::cpu, Device::cuda}) CHECK(parse_device(device_name(d)) == d);
  CHECK_THROWS_AS(parse_device("gpu"), SettingError);
  CHECK_THROWS_WITH(parse_device("gpu"), "device must be 'cpu' or 'cuda', got 'gpu'");
}

TEST_CASE("a precision the device cannot run (tf32 on the CPU) or an unknown one: one error naming the precision",
          "[train][bf16][errors]") {
  TrainConfig config = tiny_config(fresh_dir("tf32-on-cpu"));
  config.precision = ConvPrecision::tf32;
  // The library names the settings (the command line writes them as --precision, --device: test_cli.cpp).
  REQUIRE_THROWS_WITH(config.validate(), Catch::StartsWith("precision tf32 is a CUDA tensor-core format") &&
                                             Catch::Contains("with device cpu use precision fp32 or bf16"));
  REQUIRE_THROWS_WITH(parse_conv_precision("fp16"), Catch::StartsWith("precision must be") && Catch::Contains("fp16"));
  REQUIRE_THROWS_AS(cpu_backend()->check_precision(ConvPrecision::tf32), ConfigError);
}

TEST_CASE("bad checkpoints: truncated, wrong architecture, missing tensor -> one IoError, nothing changed",
          "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 3), test = synthetic_split(64, 10, 4);
  const std::string dir = fresh_dir("bad-checkpoints");
  TrainConfig c = tiny_config(dir);
  c.epochs = 1;
  train_fresh(c, train, test);
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
    other.model.groups = GroupCounts{2, std::nullopt};  // grouped SOC: same flags otherwise
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
    CHECK_THROWS_WITH(t.prepare(), Catch::Contains("pass resume ") && !Catch::Contains("--"));
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

TEST_CASE("a non-finite loss stops training with a clear message and keeps the last good checkpoint",
          "[train][errors]") {
  // 2 steps per epoch, 6 in all: the lr schedule keeps 1e38 / 1e37 in epoch 2, which overflows the parameters
  // (the layers normalize M by its spectral norm, so the loss itself may stay finite until the floats are inf).
  CifarSplit train = synthetic_split(128, 10, 5), test = synthetic_split(64, 10, 6);
  const std::string dir = fresh_dir("diverge");
  TrainConfig c = tiny_config(dir);
  c.epochs = 3;
  train_fresh(c, train, test, 1);
  const std::string last = (fs::path(dir) / "last.safetensors").string();
  const std::string good = slurp(last);
  TrainConfig wild = c;
  wild.lr = 1e38;  // the updates overflow the parameters to inf within a few steps; the loss turns NaN
  Trainer t(wild, train, test, nullptr);
  t.prepare(last);
  CHECK_THROWS_WITH(
      t.run(), Catch::Contains("non-finite") && Catch::Contains("last good checkpoint is kept: " + last + " (step 2)"));
  CHECK((slurp(last) == good));
  Checkpoint k = load_checkpoint(last);
  CHECK(k.metadata.at("train.epoch") == "1");
}

// ---------------------------------------------------------------------------------------------------------------
// Interrupts, run directories, corrupt values (issue 13)

namespace {

// A stop request that answers true at its n-th poll (polls: after each training step, before an epoch's
// evaluation, after each evaluation batch, after an epoch's saves).
std::function<bool()> stop_at_poll(int n) {
  auto polls = std::make_shared<int>(0);
  return [polls, n] { return ++*polls == n; };
}

void check_same_models(Trainer& a, Trainer& b) {
  auto pa = a.model().parameters(), pb = b.model().parameters();
  REQUIRE(pa.size() == pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i].name);
    CHECK((values_of(pa[i].parameter->value) == values_of(pb[i].parameter->value)));  // (( )): no 1e5-float dump
  }
  auto ba = a.model().buffers(), bb = b.model().buffers();
  for (size_t i = 0; i < ba.size(); ++i) CHECK((values_of(*ba[i].tensor) == values_of(*bb[i].tensor)));
  auto sa = a.model().soc_layers(), sb = b.model().soc_layers();
  for (size_t i = 0; i < sa.size(); ++i) CHECK(sa[i].soc->step() == sb[i].soc->step());
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// Metrics lines without the wall-clock fields, for comparing runs.
std::string without_wall_time(const std::string& jsonl) {
  std::string out;
  for (const std::string& line : lines_of(jsonl)) {
    nlohmann::json j = nlohmann::json::parse(line);
    j.erase("seconds");
    j.erase("images_per_second");
    out += j.dump() + "\n";
  }
  return out;
}

}  // namespace

TEST_CASE("a stop request mid-epoch, before, during and after the evaluation: each resume continues bit for bit",
          "[train][resume][interrupt]") {
  CifarSplit train = synthetic_split(320, 10, 11), test = synthetic_split(64, 10, 12);
  const std::string a = fresh_dir("stop-straight"), b = fresh_dir("stop-interrupted");
  TrainConfig ca = tiny_config(a), cb = tiny_config(b);
  ca.val_split = cb.val_split = 64;  // 4 steps per epoch; evaluation: 1 test batch, 1 validation batch
  Trainer straight(ca, train, test, nullptr);
  straight.prepare();
  straight.run();

  const std::string last = (fs::path(b) / "last.safetensors").string();
  // Polls per epoch: 4 steps, 1 before the evaluation, 1 test batch, 1 validation batch, 1 after the saves.
  struct Session {
    int poll;
    int64_t epochs_done, steps_in_epoch;
  };
  const Session sessions[] = {
      {2, 0, 2},  // after step 2 of epoch 1: a checkpoint in the middle of the epoch
      {3, 0, 4},  // steps 3, 4, then before the evaluation: every step done, the evaluation pending
      {2, 0, 4},  // before the evaluation (not stopped), then during the test evaluation
      {3, 0, 4},  // during the validation evaluation
      {4, 1, 0},  // after epoch 1's saves: stopped at the end of the epoch
      {1, 1, 1},  // after step 1 of epoch 2
  };
  bool first = true;
  for (const Session& s : sessions) {
    INFO("session stopping at poll " << s.poll);
    Trainer t(cb, train, test, nullptr);
    t.set_stop_request(stop_at_poll(s.poll));
    t.prepare(first ? "" : last);
    first = false;
    t.run();
    CHECK(t.interrupted());
    CHECK(t.epochs_done() == s.epochs_done);
    CHECK(t.progress().steps == s.steps_in_epoch);
    Checkpoint k = load_checkpoint(last);
    CHECK(k.metadata.at("train.epoch") == std::to_string(s.epochs_done));
    CHECK(k.metadata.at("train.step") == std::to_string(s.epochs_done * 4 + s.steps_in_epoch));
    CHECK(k.metadata.count("train.epoch_progress") == (s.steps_in_epoch > 0 ? 1u : 0u));
    // The logs never report an epoch that has no checkpoint.
    CHECK(lines_of(slurp((fs::path(b) / "metrics.jsonl").string())).size() == static_cast<size_t>(s.epochs_done));
  }
  Trainer resumed(cb, train, test, nullptr);
  resumed.prepare(last);
  resumed.run();
  CHECK_FALSE(resumed.interrupted());
  REQUIRE(resumed.epochs_done() == 2);
  check_same_models(straight, resumed);
  REQUIRE(resumed.history().size() == 2);
  for (size_t e = 0; e < 2; ++e) {
    INFO("epoch " << e + 1);
    const EpochMetrics &x = straight.history()[e], &y = resumed.history()[e];
    CHECK(x.train_loss == y.train_loss);
    CHECK(x.train_accuracy == y.train_accuracy);
    CHECK(x.lr == y.lr);
    CHECK(x.test_loss == y.test_loss);
    CHECK(x.certified == y.certified);
    CHECK(x.val_certified == y.val_certified);
  }
  for (const char* file : {"last.safetensors", "best.safetensors"}) {
    INFO(file);
    Checkpoint ka = load_checkpoint((fs::path(a) / file).string());
    Checkpoint kb = load_checkpoint((fs::path(b) / file).string());
    REQUIRE(ka.tensors.size() == kb.tensors.size());
    for (auto& [name, t] : ka.tensors) {
      INFO(name);
      CHECK((t.values == kb.tensors.at(name).values));
    }
  }
  CHECK(without_wall_time(slurp((fs::path(a) / "metrics.jsonl").string())) ==
        without_wall_time(slurp((fs::path(b) / "metrics.jsonl").string())));
}

TEST_CASE("a second trainer on the same output directory is refused while the first holds it", "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 13), test = synthetic_split(64, 10, 14);
  const std::string dir = fresh_dir("locked");
  TrainConfig c = tiny_config(dir);
  c.epochs = 1;
  {
    Trainer first(c, train, test, nullptr);
    first.prepare();
    Trainer second(c, train, test, nullptr);
    CHECK_THROWS_WITH(second.prepare(), Catch::Contains("in use by another training run") &&
                                            Catch::Contains("pid " + std::to_string(::getpid())));
    first.run();
  }
  // Released with the first trainer: the run can be resumed (and its one epoch is all there is to do).
  Trainer again(c, train, test, nullptr);
  CHECK_NOTHROW(again.prepare((fs::path(dir) / "last.safetensors").string()));
}

TEST_CASE("resuming run A into an output directory that holds run B is refused and B stays intact", "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 15), test = synthetic_split(64, 10, 16);
  const std::string run_a = fresh_dir("run-a"), run_b = fresh_dir("run-b"), empty = fresh_dir("run-c");
  TrainConfig ca = tiny_config(run_a), cb = tiny_config(run_b);
  ca.epochs = cb.epochs = 1;
  cb.seed = 7;
  train_fresh(ca, train, test);
  train_fresh(cb, train, test);
  const std::string b_last = (fs::path(run_b) / "last.safetensors").string();
  const std::string before = slurp(b_last);
  TrainConfig into_b = ca;
  into_b.out_dir = run_b;
  into_b.epochs = 2;
  Trainer t(into_b, train, test, nullptr);
  CHECK_THROWS_WITH(t.prepare((fs::path(run_a) / "last.safetensors").string()),
                    Catch::Contains("already holds another run") && Catch::Contains(run_b));
  CHECK((slurp(b_last) == before));
  // Into an empty directory it continues A there.
  TrainConfig into_c = ca;
  into_c.out_dir = empty;
  into_c.epochs = 2;
  Trainer c(into_c, train, test, nullptr);
  c.prepare((fs::path(run_a) / "last.safetensors").string());
  c.run();
  CHECK(c.epochs_done() == 2);
}

TEST_CASE("the temporary files of interrupted saves are removed at the next start, and only those", "[train]") {
  CifarSplit train = synthetic_split(64, 10, 17), test = synthetic_split(64, 10, 18);
  const std::string dir = fresh_dir("stale");
  fs::create_directories(dir);
  const std::vector<std::string> stale = {"last.safetensors.tmp-4242", "metrics.jsonl.tmp-17", "config.json.tmp-1"};
  const std::vector<std::string> kept = {"notes.txt.tmp-4242", "last.safetensors.tmp-x1", "plot.png"};
  for (const auto& name : stale) std::ofstream(fs::path(dir) / name) << "half a file";
  for (const auto& name : kept) std::ofstream(fs::path(dir) / name) << "not ours";
  TrainConfig c = tiny_config(dir);
  c.epochs = 1;
  Trainer t(c, train, test, nullptr);
  t.prepare();
  for (const auto& name : stale) CHECK_FALSE(fs::exists(fs::path(dir) / name));
  for (const auto& name : kept) CHECK(fs::exists(fs::path(dir) / name));
}

TEST_CASE("the checkpoint is written before the metrics logs, and a resume rewrites the logs from it",
          "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 19), test = synthetic_split(64, 10, 20);
  const std::string dir = fresh_dir("metrics-order");
  TrainConfig c = tiny_config(dir);
  c.epochs = 2;
  fs::create_directories(fs::path(dir) / "metrics.jsonl");  // the log cannot be written
  {
    Trainer t(c, train, test, nullptr);
    t.prepare();
    CHECK_THROWS_AS(t.run(), IoError);
  }
  const std::string last = (fs::path(dir) / "last.safetensors").string();
  REQUIRE(fs::exists(last));  // the epoch was saved before its log failed
  CHECK(load_checkpoint(last).metadata.at("train.epoch") == "1");
  // A log that disagrees with the checkpoint (as after a crash between the two) is rewritten on resume.
  fs::remove(fs::path(dir) / "metrics.jsonl");
  std::ofstream(fs::path(dir) / "metrics.jsonl") << "{\"epoch\":1}\n{\"epoch\":2}\n{\"epoch\":3}\n";
  Trainer t(c, train, test, nullptr);
  t.prepare(last);
  const auto lines = lines_of(slurp((fs::path(dir) / "metrics.jsonl").string()));
  REQUIRE(lines.size() == 1);
  CHECK(lines[0] == t.history()[0].json());
}

TEST_CASE("a checkpoint holding NaN, an infinity or a huge value is refused naming the file and the tensor",
          "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 21), test = synthetic_split(64, 10, 22);
  const std::string dir = fresh_dir("corrupt-values");
  TrainConfig c = tiny_config(dir);
  c.epochs = 2;
  train_fresh(c, train, test, 1);
  const std::string good = (fs::path(dir) / "last.safetensors").string();
  struct Case {
    std::string tensor;
    float value;
    std::string problem;
  };
  const Case cases[] = {
      {"head.bias", std::numeric_limits<float>::quiet_NaN(), "NaN at index 3"},
      {"head.bias", std::numeric_limits<float>::infinity(), "an infinity at index 3"},
      {"stage1.block0.conv.weight", std::numeric_limits<float>::quiet_NaN(), "NaN at index 3"},
      {"stage1.block0.conv.weight", 3e38f, "too large for float32"},
      {"stage1.block0.conv.u1", -std::numeric_limits<float>::infinity(), "an infinity"},
      {"optimizer.momentum.head.weight", std::numeric_limits<float>::quiet_NaN(), "NaN"},
  };
  for (const Case& k : cases) {
    INFO(k.tensor << " = " << k.value);
    Checkpoint broken = load_checkpoint(good);
    REQUIRE(broken.tensors.count(k.tensor) == 1);
    broken.tensors.at(k.tensor).values.at(3) = k.value;
    const std::string path = (fs::path(dir) / "broken.safetensors").string();
    save_checkpoint(path, broken);
    const std::string out = fresh_dir("corrupt-resume");
    TrainConfig resume = c;
    resume.out_dir = out;
    Trainer t(resume, train, test, nullptr);
    try {
      t.prepare(path);
      FAIL("the checkpoint was accepted");
    } catch (const IoError& e) {
      const std::string message = e.what();
      CHECK(message.find(path) != std::string::npos);
      CHECK(message.find("'" + k.tensor + "'") != std::string::npos);
      CHECK(message.find(k.problem) != std::string::npos);
      CHECK(message.find("smaller lr") == std::string::npos);  // not blamed on the learning rate
    }
    if (k.tensor.rfind("optimizer.", 0) != 0) {  // evaluation tools read the model state the same way
      ModelConfig mc = model_config_from_checkpoint(broken, path);
      mc.init_iterations = 0;
      LipConvnet model(mc);
      CHECK_THROWS_WITH(read_model_state(broken, path, model), Catch::Contains(k.tensor) && Catch::Contains(path));
    }
  }
}

TEST_CASE("crafted training state in a checkpoint is refused naming the file and the key", "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 23), test = synthetic_split(64, 10, 24);
  const std::string dir = fresh_dir("crafted-state");
  TrainConfig c = tiny_config(dir);
  c.epochs = 3;
  train_fresh(c, train, test, 1);
  const std::string good = (fs::path(dir) / "last.safetensors").string();
  const Checkpoint original = load_checkpoint(good);
  nlohmann::json config = nlohmann::json::parse(original.metadata.at("train.config"));
  auto with_config = [&](const char* key, nlohmann::json value) {
    nlohmann::json j = config;
    j[key] = value;
    return j.dump();
  };
  struct Case {
    std::string key, value, expected;
  };
  const Case cases[] = {
      {"train.epoch", "99999999999999999999", "train.epoch"},
      {"train.epoch", "-1", "train.epoch"},
      {"train.step", "7", "inconsistent training state"},
      {"train.epoch", "2", "train.history"},
      {"train.best_epoch", "5", "train.best_epoch"},
      {"train.best_metric", "nan", "train.best_metric"},
      {"optimizer.steps", "1e3", "optimizer.steps"},
      {"train.epoch_progress", "{\"steps\":9,\"loss_sum\":1,\"correct\":1,\"images\":9,\"seconds\":0}",
       "inconsistent training state"},
      {"train.epoch_progress", "{\"steps\":1,\"loss_sum\":1,\"correct\":5,\"images\":2,\"seconds\":0}",
       "train.epoch_progress"},
      {"train.config", with_config("epochs", 1e300), "'epochs'"},
      {"train.config", with_config("width", 2.5), "'width'"},
      {"train.config", with_config("groups", "x"), "'groups'"},
      {"train.config", with_config("threads", 100000), "threads 100000 is more than"},  // the setting, not a flag
      {"model.width", "100000", "memory"},
      {"model.classes", "1000000", "memory"},
      {"model.depth", "99999999999999999995", "model.depth"},
      {"model.groups", "x,1", "model.groups"},
      {"series.eval_terms", "4294967301", "series.eval_terms"},
      {"model.seed", "-1", "model.seed"},
  };
  for (const Case& k : cases) {
    INFO(k.key << " = " << k.value);
    Checkpoint crafted = original;
    crafted.metadata[k.key] = k.value;
    const std::string path = (fs::path(dir) / "crafted.safetensors").string();
    save_checkpoint(path, crafted);
    TrainConfig resume = c;
    resume.out_dir = fresh_dir("crafted-resume");
    Trainer t(resume, train, test, nullptr);
    try {
      t.prepare(path);
      FAIL("the crafted checkpoint was accepted");
    } catch (const Error& e) {
      const std::string message = e.what();
      CHECK(message.find(path) != std::string::npos);
      CHECK(message.find(k.expected) != std::string::npos);
      CHECK(message.find("stoll") == std::string::npos);
    }
  }
}

TEST_CASE("sizes and thread counts beyond what the machine can hold are refused before anything is allocated",
          "[train][errors]") {
  CifarSplit train = synthetic_split(64, 10, 25), test = synthetic_split(64, 10, 26);
  TrainConfig c = tiny_config(fresh_dir("limits"));
  c.threads = max_thread_count() + 1;
  CHECK_THROWS_WITH(c.validate(),
                    Catch::StartsWith("threads " + std::to_string(c.threads)) && Catch::Contains("processors"));
  CHECK_THROWS_AS(set_thread_count(100000), ConfigError);
  CHECK_THROWS_AS(set_thread_count(-1), ConfigError);
  c.threads = 1;
  c.epochs = int64_t{1} << 62;
  CHECK_THROWS_WITH(Trainer(c, train, test, nullptr), Catch::StartsWith("epochs ") && Catch::Contains("2^53"));
  c.epochs = 2;
  c.batch_size = 64;
  c.model.init_channels = 100000;
  CHECK_THROWS_WITH(Trainer(c, train, test, nullptr), Catch::Contains("width 100000") && Catch::Contains("memory"));
  c.model.init_channels = 8;
  c.model.classes = 1000000;
  CHECK_THROWS_WITH(Trainer(c, train, test, nullptr), Catch::Contains("1000000 classes") && Catch::Contains("memory"));
  // The schedule itself refuses step counts it cannot place exactly.
  CHECK_THROWS_AS(scheduled_lr(c, 0, int64_t{1} << 60), ConfigError);
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

namespace {

// A child `orthoconv` process: stdout read line by line through a pipe, stderr into a file.
class CliProcess {
 public:
  CliProcess(const std::vector<std::string>& args, const std::string& err_file) : err_file_(err_file) {
    std::vector<std::string> words{ORTHOCONV_CLI_PATH};
    words.insert(words.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& w : words) argv.push_back(w.data());
    argv.push_back(nullptr);
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {  // only async-signal-safe calls until exec
      ::dup2(fds[1], 1);
      const int err = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (err >= 0) ::dup2(err, 2);
      ::close(fds[0]);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_ = ::fdopen(fds[0], "r");
  }
  ~CliProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      wait();
    }
    if (out_) std::fclose(out_);
  }
  // Reads stdout until a line containing `needle`; false at the end of the output.
  bool wait_for_line(const std::string& needle) {
    char line[1024];
    while (std::fgets(line, sizeof line, out_))
      if (std::string(line).find(needle) != std::string::npos) return true;
    return false;
  }
  // Polls stderr until it contains `needle` (up to 60 s).
  bool wait_for_stderr(const std::string& needle) {
    for (int i = 0; i < 60000; ++i) {
      if (slurp(err_file_).find(needle) != std::string::npos) return true;
      ::usleep(1000);
    }
    return false;
  }
  void signal(int number) { ::kill(pid_, number); }
  // The raw wait status, after draining stdout.
  int wait() {
    char line[1024];
    while (out_ && std::fgets(line, sizeof line, out_)) {
    }
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }
  std::string err() const { return slurp(err_file_); }

 private:
  pid_t pid_ = -1;
  std::FILE* out_ = nullptr;
  std::string err_file_;
};

// A tiny 10-class run on the synthetic dataset: 40 steps per epoch, printed every 4 steps.
std::vector<std::string> tiny_train_args(const std::string& out, int64_t epochs, int64_t batch) {
  return orthoconv::testing::tiny_train_args(out, epochs, batch, 40 * batch, 64);
}

std::string joined(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "'" : " '") + w + "'";
  return out;
}

}  // namespace

TEST_CASE(
    "SIGTERM stops `orthoconv train` after its step with a checkpoint there, the resume equals the "
    "uninterrupted run bit for bit, and a second writer is refused meanwhile",
    "[train][cli][interrupt]") {
  const std::string straight = fresh_dir("cli-straight"), stopped = fresh_dir("cli-stopped");
  Result full = run_cli(joined(tiny_train_args(straight, 1, 8)));
  INFO("uninterrupted: " << full.err);
  REQUIRE(full.exit_code == 0);

  CliProcess run(tiny_train_args(stopped, 1, 8), stopped + ".err");
  REQUIRE(run.wait_for_line("step 8/40"));
  run.signal(SIGSTOP);  // held in the middle of epoch 1, with its directory locked
  Result second = run_cli(joined(tiny_train_args(stopped, 1, 8)));
  CHECK(second.exit_code == 1);
  CHECK(second.err.find("in use by another training run") != std::string::npos);
  CHECK(orthoconv::testing::line_count(second.err) == 1);
  run.signal(SIGTERM);
  run.signal(SIGCONT);
  const int status = run.wait();
  INFO("stderr: " << run.err());
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 128 + SIGTERM);
  CHECK(run.err().find("continue with: orthoconv train --resume " + stopped) != std::string::npos);
  const Checkpoint k = load_checkpoint((fs::path(stopped) / "last.safetensors").string());
  CHECK(k.metadata.at("train.epoch") == "0");  // inside epoch 1
  CHECK(k.metadata.count("train.epoch_progress") == 1);

  Result resumed = run_cli("train --resume '" + stopped + "'");
  INFO("resume: " << resumed.err);
  REQUIRE(resumed.exit_code == 0);
  const Checkpoint a = load_checkpoint((fs::path(straight) / "last.safetensors").string());
  const Checkpoint b = load_checkpoint((fs::path(stopped) / "last.safetensors").string());
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (const auto& [name, t] : a.tensors) {
    INFO(name);
    CHECK((t.values == b.tensors.at(name).values));
  }
  CHECK(without_wall_time(slurp((fs::path(straight) / "metrics.jsonl").string())) ==
        without_wall_time(slurp((fs::path(stopped) / "metrics.jsonl").string())));
}

TEST_CASE("a second SIGINT ends `orthoconv train` at once, by the signal, leaving no broken checkpoint",
          "[train][cli][interrupt]") {
  const std::string dir = fresh_dir("cli-twice");
  // Larger batches: a step long enough that the second signal surely comes while the first is being honoured.
  CliProcess run(tiny_train_args(dir, 1, 64), dir + ".err");
  REQUIRE(run.wait_for_line("step 4/40"));
  run.signal(SIGINT);
  REQUIRE(run.wait_for_stderr("finishing the current step"));
  run.signal(SIGINT);
  const int status = run.wait();
  INFO("stderr: " << run.err());
  CHECK(WIFSIGNALED(status));
  CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGINT));
  CHECK(run.err().find("interrupted again: exiting at once") != std::string::npos);
  CHECK_FALSE(fs::exists(fs::path(dir) / "last.safetensors"));  // no step-checkpoint was written
}

TEST_CASE("certify refuses a checkpoint with NaN, an infinity or a huge value, naming file and tensor",
          "[train][cli][errors]") {
  const std::string dir = fresh_dir("cli-corrupt");
  fs::create_directories(dir);
  ModelConfig mc;
  mc.conv = ConvKind::soc;
  mc.groups = GroupCounts{1, std::nullopt};
  mc.depth = 5;
  mc.init_channels = 8;
  mc.classes = 10;
  LipConvnet model(mc);
  Checkpoint good;
  write_model_state(model, Normalization{}, good);
  const std::string data = orthoconv::testing::synthetic_cifar100_dir();
  const std::string good_path = (fs::path(dir) / "good.safetensors").string();
  save_checkpoint(good_path, good);
  Result fine = run_cli("certify --checkpoint '" + good_path + "' --data '" + data + "' --images 32 --json");
  INFO("good checkpoint: " << fine.err);
  REQUIRE(fine.exit_code == 0);
  const std::pair<std::string, float> cases[] = {{"head.bias", std::numeric_limits<float>::quiet_NaN()},
                                                 {"head.bias", std::numeric_limits<float>::infinity()},
                                                 {"stage1.block0.conv.weight", 3e38f}};
  for (const auto& [tensor, value] : cases) {
    Checkpoint broken = good;
    broken.tensors.at(tensor).values.at(1) = value;
    const std::string path = (fs::path(dir) / "broken.safetensors").string();
    save_checkpoint(path, broken);
    for (const std::string command : {"certify", "verify"}) {
      Result r = run_cli(command + " --checkpoint '" + path + "' --data '" + data + "' --images 32 --json");
      if (command == "verify") r = run_cli("verify --checkpoint '" + path + "' --json");
      INFO(command << " with " << tensor << " = " << value << "\nstdout: " << r.out << "\nstderr: " << r.err);
      CHECK(r.exit_code == 1);
      CHECK(r.out.empty());
      CHECK(orthoconv::testing::line_count(r.err) == 1);
      CHECK(r.err.find(path) != std::string::npos);
      CHECK(r.err.find("'" + tensor + "'") != std::string::npos);
    }
  }
}

TEST_CASE("train --resume: an architecture flag that differs from the run's is named, and so is a bad config.json",
          "[train][cli][errors]") {
  const std::string dir = fresh_dir("cli-resume-architecture");
  fs::create_directories(dir);
  TrainConfig gs;  // the default: gs-soc (4,1)
  gs.out_dir = dir;
  write_file_atomically((fs::path(dir) / "config.json").string(), gs.to_json());
  write_file_atomically((fs::path(dir) / "last.safetensors").string(), "not read before the flags are checked");
  Result r = run_cli("train --resume '" + dir + "' --conv soc --data /nonexistent");
  INFO("stderr: " << r.err);
  CHECK(r.exit_code == 1);
  CHECK(orthoconv::testing::line_count(r.err) == 1);
  CHECK(r.err.find("--conv \"soc\" differs from the run's \"gs-soc\"") != std::string::npos);
  CHECK(r.err.find("architecture") != std::string::npos);
  // The same value as the run's is fine (the failure is then the missing data).
  r = run_cli("train --resume '" + dir + "' --conv gs-soc --groups 4,1 --data /nonexistent");
  CHECK(r.err.find("differs") == std::string::npos);
  CHECK(r.err.find("/nonexistent") != std::string::npos);

  nlohmann::json bad = nlohmann::json::parse(gs.to_json());
  bad["groups"] = "x,1";
  write_file_atomically((fs::path(dir) / "config.json").string(), bad.dump());
  r = run_cli("train --resume '" + dir + "' --data /nonexistent");
  INFO("stderr: " << r.err);
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("config.json") != std::string::npos);
  CHECK(r.err.find("'groups': expected 'a,b', 'a,-' or 'a'") != std::string::npos);
  CHECK(r.err.find("stoll") == std::string::npos);
}

TEST_CASE("model-info --json gives the paper's GS-SOC (4,1) count", "[train][cli]") {
  Result r = run_cli("model-info --conv gs-soc --groups 4,1 --depth 15 --classes 100 --json");
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("\"parameters\":8905060") != std::string::npos);
}
TEST_CASE(
    "train --precision bf16 on a CPU without AVX512-BF16 (DNNL_MAX_CPU_ISA=AVX512_CORE) fails with one line "
    "naming --precision, before writing anything",
    "[train][cli][bf16]") {
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
