// The training loop: configuration, schedule, SGD, one training step, epochs with evaluation, metrics logs and
// checkpoints (atomic), exact resume. See include/orthoconv/trainer.hpp.
#include "orthoconv/trainer.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "orthoconv/certify.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/runtime.hpp"

namespace orthoconv {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The files a trainer writes in its output directory (atomically, through "<name>.tmp-<pid>").
const std::vector<std::string> kRunFiles = {"last.safetensors", "best.safetensors", "metrics.jsonl", "metrics.csv",
                                            "config.json"};
constexpr const char* kLockFile = "train.lock";

// Strict JSON field readers: an integer must be a JSON integer within [min, max] (nlohmann's get<int64_t> would
// truncate 1e300 or 2.5 silently), a number finite. ConfigError naming the key otherwise.
int64_t json_integer(const json& value, const std::string& key, int64_t min, int64_t max) {
  int64_t out = 0;
  bool ok = false;
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    ok = u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    out = ok ? static_cast<int64_t>(u) : 0;
  } else if (value.is_number_integer()) {
    out = value.get<int64_t>();
    ok = true;
  }
  if (!ok || out < min || out > max)
    throw ConfigError("'" + key + "' must be an integer in " + std::to_string(min) + ".." + std::to_string(max) +
                      ", got " + value.dump());
  return out;
}

int64_t json_int(const json& j, const std::string& key, int64_t min, int64_t max) {
  return json_integer(j.at(key), key, min, max);
}

double json_number(const json& j, const std::string& key) {
  const json& value = j.at(key);
  if (!value.is_number() || !std::isfinite(value.get<double>()))
    throw ConfigError("'" + key + "' must be a finite number, got " + value.dump());
  return value.get<double>();
}

// An optional string setting (absent: `fallback`), e.g. the precision of runs from before --precision existed.
std::string json_string(const json& j, const std::string& key, const std::string& fallback) {
  if (!j.contains(key)) return fallback;
  const json& value = j.at(key);
  if (!value.is_string()) throw ConfigError("'" + key + "' must be a string, got " + value.dump());
  return value.get<std::string>();
}

// `count` finite numbers within float32's range (converting a larger double to float is undefined behaviour).
std::vector<float> json_floats(const json& j, const std::string& key, size_t count) {
  const json& value = j.at(key);
  std::vector<float> out;
  if (value.is_array() && value.size() == count)
    for (const json& x : value)
      if (x.is_number() && std::fabs(x.get<double>()) <= std::numeric_limits<float>::max())
        out.push_back(static_cast<float>(x.get<double>()));
  if (out.size() != count)
    throw ConfigError("'" + key + "' must hold " + std::to_string(count) + " finite float32 numbers, got " +
                      value.dump());
  return out;
}

uint64_t json_uint64(const json& j, const std::string& key) {
  const json& value = j.at(key);
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer() && value.get<int64_t>() >= 0) return static_cast<uint64_t>(value.get<int64_t>());
  throw ConfigError("'" + key + "' must be a non-negative integer, got " + value.dump());
}

constexpr int64_t kLargest = std::numeric_limits<int64_t>::max();
constexpr int64_t kIntMax = std::numeric_limits<int>::max();

}  // namespace

// ---------------------------------------------------------------- configuration

void TrainConfig::validate() const {
  model.validate();
  require(epochs > 0, "--epochs must be positive, got ", epochs);
  require(batch_size > 0, "--batch must be positive, got ", batch_size);
  require(std::isfinite(lr) && lr > 0, "--lr must be positive, got ", lr);
  require(std::isfinite(momentum) && momentum >= 0 && momentum < 1, "--momentum must be in [0, 1), got ", momentum);
  require(std::isfinite(weight_decay) && weight_decay >= 0, "--weight-decay must be >= 0, got ", weight_decay);
  require(std::isfinite(lr_decay) && lr_decay > 0, "--lr-decay must be positive, got ", lr_decay);
  for (double m : milestones)
    require(m > 0 && m <= 1, "--milestones must be fractions in (0, 1], got ", m);
  require(std::isfinite(gamma) && gamma >= 0, "--gamma must be >= 0, got ", gamma);
  require(gamma == 0 || model.head == "soc", "--gamma (certificate regularization) needs --head soc");
  require(train_subset >= 0, "--train-subset must be >= 0, got ", train_subset);
  require(val_split >= 0, "--val-split must be >= 0, got ", val_split);
  require(test_subset >= 0, "--test-subset must be >= 0, got ", test_subset);
  require(eval_every > 0, "--eval-every must be positive, got ", eval_every);
  require(eval_batch > 0, "evaluation batch must be positive, got ", eval_batch);
  require(!eps.empty(), "--eps needs at least one value");
  for (int e : eps) require(e >= 0, "--eps values must be non-negative numerators over 255, got ", e);
  require(device == "cpu" || device == "cuda", "--device must be 'cpu' or 'cuda', got '", device, "'");
  require(precision != ConvPrecision::tf32 || device == "cuda", "--precision tf32 is a CUDA tensor-core format; "
          "with --device cpu use --precision fp32 or bf16");
  require_thread_count(threads);
  for (int i = 0; i < 3; ++i)
    require(normalization.std[i] > 0 && std::isfinite(normalization.std[i]), "--std values must be positive");
}

std::string TrainConfig::to_json() const {
  json j;
  j["conv"] = model.conv;
  j["groups"] = model.groups_text();
  j["depth"] = model.depth;
  j["width"] = model.init_channels;
  j["classes"] = model.classes;
  j["activation"] = model.activation;
  j["head"] = model.head;
  j["downsample_keep"] = keep_name(model.keep);
  j["train_terms"] = model.train_terms;
  j["eval_terms"] = model.eval_terms;
  j["power_schedule"] = model.power_schedule.str();
  j["architecture"] = model.architecture();
  j["mean"] = std::vector<float>(normalization.mean.begin(), normalization.mean.end());
  j["std"] = std::vector<float>(normalization.std.begin(), normalization.std.end());
  j["data"] = data_dir;
  j["out"] = out_dir;
  j["device"] = device;
  j["precision"] = conv_precision_name(precision);
  j["epochs"] = epochs;
  j["batch"] = batch_size;
  j["lr"] = lr;
  j["momentum"] = momentum;
  j["weight_decay"] = weight_decay;
  j["lr_decay"] = lr_decay;
  j["milestones"] = milestones;
  j["gamma"] = gamma;
  j["train_subset"] = train_subset;
  j["val_split"] = val_split;
  j["test_subset"] = test_subset;
  j["eval_every"] = eval_every;
  j["eps"] = eps;
  j["seed"] = seed;
  j["threads"] = threads;
  return j.dump(2) + "\n";
}

TrainConfig TrainConfig::from_json(const std::string& text) {
  TrainConfig c;
  try {
    json j = json::parse(text);
    c.model.conv = j.at("conv").get<std::string>();
    const GroupCounts groups = parse_groups(j.at("groups").get<std::string>(), "'groups'");
    c.model.groups_first = groups.first;
    c.model.groups_second = groups.second;
    c.model.depth = json_int(j, "depth", 5, kMaxDepth);
    c.model.init_channels = json_int(j, "width", 1, kLargest);
    c.model.classes = json_int(j, "classes", 2, kLargest);
    c.model.activation = j.at("activation").get<std::string>();
    c.model.head = j.at("head").get<std::string>();
    c.model.keep = parse_keep(j.at("downsample_keep").get<std::string>());
    c.model.train_terms = static_cast<int>(json_int(j, "train_terms", 1, kMaxSeriesTerms));
    c.model.eval_terms = static_cast<int>(json_int(j, "eval_terms", 1, kMaxSeriesTerms));
    // Absent in configurations written before the setting existed: the reference's schedule.
    if (j.contains("power_schedule"))
      c.model.power_schedule = PowerSchedule::parse(j.at("power_schedule").get<std::string>());
    const std::vector<float> mean = json_floats(j, "mean", 3), std = json_floats(j, "std", 3);
    for (int i = 0; i < 3; ++i) {
      c.normalization.mean[i] = mean[i];
      c.normalization.std[i] = std[i];
    }
    c.data_dir = j.at("data").get<std::string>();
    c.out_dir = j.at("out").get<std::string>();
    c.device = j.at("device").get<std::string>();
    // Absent in runs from before --precision existed: they trained in float32.
    c.precision = parse_conv_precision(json_string(j, "precision", "fp32"));
    c.epochs = json_int(j, "epochs", 1, kMaxTrainingSteps);
    c.batch_size = json_int(j, "batch", 1, kLargest);
    c.lr = json_number(j, "lr");
    c.momentum = json_number(j, "momentum");
    c.weight_decay = json_number(j, "weight_decay");
    c.lr_decay = json_number(j, "lr_decay");
    c.milestones = j.at("milestones").get<std::vector<double>>();
    c.gamma = json_number(j, "gamma");
    c.train_subset = json_int(j, "train_subset", 0, kLargest);
    c.val_split = json_int(j, "val_split", 0, kLargest);
    c.test_subset = json_int(j, "test_subset", 0, kLargest);
    c.eval_every = json_int(j, "eval_every", 1, kLargest);
    c.eps.clear();
    require(j.at("eps").is_array(), "'eps' must be an array");
    for (const json& e : j.at("eps")) c.eps.push_back(static_cast<int>(json_integer(e, "eps", 0, kIntMax)));
    c.seed = json_uint64(j, "seed");
    c.model.seed = c.seed;
    c.threads = static_cast<int>(json_int(j, "threads", 0, kIntMax));
  } catch (const Error& e) {
    throw ConfigError(std::string("invalid training configuration: ") + e.what());
  } catch (const std::exception& e) {
    throw ConfigError(std::string("invalid training configuration JSON: ") + e.what());
  }
  return c;
}

double scheduled_lr(const TrainConfig& config, int64_t step, int64_t total) {
  require(total > 0 && total <= kMaxTrainingSteps && step >= 0, "scheduled_lr: step ", step, " of ", total,
          " outside 0..", kMaxTrainingSteps);
  double lr = config.lr;
  for (double fraction : config.milestones) {
    // floor(total * fraction) computed exactly for the usual 1/2 and 3/4: (total * k) / d
    const int64_t milestone = fraction == 0.5    ? total / 2
                              : fraction == 0.75 ? (3 * total) / 4
                                                 : static_cast<int64_t>(std::floor(total * fraction));
    if (step >= milestone) lr *= config.lr_decay;
  }
  return lr;
}

// ---------------------------------------------------------------- SGD

Sgd::Sgd(LipConvnet& model) : model_(model), params_(model.parameters()) {
  for (NamedParameter& p : params_) momentum_.emplace_back(p.parameter->value.shape(), model.backend().device());
}

void Sgd::step(float lr, float momentum, float weight_decay) {
  Backend& be = model_.backend();
  for (size_t i = 0; i < params_.size(); ++i) {
    Parameter& p = *params_[i].parameter;
    be.sgd_momentum(p.value.data(), p.grad.data(), momentum_[i].data(), p.value.numel(), lr, momentum,
                    weight_decay, steps_ == 0);
  }
  ++steps_;
}

void Sgd::save(Checkpoint& out) {
  Backend& be = model_.backend();
  for (size_t i = 0; i < params_.size(); ++i) {
    CheckpointTensor t;
    t.shape = momentum_[i].shape().dims();
    t.values.resize(static_cast<size_t>(momentum_[i].numel()));
    be.to_host(momentum_[i].data(), t.values.data(), momentum_[i].numel());
    out.tensors["optimizer.momentum." + params_[i].name] = std::move(t);
  }
  out.metadata["optimizer"] = "sgd-momentum";
  out.metadata["optimizer.steps"] = std::to_string(steps_);
}

void Sgd::load(const Checkpoint& in, const std::string& file) {
  std::vector<const CheckpointTensor*> sources;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string name = "optimizer.momentum." + params_[i].name;
    auto it = in.tensors.find(name);
    if (it == in.tensors.end()) throw IoError("checkpoint " + file + ": missing tensor '" + name + "'");
    if (it->second.shape != momentum_[i].shape().dims() ||
        static_cast<int64_t>(it->second.values.size()) != momentum_[i].numel())
      throw IoError("checkpoint " + file + ": tensor '" + name + "' has shape " + Shape(it->second.shape).str() +
                    ", expected " + momentum_[i].shape().str());
    check_tensor_values(it->second, name, file);
    sources.push_back(&it->second);
  }
  const int64_t count = metadata_int(in, "optimizer.steps", file, 0, kMaxTrainingSteps);
  Backend& be = model_.backend();
  for (size_t i = 0; i < params_.size(); ++i)
    be.from_host(sources[i]->values.data(), momentum_[i].data(), momentum_[i].numel());
  steps_ = count;
}

// ---------------------------------------------------------------- one step

TrainStep::TrainStep(LipConvnet& model, Sgd& optimizer, double gamma, double input_lipschitz,
                     std::shared_ptr<Communicator> communicator)
    : model_(model),
      optimizer_(optimizer),
      gamma_(gamma),
      lipschitz_(input_lipschitz),
      communicator_(communicator ? std::move(communicator) : single_process_communicator()) {
  const Device device = model.backend().device();
  if (device != Device::cpu) {
    device_images_ = Tensor(Shape{1}, device);
    logits_ = Tensor(Shape{1}, device);
    diff_logits_ = Tensor(Shape{1}, device);
    regularizer_ = Tensor(Shape{1}, device);
  }
  if (communicator_->size() > 1) {
    params_ = model.parameters();
    flat_gradient_ = Tensor(Shape{allreduce_floats()}, device);
  }
}

int64_t TrainStep::allreduce_floats() const {
  int64_t total = 0;
  for (const NamedParameter& p : params_) total += p.parameter->value.numel();
  return total;
}

// The gradient of the global batch: every parameter's gradient packed into one flat buffer, one all-reduce (MPI on
// host memory, NCCL on CUDA memory), unpacked. One collective per step rather than one per tensor (~70 for
// LipConvnet-15): the per-call latency is paid once.
void TrainStep::allreduce_gradients() {
  Backend& be = model_.backend();
  float* flat = flat_gradient_.data();
  int64_t offset = 0;
  for (NamedParameter& p : params_) {
    require<ShapeError>(p.parameter->grad.numel() == p.parameter->value.numel(), "all-reduce: the gradient of ",
                        p.name, " has ", p.parameter->grad.numel(), " values for ", p.parameter->value.numel(),
                        " weights");
    be.copy(p.parameter->grad.data(), flat + offset, p.parameter->grad.numel());
    offset += p.parameter->grad.numel();
  }
  communicator_->allreduce_sum(flat, offset, be.device());
  offset = 0;
  for (NamedParameter& p : params_) {
    be.copy(flat + offset, p.parameter->grad.data(), p.parameter->grad.numel());
    offset += p.parameter->grad.numel();
  }
}

StepStats TrainStep::run(const Tensor& images, const std::vector<int32_t>& labels, float lr, float momentum,
                         float weight_decay, int64_t batch_images) {
  Backend& be = model_.backend();
  const int64_t n = images.dim(0), classes = model_.config().classes;
  require<ShapeError>(static_cast<int64_t>(labels.size()) == n, "training step: ", labels.size(),
                      " labels for ", n, " images");
  const int64_t batch = batch_images > 0 ? batch_images : n;  // the global batch
  const bool distributed = communicator_->size() > 1;
  require(distributed ? n > 0 && n <= batch : n == batch, "training step: a part of ", n, " images of a batch of ",
          batch, " on ", communicator_->size(), " rank(s)");
  const Tensor* input = &images;
  if (be.device() != images.device()) {
    device_images_.resize(images.shape());
    be.from_host(images.data(), device_images_.data(), images.numel());
    input = &device_images_;
  }
  model_.forward(*input, logits_);
  diff_logits_.resize(Shape{n, classes});
  StepStats stats;
  stats.images = n;
  be.softmax_cross_entropy(logits_.data(), labels.data(), n, classes, diff_logits_.data(), &stats.loss_sum,
                           &stats.correct);
  using Clock = std::chrono::steady_clock;
  if (distributed) {
    // The global batch's statistics on every rank: a non-finite loss anywhere stops every rank at this step.
    const auto start = Clock::now();
    double sums[3] = {stats.loss_sum, static_cast<double>(stats.correct), static_cast<double>(n)};
    communicator_->allreduce_sum(sums, 3);
    allreduce_seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
    stats.loss_sum = sums[0];
    stats.correct = static_cast<int64_t>(sums[1]);
    stats.images = static_cast<int64_t>(sums[2]);
    require(stats.images == batch, "training step: the ranks' parts hold ", stats.images, " images, the batch ",
            batch);
    // softmax_cross_entropy's gradient is of this part's mean loss: d(global mean)/d logits is n / batch of it.
    if (n != batch) be.axpby(static_cast<float>(n) / static_cast<float>(batch), diff_logits_.data(), 0.0f,
                             diff_logits_.data(), n * classes);
  }
  if (!std::isfinite(stats.loss_sum)) return stats;  // the caller stops; nothing is updated

  if (gamma_ > 0) {
    // -gamma * mean relu(r), r = (f_y - f_j*) / (sqrt2 L): d/df_y = -c, d/df_j* = +c where r > 0.
    host_logits_.resize(static_cast<size_t>(n * classes));
    host_regularizer_.assign(static_cast<size_t>(n * classes), 0.0f);
    be.to_host(logits_.data(), host_logits_.data(), n * classes);
    const double c = gamma_ / (static_cast<double>(batch) * std::sqrt(2.0) * lipschitz_);
    for (int64_t i = 0; i < n; ++i) {
      const float* f = host_logits_.data() + i * classes;
      const int32_t y = labels[static_cast<size_t>(i)];
      int64_t runner = y == 0 ? 1 : 0;
      for (int64_t j = 0; j < classes; ++j)
        if (j != y && f[j] > f[runner]) runner = j;
      if (static_cast<double>(f[y]) - static_cast<double>(f[runner]) > 0.0) {
        host_regularizer_[static_cast<size_t>(i * classes + y)] = static_cast<float>(-c);
        host_regularizer_[static_cast<size_t>(i * classes + runner)] = static_cast<float>(c);
      }
    }
    regularizer_.resize(Shape{n, classes});
    be.from_host(host_regularizer_.data(), regularizer_.data(), n * classes);
    be.axpby(1.0f, regularizer_.data(), 1.0f, diff_logits_.data(), n * classes);
  }
  model_.zero_grad();
  model_.backward(diff_logits_);
  if (distributed) {
    be.synchronize();  // the backward pass is done: what follows is the all-reduce's time
    const auto start = Clock::now();
    allreduce_gradients();
    be.synchronize();
    allreduce_seconds_ += std::chrono::duration<double>(Clock::now() - start).count();
  }
  optimizer_.step(lr, momentum, weight_decay);
  return stats;
}

// ---------------------------------------------------------------- metrics

std::string EpochMetrics::json() const {
  nlohmann::ordered_json j;
  j["epoch"] = epoch;
  j["step"] = step;
  j["precision"] = precision;
  j["lr"] = lr;
  j["seconds"] = seconds;
  j["images_per_second"] = images_per_second;
  j["train_loss"] = train_loss;
  j["train_accuracy"] = train_accuracy;
  j["evaluated"] = evaluated;
  if (evaluated) {
    j["test_loss"] = test_loss;
    j["test_accuracy"] = test_accuracy;
    nlohmann::ordered_json cert;
    for (auto& [eps, acc] : certified) cert[std::to_string(eps)] = acc;
    j["certified_accuracy"] = cert;
    j["mean_radius"] = mean_radius;
    j["test_images"] = test_images;
  }
  if (validated) {
    j["val_accuracy"] = val_accuracy;
    j["val_certified_accuracy"] = val_certified;
  }
  if (ranks > 1) {  // a single process's lines stay as they were
    j["ranks"] = ranks;
    j["allreduce_seconds"] = allreduce_seconds;
  }
  return j.dump();
}

EpochMetrics EpochMetrics::from_json(const std::string& line) {
  EpochMetrics m;
  try {
    const nlohmann::json j = nlohmann::json::parse(line);
    m.epoch = json_int(j, "epoch", 1, kMaxTrainingSteps);
    m.step = json_int(j, "step", 0, kMaxTrainingSteps);
    m.precision = json_string(j, "precision", "fp32");
    m.lr = json_number(j, "lr");
    m.seconds = json_number(j, "seconds");
    m.images_per_second = json_number(j, "images_per_second");
    m.train_loss = json_number(j, "train_loss");
    m.train_accuracy = json_number(j, "train_accuracy");
    m.evaluated = j.at("evaluated").get<bool>();
    if (m.evaluated) {
      m.test_loss = json_number(j, "test_loss");
      m.test_accuracy = json_number(j, "test_accuracy");
      const nlohmann::json& certified = j.at("certified_accuracy");
      require(certified.is_object(), "'certified_accuracy' must be an object");
      for (const auto& item : certified.items()) {
        const std::string& key = item.key();
        int eps = -1;
        const auto [end, error] = std::from_chars(key.data(), key.data() + key.size(), eps);
        require(error == std::errc() && end == key.data() + key.size() && eps >= 0,
                "'certified_accuracy' keys must be eps numerators, got '", key, "'");
        m.certified[eps] = json_number(certified, key);
      }
      m.mean_radius = json_number(j, "mean_radius");
      m.test_images = json_int(j, "test_images", 0, kLargest);
    }
    if (j.contains("val_accuracy")) {
      m.validated = true;
      m.val_accuracy = json_number(j, "val_accuracy");
      m.val_certified = json_number(j, "val_certified_accuracy");
    }
    if (j.contains("ranks")) {
      m.ranks = static_cast<int>(json_int(j, "ranks", 1, kIntMax));
      m.allreduce_seconds = json_number(j, "allreduce_seconds");
    }
  } catch (const Error& e) {
    throw ConfigError(std::string("invalid epoch metrics: ") + e.what());
  } catch (const std::exception& e) {
    throw ConfigError(std::string("invalid epoch metrics JSON: ") + e.what());
  }
  return m;
}

namespace {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char buf[64];
  if (s >= 3600)
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(s / 3600),
                  static_cast<long long>((s / 60) % 60));
  else
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  return buf;
}

// A deterministic permutation of 0..n-1 (Fisher-Yates on a fixed generator: the same on every platform).
std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = i;
  std::mt19937_64 rng(seed ^ 0x5eed5eed5eed5eedULL);
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(out[static_cast<size_t>(i)], out[static_cast<size_t>(j)]);
  }
  return out;
}

bool parameters_finite(LipConvnet& model) {
  std::vector<float> host;
  for (NamedParameter& p : model.parameters()) {
    host.resize(static_cast<size_t>(p.parameter->value.numel()));
    model.backend().to_host(p.parameter->value.data(), host.data(), p.parameter->value.numel());
    for (float x : host)
      if (!std::isfinite(x)) return false;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------- trainer

Trainer::Trainer(const TrainConfig& config, const CifarSplit& train, const CifarSplit& test, std::FILE* log,
                 std::shared_ptr<Communicator> communicator)
    : config_(config),
      train_(train),
      test_(test),
      log_(log),
      communicator_(communicator ? std::move(communicator) : single_process_communicator()) {
  if (!communicator_->root()) log_ = nullptr;  // rank 0 speaks for the job
  config_.model.seed = config_.seed;
  config_.validate();
  const int64_t available = train_.size();
  require(config_.val_split < available, "--val-split (", config_.val_split, ") must be smaller than the ",
          available, " training images");
  require(config_.train_subset <= available - config_.val_split, "--train-subset (", config_.train_subset,
          ") exceeds the ", available - config_.val_split, " training images left after --val-split");
  if (config_.train_subset > 0 || config_.val_split > 0) {
    auto order = permutation(available, config_.seed);
    val_indices_.assign(order.begin(), order.begin() + config_.val_split);
    const int64_t count = config_.train_subset > 0 ? config_.train_subset : available - config_.val_split;
    train_indices_.assign(order.begin() + config_.val_split, order.begin() + config_.val_split + count);
  } else {
    for (int64_t i = 0; i < available; ++i) train_indices_.push_back(i);
  }
  const int64_t tests = config_.test_subset > 0 ? std::min(config_.test_subset, test_.size()) : test_.size();
  for (int64_t i = 0; i < tests; ++i) test_indices_.push_back(i);
  require(!train_indices_.empty(), "no training images left (", available, " in the split, --val-split ",
          config_.val_split, ")");
  const int64_t per_epoch = steps_per_epoch();
  const int64_t ranks = communicator_->size(), images = static_cast<int64_t>(train_indices_.size());
  const int64_t last_batch = images - (per_epoch - 1) * config_.batch_size;
  require(std::min(config_.batch_size, last_batch) >= ranks, "data-parallel training on ", ranks, " ranks needs at "
          "least one image per rank in every batch: --batch ", config_.batch_size, " over ", images,
          " training images leaves a last batch of ", last_batch, " (choose --batch or --train-subset so that it "
          "holds at least ", ranks, ")");
  require(config_.epochs <= kMaxTrainingSteps / per_epoch, "--epochs ", config_.epochs, " at ", per_epoch,
          " steps per epoch makes more than the ", kMaxTrainingSteps, " (2^53) training steps the schedule counts");
  // What surely gets allocated: weights, their gradients and momentum buffers, and the block outputs of the
  // largest batch (training or evaluation).
  const ModelConfig::Sizes sizes = config_.model.sizes();
  const double batch = static_cast<double>(
      std::max(std::min<int64_t>(config_.batch_size, static_cast<int64_t>(train_indices_.size())),
               std::min<int64_t>(config_.eval_batch, std::max(test_indices_.size(), val_indices_.size()))));
  require_memory(4.0 * (3.0 * sizes.weights + batch * sizes.activations),
                 "training " + config_.model.conv_label() + " LipConvnet-" + std::to_string(config_.model.depth) +
                     " of width " + std::to_string(config_.model.init_channels) + " on batches of " +
                     std::to_string(static_cast<int64_t>(batch)) + " (--batch " + std::to_string(config_.batch_size) +
                     ")");
}

Trainer::~Trainer() {
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

std::string Trainer::configuration_table() const {
  std::ostringstream out;
  auto row = [&](const std::string& key, const std::string& value) {
    char buf[512];
    std::snprintf(buf, sizeof(buf), "| %-22s | %-52s |\n", key.c_str(), value.c_str());
    out << buf;
  };
  auto num = [](double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%g", v);
    return std::string(buf);
  };
  const std::string rule = "+" + std::string(24, '-') + "+" + std::string(54, '-') + "+\n";
  out << rule;
  row("model", "LipConvnet-" + std::to_string(config_.model.depth) + " " + config_.model.conv_label());
  row("width / classes", std::to_string(config_.model.init_channels) + " / " + std::to_string(config_.model.classes));
  row("activation / head", config_.model.activation + " / " + config_.model.head);
  row("downsample keep", keep_name(config_.model.keep));
  row("series terms", std::to_string(config_.model.train_terms) + " train, " +
                          std::to_string(config_.model.eval_terms) + " eval");
  row("parameters", model_ ? std::to_string(model_->parameter_count()) : "?");
  row("device / threads", config_.device + " / " + std::to_string(thread_count()) +
                              (communicator_->size() > 1 ? " per rank" : ""));
  if (communicator_->size() > 1) {
    const Range part = batch_part(config_.batch_size, 0, communicator_->size());
    row("data parallel", std::to_string(communicator_->size()) + " ranks, " + std::to_string(part.size()) +
                             (config_.batch_size % communicator_->size() ? "+" : "") + " images each per batch");
    row("communication", communicator_->description());
  }
  row("precision", conv_precision_name(config_.precision) + (config_.precision == ConvPrecision::fp32
                                                                 ? std::string()
                                                                 : " series convolutions in training, per shape"));
  row("data", config_.data_dir);
  row("train / val / test", std::to_string(train_indices_.size()) + " / " + std::to_string(val_indices_.size()) +
                                " / " + std::to_string(test_indices_.size()) + " images");
  row("epochs / batch", std::to_string(config_.epochs) + " / " + std::to_string(config_.batch_size));
  std::string ms;
  for (double m : config_.milestones) ms += (ms.empty() ? "" : ", ") + num(m * 100) + "%";
  row("optimizer", "SGD lr " + num(config_.lr) + ", momentum " + num(config_.momentum) + ", wd " +
                       num(config_.weight_decay));
  row("lr schedule", "x" + num(config_.lr_decay) + " at " + ms + " of iterations");
  row("cert. regularization", config_.gamma > 0 ? "gamma " + num(config_.gamma) : "off");
  std::string eps;
  for (int e : config_.eps) eps += (eps.empty() ? "" : ", ") + std::to_string(e) + "/255";
  row("certify eps", eps + " (every " + std::to_string(config_.eval_every) + " epoch(s))");
  const auto& nm = config_.normalization;
  row("normalization", "mean " + num(nm.mean[0]) + "," + num(nm.mean[1]) + "," + num(nm.mean[2]) + " std " +
                           num(nm.std[0]) + "," + num(nm.std[1]) + "," + num(nm.std[2]));
  row("seed", std::to_string(config_.seed));
  row("output", config_.out_dir);
  out << rule;
  return out.str();
}

int64_t Trainer::steps_per_epoch() const {
  const int64_t images = static_cast<int64_t>(train_indices_.size());
  return images / config_.batch_size + (images % config_.batch_size != 0);  // the last batch may be smaller
}

void Trainer::lock_output_directory() {
  const std::string lock_path = (fs::path(config_.out_dir) / kLockFile).string();
  const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw IoError("cannot open the run lock " + lock_path + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    char holder[32] = {};
    const ssize_t got = ::pread(fd, holder, sizeof holder - 1, 0);
    ::close(fd);
    std::string pid(holder, got > 0 ? static_cast<size_t>(got) : 0);
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    if (error == EWOULDBLOCK)
      throw IoError("the output directory " + config_.out_dir + " is in use by another training run" +
                    (pid.empty() ? std::string() : " (pid " + pid + ")") + ": wait for it to finish, or choose "
                    "another --out");
    throw IoError("cannot lock " + lock_path + ": " + std::strerror(error));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int error = errno;
    ::close(fd);
    throw IoError("cannot write the run lock " + lock_path + ": " + std::strerror(error));
  }
  lock_fd_ = fd;
}

void Trainer::prepare(const std::string& resume_from) {
  require(model_ == nullptr, "Trainer::prepare called twice");
  set_thread_count(config_.threads);
  if (communicator_->root()) prepare_output_directory(resume_from);

  const Device device = config_.device == "cuda" ? Device::cuda : Device::cpu;
  model_ = std::make_unique<LipConvnet>(config_.model, backend_for(device));
  model_->set_precision(config_.precision);
  sgd_ = std::make_unique<Sgd>(*model_);
  step_ = std::make_unique<TrainStep>(*model_, *sgd_, config_.gamma, config_.normalization.lipschitz(),
                                      communicator_);
  if (!resume_from.empty()) load(resume_from);
  check_ranks_agree(resume_from.empty() ? "after initialization" : "after loading " + resume_from);
  if (!communicator_->root()) return;
  write_file_atomically((fs::path(config_.out_dir) / "config.json").string(), config_.to_json());
  if (!resume_from.empty()) write_metrics();  // the logs follow the checkpoint (a crash may have come in between)
  if (log_) {
    std::fprintf(log_, "%s", configuration_table().c_str());
    if (!resume_from.empty()) {
      std::fprintf(log_, "resumed from %s after epoch %lld", resume_from.c_str(),
                   static_cast<long long>(epochs_done_));
      if (progress_.steps > 0)
        std::fprintf(log_, " and %lld of %lld steps of epoch %lld", static_cast<long long>(progress_.steps),
                     static_cast<long long>(steps_per_epoch()), static_cast<long long>(epochs_done_ + 1));
      std::fprintf(log_, " (step %lld)\n", static_cast<long long>(global_step_));
    }
    std::fflush(log_);
  }
}

void Trainer::prepare_output_directory(const std::string& resume_from) {
  std::error_code ec;
  fs::create_directories(config_.out_dir, ec);
  if (ec || !fs::is_directory(config_.out_dir))
    throw IoError("cannot create the output directory " + config_.out_dir + ": " +
                  (ec ? ec.message() : std::string("not a directory")));
  if (::access(config_.out_dir.c_str(), W_OK) != 0)
    throw IoError("the output directory " + config_.out_dir + " is not writable");
  lock_output_directory();
  for (const std::string& stale : remove_stale_temporaries(config_.out_dir, kRunFiles))
    if (log_) std::fprintf(log_, "removed %s (left by an interrupted save)\n", stale.c_str());

  const std::string last = (fs::path(config_.out_dir) / "last.safetensors").string();
  if (fs::exists(last, ec) && (resume_from.empty() || !fs::equivalent(resume_from, last, ec))) {
    if (resume_from.empty())
      throw IoError("the output directory " + config_.out_dir + " already holds a run (last.safetensors); pass "
                    "--resume " + config_.out_dir + " to continue it, or choose another --out");
    throw IoError("the output directory " + config_.out_dir + " already holds another run (last.safetensors); "
                  "resuming " + resume_from + " there would replace it: choose an empty --out, or pass --resume " +
                  config_.out_dir + " to continue that run");
  }
}

namespace {

// FNV-1a (64-bit) over the bits of every parameter and buffer: equal on two ranks iff (but for a 2^-64 chance) their
// weights are.
uint64_t weights_checksum(LipConvnet& model) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  std::vector<float> host;
  auto add = [&](Tensor& t) {
    host.resize(static_cast<size_t>(t.numel()));
    model.backend().to_host(t.data(), host.data(), t.numel());
    const auto* bytes = reinterpret_cast<const unsigned char*>(host.data());
    for (size_t i = 0; i < host.size() * sizeof(float); ++i) hash = (hash ^ bytes[i]) * 0x100000001b3ULL;
  };
  for (NamedParameter& p : model.parameters()) add(p.parameter->value);
  for (auto& b : model.buffers()) add(*b.tensor);
  return hash;
}

}  // namespace

void Trainer::check_ranks_agree(const std::string& when) {
  if (communicator_->size() == 1) return;
  const std::vector<uint64_t> sums = communicator_->allgather(weights_checksum(*model_));
  for (size_t r = 1; r < sums.size(); ++r)
    if (sums[r] != sums[0]) {
      char text[64];
      std::snprintf(text, sizeof text, "%016llx and %016llx", static_cast<unsigned long long>(sums[0]),
                    static_cast<unsigned long long>(sums[r]));
      throw Error("the weights of rank 0 and rank " + std::to_string(r) + " differ " + when + " (checksums " + text +
                  "): the ranks no longer train one model; check that every rank runs the same orthoconv build on "
                  "the same data and checkpoint");
    }
}

CertifyReport Trainer::evaluate(const CifarSplit& split, const std::vector<int64_t>& indices) {
  return evaluate_model(*model_, split, indices, config_.normalization, config_.eps, config_.eval_batch,
                        [this] { return stop_requested(); }, *communicator_);
}

TrainingState read_training_state(const Checkpoint& c, const std::string& file) {
  auto meta = [&](const std::string& key) -> const std::string& {
    auto it = c.metadata.find(key);
    if (it == c.metadata.end()) throw IoError("checkpoint " + file + ": missing metadata '" + key + "'");
    return it->second;
  };
  auto invalid = [&](const std::string& key, const std::string& problem) {
    return IoError("checkpoint " + file + ": metadata '" + key + "': " + problem);
  };
  TrainingState state;
  try {
    state.config = TrainConfig::from_json(meta("train.config"));
    state.config.validate();
  } catch (const IoError&) {
    throw;
  } catch (const Error& e) {
    throw invalid("train.config", e.what());
  }
  state.epochs_done = metadata_int(c, "train.epoch", file, 0, kMaxTrainingSteps);
  state.step = metadata_int(c, "train.step", file, 0, kMaxTrainingSteps);
  state.best_epoch = metadata_int(c, "train.best_epoch", file, 0, state.epochs_done);
  const std::string& best = meta("train.best_metric");
  const auto [best_end, best_error] = std::from_chars(best.data(), best.data() + best.size(), state.best_metric);
  if (best.empty() || best_error != std::errc() || best_end != best.data() + best.size() ||
      !(state.best_metric == -1.0 || (state.best_metric >= 0.0 && state.best_metric <= 1.0)))
    throw invalid("train.best_metric", "'" + best.substr(0, 40) + "' is not -1 or an accuracy in [0, 1]");
  try {
    std::stringstream lines(meta("train.history"));
    std::string line;
    while (std::getline(lines, line))
      if (!line.empty()) state.history.push_back(EpochMetrics::from_json(line));
  } catch (const Error& e) {
    throw invalid("train.history", e.what());
  }
  if (static_cast<int64_t>(state.history.size()) != state.epochs_done)
    throw invalid("train.history", "holds " + std::to_string(state.history.size()) + " epochs, but train.epoch is " +
                  std::to_string(state.epochs_done));
  for (size_t i = 0; i < state.history.size(); ++i) {
    const EpochMetrics& m = state.history[i];
    if (m.epoch != static_cast<int64_t>(i) + 1 || m.step > state.step || (i > 0 && m.step <= state.history[i - 1].step))
      throw invalid("train.history", "line " + std::to_string(i + 1) + " is epoch " + std::to_string(m.epoch) +
                    " at step " + std::to_string(m.step) + ", out of order (the run is at step " +
                    std::to_string(state.step) + ")");
  }
  if (auto it = c.metadata.find("train.epoch_progress"); it != c.metadata.end()) {
    try {
      const json j = json::parse(it->second);
      EpochProgress& p = state.progress;
      p.steps = json_int(j, "steps", 1, kMaxTrainingSteps);
      p.images = json_int(j, "images", 1, kLargest);
      p.correct = json_int(j, "correct", 0, p.images);
      p.loss_sum = json_number(j, "loss_sum");
      p.seconds = json_number(j, "seconds");
      require(p.loss_sum >= 0.0 && p.seconds >= 0.0, "negative loss or seconds");
    } catch (const Error& e) {
      throw invalid("train.epoch_progress", e.what());
    } catch (const std::exception& e) {
      throw invalid("train.epoch_progress", e.what());
    }
  }
  return state;
}

void Trainer::load(const std::string& path) {
  Checkpoint c = load_checkpoint(path);
  model_config_from_checkpoint(c, path);  // the format, and every architecture field valid and agreeing
  TrainingState state = read_training_state(c, path);
  // The data order and the schedule must be the ones the run started with.
  const TrainConfig& saved = state.config;
  auto same = [&](bool equal, const std::string& flag, const std::string& was) {
    if (!equal)
      throw ConfigError("--resume: " + flag + " differs from the checkpoint's (" + was + "); a resumed run must "
                        "keep it to continue exactly");
  };
  same(saved.seed == config_.seed, "--seed", std::to_string(saved.seed));
  same(saved.batch_size == config_.batch_size, "--batch", std::to_string(saved.batch_size));
  same(saved.train_subset == config_.train_subset, "--train-subset", std::to_string(saved.train_subset));
  same(saved.val_split == config_.val_split, "--val-split", std::to_string(saved.val_split));
  same(saved.precision == config_.precision, "--precision", conv_precision_name(saved.precision));
  // Every count follows from the steps per epoch: a state that disagrees was not written by this run.
  const int64_t per_epoch = steps_per_epoch();
  auto inconsistent = [&](const std::string& problem) {
    return IoError("checkpoint " + path + ": inconsistent training state: " + problem + " (" +
                   std::to_string(per_epoch) + " steps per epoch)");
  };
  if (state.progress.steps > per_epoch)
    throw inconsistent(std::to_string(state.progress.steps) + " steps done in the epoch in progress");
  if (state.step != state.epochs_done * per_epoch + state.progress.steps)
    throw inconsistent("step " + std::to_string(state.step) + " after " + std::to_string(state.epochs_done) +
                       " epochs and " + std::to_string(state.progress.steps) + " steps");
  for (const EpochMetrics& m : state.history)
    if (m.step != m.epoch * per_epoch)
      throw inconsistent("history epoch " + std::to_string(m.epoch) + " ends at step " + std::to_string(m.step));
  if (state.progress.images > state.progress.steps * config_.batch_size)
    throw inconsistent(std::to_string(state.progress.images) + " images in " + std::to_string(state.progress.steps) +
                       " steps");
  read_model_state(c, path, *model_);
  sgd_->load(c, path);
  if (sgd_->steps() != state.step)
    throw inconsistent("optimizer.steps " + std::to_string(sgd_->steps()) + " but train.step " +
                       std::to_string(state.step));
  epochs_done_ = state.epochs_done;
  global_step_ = state.step;
  progress_ = state.progress;
  best_metric_ = state.best_metric;
  best_epoch_ = state.best_epoch;
  history_ = std::move(state.history);
  last_good_checkpoint_ = path;
  last_good_step_ = global_step_;
}

void Trainer::save(const std::string& path) {
  Checkpoint c;
  write_model_state(*model_, config_.normalization, c);
  sgd_->save(c);
  c.metadata["train.epoch"] = std::to_string(epochs_done_);
  c.metadata["train.step"] = std::to_string(global_step_);
  // Only a single-process run stops inside an epoch (stop requests are not polled with more ranks): the epoch's
  // all-reduce time is 0 there and is not recorded.
  if (progress_.steps > 0)
    c.metadata["train.epoch_progress"] = json{{"steps", progress_.steps}, {"loss_sum", progress_.loss_sum},
                                              {"correct", progress_.correct}, {"images", progress_.images},
                                              {"seconds", progress_.seconds}}.dump();
  c.metadata["train.config"] = config_.to_json();
  c.metadata["train.precision"] = conv_precision_name(config_.precision);
  json rng{{"generator", "BatchLoader(seed, epoch)"}, {"seed", config_.seed}, {"next_epoch", epochs_done_}};
  c.metadata["train.rng"] = rng.dump();
  char best[64];
  std::snprintf(best, sizeof(best), "%.17g", best_metric_);
  c.metadata["train.best_metric"] = best;
  c.metadata["train.best_epoch"] = std::to_string(best_epoch_);
  std::string history;
  for (const EpochMetrics& m : history_) history += m.json() + "\n";
  c.metadata["train.history"] = history;
  save_checkpoint(path, c);
  last_good_checkpoint_ = path;
  last_good_step_ = global_step_;
}

void Trainer::write_metrics() {
  std::string jsonl, csv = "epoch,step,precision,lr,seconds,images_per_second,train_loss,train_accuracy,test_loss,"
                           "test_accuracy";
  for (int e : config_.eps) csv += ",certified_" + std::to_string(e);
  csv += ",mean_radius,test_images,val_accuracy,val_certified_accuracy\n";
  for (const EpochMetrics& m : history_) {
    jsonl += m.json() + "\n";
    std::ostringstream row;
    row.precision(10);
    row << m.epoch << "," << m.step << "," << m.precision << "," << m.lr << "," << m.seconds << ","
        << m.images_per_second << "," << m.train_loss << "," << m.train_accuracy << ",";
    if (m.evaluated) {
      row << m.test_loss << "," << m.test_accuracy;
      for (int e : config_.eps) {
        auto it = m.certified.find(e);
        row << ",";
        if (it != m.certified.end()) row << it->second;
      }
      row << "," << m.mean_radius << "," << m.test_images;
    } else {
      row << ",";
      for (size_t i = 0; i < config_.eps.size(); ++i) row << ",";
      row << ",,";
    }
    row << ",";
    if (m.validated) row << m.val_accuracy << "," << m.val_certified;
    else row << ",";
    csv += row.str() + "\n";
  }
  write_file_atomically((fs::path(config_.out_dir) / "metrics.jsonl").string(), jsonl);
  write_file_atomically((fs::path(config_.out_dir) / "metrics.csv").string(), csv);
}

void Trainer::diverged(const std::string& what) const {
  throw TrainingDiverged(what + "; stopped. " +
                         (last_good_checkpoint_.empty()
                              ? std::string("No checkpoint had been written yet.")
                              : "The last good checkpoint is kept: " + last_good_checkpoint_ + " (step " +
                                    std::to_string(last_good_step_) + ").") +
                         " Try a smaller --lr.");
}

void Trainer::save_interrupted(const std::string& last_path) {
  // A step that overflowed the parameters must not become the checkpoint to resume from.
  if (!parameters_finite(*model_))
    diverged("non-finite parameters at step " + std::to_string(global_step_) + " (interrupted)");
  save(last_path);
  interrupted_ = true;
  if (log_) {
    std::fprintf(log_, "stopped on request at step %lld: epoch %lld, %lld of %lld steps done%s; checkpoint %s\n",
                 static_cast<long long>(global_step_), static_cast<long long>(epochs_done_ + 1),
                 static_cast<long long>(progress_.steps), static_cast<long long>(steps_per_epoch()),
                 progress_.steps == steps_per_epoch() ? " (its evaluation runs on resume)" : "", last_path.c_str());
    std::fflush(log_);
  }
}

void Trainer::run(int64_t stop_after) {
  require(model_ != nullptr, "Trainer::run called before prepare");
  interrupted_ = false;
  if (epochs_done_ >= config_.epochs) {
    if (log_) std::fprintf(log_, "nothing to do: %lld of %lld epochs already done\n",
                           static_cast<long long>(epochs_done_), static_cast<long long>(config_.epochs));
    return;
  }
  BatchLoader::Options options;
  options.batch_size = config_.batch_size;
  options.shuffle = true;
  options.augment = true;
  options.drop_last = false;
  options.seed = config_.seed;
  options.part = communicator_->rank();
  options.parts = communicator_->size();
  BatchLoader loader(train_, train_indices_, config_.normalization, options);
  const int64_t per_epoch = loader.batches_per_epoch();
  const int64_t total = per_epoch * config_.epochs;  // <= kMaxTrainingSteps: checked by the constructor
  const int64_t train_images = static_cast<int64_t>(train_indices_.size());
  const bool tty = log_ == stdout && ::isatty(::fileno(stdout));
  const std::string last_path = (fs::path(config_.out_dir) / "last.safetensors").string();
  const std::string best_path = (fs::path(config_.out_dir) / "best.safetensors").string();
  const int headline = config_.eps.front();
  using Clock = std::chrono::steady_clock;
  const auto run_start = Clock::now();
  int64_t run_steps = 0;

  if (log_) {
    std::fprintf(log_, "%-9s %-9s %-8s %-9s %-9s | %-9s %-9s %-9s %-8s | %-8s %-7s\n", "epoch", "step", "lr",
                 "loss", "train_acc", "test_loss", "clean", ("cert" + std::to_string(headline)).c_str(), "radius",
                 "seconds", "img/s");
    std::fflush(log_);
  }
  Batch batch;
  model_->set_training(true);
  const int64_t end_epoch = stop_after > 0 ? std::min(stop_after, config_.epochs) : config_.epochs;
  for (int64_t epoch = epochs_done_; epoch < end_epoch; ++epoch) {
    // progress_ holds what an interrupted earlier session did of this epoch (nothing at an epoch's start).
    const auto epoch_start = Clock::now() - std::chrono::duration_cast<Clock::duration>(
                                                std::chrono::duration<double>(progress_.seconds));
    auto last_print = Clock::now();
    loader.start_epoch(epoch, progress_.steps);
    while (loader.next(batch)) {
      const double lr = scheduled_lr(config_, global_step_, total);
      // This rank's part of the global batch of batch_images (the whole batch in one process).
      const int64_t batch_images = std::min(config_.batch_size, train_images - progress_.steps * config_.batch_size);
      const double allreduce_before = step_->allreduce_seconds();
      StepStats s = step_->run(batch.images, batch.labels, static_cast<float>(lr),
                               static_cast<float>(config_.momentum), static_cast<float>(config_.weight_decay),
                               batch_images);
      progress_.allreduce_seconds += step_->allreduce_seconds() - allreduce_before;
      if (!std::isfinite(s.loss_sum)) {
        if (tty && log_) std::fprintf(log_, "\n");
        diverged("non-finite training loss at epoch " + std::to_string(epoch + 1) + ", step " +
                 std::to_string(global_step_ + 1) + " (lr " + std::to_string(lr) + ")");
      }
      ++global_step_;
      ++run_steps;
      progress_.steps += 1;
      progress_.loss_sum += s.loss_sum;
      progress_.correct += s.correct;
      progress_.images += s.images;
      progress_.seconds = std::chrono::duration<double>(Clock::now() - epoch_start).count();
      if (log_) {
        const auto now = Clock::now();
        const double elapsed = std::chrono::duration<double>(now - run_start).count();
        const double per_step = elapsed / static_cast<double>(run_steps);
        const double eta = per_step * static_cast<double>(total - global_step_);
        const bool periodic = progress_.steps == per_epoch ||
                              std::chrono::duration<double>(now - last_print).count() >= (tty ? 0.2 : 30.0) ||
                              (!tty && per_epoch >= 10 && progress_.steps % (per_epoch / 10) == 0);
        if (periodic) {
          last_print = now;
          char line[256];
          std::snprintf(line, sizeof(line),
                        "  epoch %lld/%lld step %lld/%lld loss %.4f lr %.5f %.1f img/s ETA %s",
                        static_cast<long long>(epoch + 1), static_cast<long long>(config_.epochs),
                        static_cast<long long>(progress_.steps), static_cast<long long>(per_epoch),
                        progress_.loss_sum / static_cast<double>(progress_.images), lr,
                        static_cast<double>(progress_.images) / std::max(progress_.seconds, 1e-9),
                        format_duration(eta).c_str());
          if (tty) {
            const int width = 20;
            const int filled = static_cast<int>(width * progress_.steps / std::max<int64_t>(per_epoch, 1));
            std::fprintf(log_, "\r[%s%s]%s\033[K", std::string(static_cast<size_t>(filled), '#').c_str(),
                         std::string(static_cast<size_t>(width - filled), '.').c_str(), line);
          } else {
            std::fprintf(log_, "%s\n", line);
          }
          std::fflush(log_);
        }
      }
      if (stop_requested()) {
        if (tty && log_) std::fprintf(log_, "\r\033[K");
        save_interrupted(last_path);
        return;
      }
    }
    if (tty && log_) std::fprintf(log_, "\r\033[K");
    // A finite loss with overflowed parameters would save a broken checkpoint: check them before anything.
    if (!parameters_finite(*model_))
      diverged("non-finite parameters after epoch " + std::to_string(epoch + 1) + " (step " +
               std::to_string(global_step_) + ")");
    check_ranks_agree("after epoch " + std::to_string(epoch + 1));
    // The epoch's steps are done; a stop request from here on abandons its evaluation, which a resume reruns.
    if (stop_requested()) {
      save_interrupted(last_path);
      return;
    }

    EpochMetrics m;
    m.epoch = epoch + 1;
    m.step = global_step_;
    m.precision = conv_precision_name(config_.precision);
    m.lr = scheduled_lr(config_, global_step_ - 1, total);  // the lr of the epoch's last step
    m.train_loss = progress_.images ? progress_.loss_sum / static_cast<double>(progress_.images) : 0.0;
    m.train_accuracy =
        progress_.images ? static_cast<double>(progress_.correct) / static_cast<double>(progress_.images) : 0.0;
    m.images_per_second = static_cast<double>(progress_.images) / std::max(progress_.seconds, 1e-9);
    m.ranks = communicator_->size();
    m.allreduce_seconds = progress_.allreduce_seconds;
    const bool last_epoch = epoch + 1 == config_.epochs;
    bool new_best = false;
    try {
      if (((epoch + 1) % config_.eval_every == 0 || last_epoch) && !test_indices_.empty()) {
        CertifyReport r = evaluate(test_, test_indices_);
        m.evaluated = true;
        m.test_loss = r.mean_loss();
        m.test_accuracy = r.clean_accuracy();
        m.mean_radius = r.mean_radius();
        m.test_images = r.images;
        for (int e : config_.eps) m.certified[e] = r.certified_accuracy(e);
      }
      if (!val_indices_.empty()) {
        CertifyReport r = evaluate(train_, val_indices_);
        m.validated = true;
        m.val_accuracy = r.clean_accuracy();
        m.val_certified = r.certified_accuracy(headline);
        new_best = m.val_certified >= best_metric_;
      }
    } catch (const Interrupted&) {
      model_->set_training(true);
      save_interrupted(last_path);
      return;
    }
    model_->set_training(true);
    m.seconds = std::chrono::duration<double>(Clock::now() - epoch_start).count();
    history_.push_back(m);
    epochs_done_ = epoch + 1;
    progress_ = EpochProgress{};
    if (new_best) {
      best_metric_ = m.val_certified;
      best_epoch_ = epochs_done_;
    }
    // best first, then last (the commit), then the logs derived from last's history; rank 0 writes for the job.
    if (communicator_->root()) {
      if (new_best) save(best_path);
      save(last_path);
      write_metrics();
    }
    last_good_checkpoint_ = last_path;
    last_good_step_ = global_step_;
    if (log_) {
      char line[320];
      if (m.evaluated)
        std::snprintf(line, sizeof(line),
                      "%4lld/%-4lld %-9lld %-8.5f %-9.4f %-9.4f | %-9.4f %-9.4f %-9.4f %-8.4f | %-8.1f %-7.1f",
                      static_cast<long long>(m.epoch), static_cast<long long>(config_.epochs),
                      static_cast<long long>(m.step), m.lr, m.train_loss, m.train_accuracy, m.test_loss,
                      m.test_accuracy, m.certified[headline], m.mean_radius, m.seconds, m.images_per_second);
      else
        std::snprintf(line, sizeof(line), "%4lld/%-4lld %-9lld %-8.5f %-9.4f %-9.4f | %-9s %-9s %-9s %-8s | %-8.1f %-7.1f",
                      static_cast<long long>(m.epoch), static_cast<long long>(config_.epochs),
                      static_cast<long long>(m.step), m.lr, m.train_loss, m.train_accuracy, "-", "-", "-", "-",
                      m.seconds, m.images_per_second);
      std::fprintf(log_, "%s", line);
      if (m.validated) std::fprintf(log_, "  val clean %.4f cert %.4f%s", m.val_accuracy, m.val_certified,
                                    new_best ? " (best)" : "");
      std::fprintf(log_, "\n");
      std::fflush(log_);
    }
    if (stop_requested()) {  // came during the saves: they are done, and so is the epoch
      interrupted_ = true;
      if (log_) std::fprintf(log_, "stopped on request after epoch %lld; checkpoint %s\n",
                             static_cast<long long>(epochs_done_), last_path.c_str());
      return;
    }
  }
}

}  // namespace orthoconv
