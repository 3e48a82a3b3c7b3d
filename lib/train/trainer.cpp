// The training loop: configuration, schedule, SGD, one training step, epochs with evaluation, metrics logs and
// checkpoints (atomic), exact resume. See include/orthoconv/trainer.hpp.
#include "orthoconv/trainer.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "orthoconv/certify.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/runtime.hpp"

namespace orthoconv {

namespace fs = std::filesystem;
using nlohmann::json;

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
  require(threads >= 0, "--threads must be >= 0, got ", threads);
  for (int i = 0; i < 3; ++i)
    require(normalization.std[i] > 0 && std::isfinite(normalization.std[i]), "--std values must be positive");
}

std::string TrainConfig::to_json() const {
  json j;
  j["conv"] = model.conv;
  j["groups"] = model.conv == "soc" ? std::to_string(model.groups_first)
                                    : std::to_string(model.groups_first) + "," +
                                          (model.groups_second ? std::to_string(*model.groups_second) : "-");
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
    const std::string groups = j.at("groups").get<std::string>();
    const auto comma = groups.find(',');
    c.model.groups_first = std::stoll(groups.substr(0, comma));
    c.model.groups_second.reset();
    if (comma != std::string::npos && groups.substr(comma + 1) != "-")
      c.model.groups_second = std::stoll(groups.substr(comma + 1));
    c.model.depth = j.at("depth").get<int64_t>();
    c.model.init_channels = j.at("width").get<int64_t>();
    c.model.classes = j.at("classes").get<int64_t>();
    c.model.activation = j.at("activation").get<std::string>();
    c.model.head = j.at("head").get<std::string>();
    c.model.keep = parse_keep(j.at("downsample_keep").get<std::string>());
    c.model.train_terms = j.at("train_terms").get<int>();
    c.model.eval_terms = j.at("eval_terms").get<int>();
    // Absent in configurations written before the setting existed: the reference's schedule.
    if (j.contains("power_schedule"))
      c.model.power_schedule = PowerSchedule::parse(j.at("power_schedule").get<std::string>());
    auto mean = j.at("mean").get<std::vector<float>>();
    auto std = j.at("std").get<std::vector<float>>();
    require(mean.size() == 3 && std.size() == 3, "mean and std need 3 values each");
    for (int i = 0; i < 3; ++i) {
      c.normalization.mean[i] = mean[i];
      c.normalization.std[i] = std[i];
    }
    c.data_dir = j.at("data").get<std::string>();
    c.out_dir = j.at("out").get<std::string>();
    c.device = j.at("device").get<std::string>();
    // Absent in runs from before --precision existed: they trained in float32.
    c.precision = parse_conv_precision(j.value("precision", std::string("fp32")));
    c.epochs = j.at("epochs").get<int64_t>();
    c.batch_size = j.at("batch").get<int64_t>();
    c.lr = j.at("lr").get<double>();
    c.momentum = j.at("momentum").get<double>();
    c.weight_decay = j.at("weight_decay").get<double>();
    c.lr_decay = j.at("lr_decay").get<double>();
    c.milestones = j.at("milestones").get<std::vector<double>>();
    c.gamma = j.at("gamma").get<double>();
    c.train_subset = j.at("train_subset").get<int64_t>();
    c.val_split = j.at("val_split").get<int64_t>();
    c.test_subset = j.at("test_subset").get<int64_t>();
    c.eval_every = j.at("eval_every").get<int64_t>();
    c.eps = j.at("eps").get<std::vector<int>>();
    c.seed = j.at("seed").get<uint64_t>();
    c.model.seed = c.seed;
    c.threads = j.at("threads").get<int>();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw ConfigError(std::string("invalid training configuration JSON: ") + e.what());
  }
  return c;
}

double scheduled_lr(const TrainConfig& config, int64_t step, int64_t total) {
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
    sources.push_back(&it->second);
  }
  auto steps = in.metadata.find("optimizer.steps");
  if (steps == in.metadata.end()) throw IoError("checkpoint " + file + ": missing metadata 'optimizer.steps'");
  int64_t count = 0;
  try {
    count = std::stoll(steps->second);
  } catch (const std::exception&) {
    throw IoError("checkpoint " + file + ": metadata 'optimizer.steps' is not an integer");
  }
  Backend& be = model_.backend();
  for (size_t i = 0; i < params_.size(); ++i)
    be.from_host(sources[i]->values.data(), momentum_[i].data(), momentum_[i].numel());
  steps_ = count;
}

// ---------------------------------------------------------------- one step

TrainStep::TrainStep(LipConvnet& model, Sgd& optimizer, double gamma, double input_lipschitz)
    : model_(model), optimizer_(optimizer), gamma_(gamma), lipschitz_(input_lipschitz) {
  const Device device = model.backend().device();
  if (device != Device::cpu) {
    device_images_ = Tensor(Shape{1}, device);
    logits_ = Tensor(Shape{1}, device);
    diff_logits_ = Tensor(Shape{1}, device);
    regularizer_ = Tensor(Shape{1}, device);
  }
}

StepStats TrainStep::run(const Tensor& images, const std::vector<int32_t>& labels, float lr, float momentum,
                         float weight_decay) {
  Backend& be = model_.backend();
  const int64_t n = images.dim(0), classes = model_.config().classes;
  require<ShapeError>(static_cast<int64_t>(labels.size()) == n, "training step: ", labels.size(),
                      " labels for ", n, " images");
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
  if (!std::isfinite(stats.loss_sum)) return stats;  // the caller stops; nothing is updated

  if (gamma_ > 0) {
    // -gamma * mean relu(r), r = (f_y - f_j*) / (sqrt2 L): d/df_y = -c, d/df_j* = +c where r > 0.
    host_logits_.resize(static_cast<size_t>(n * classes));
    host_regularizer_.assign(static_cast<size_t>(n * classes), 0.0f);
    be.to_host(logits_.data(), host_logits_.data(), n * classes);
    const double c = gamma_ / (static_cast<double>(n) * std::sqrt(2.0) * lipschitz_);
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
  return j.dump();
}

namespace {

EpochMetrics metrics_from_json(const std::string& line) {
  json j = json::parse(line);
  EpochMetrics m;
  m.epoch = j.at("epoch").get<int64_t>();
  m.step = j.at("step").get<int64_t>();
  m.precision = j.value("precision", std::string("fp32"));
  m.lr = j.at("lr").get<double>();
  m.seconds = j.at("seconds").get<double>();
  m.images_per_second = j.at("images_per_second").get<double>();
  m.train_loss = j.at("train_loss").get<double>();
  m.train_accuracy = j.at("train_accuracy").get<double>();
  m.evaluated = j.at("evaluated").get<bool>();
  if (m.evaluated) {
    m.test_loss = j.at("test_loss").get<double>();
    m.test_accuracy = j.at("test_accuracy").get<double>();
    for (auto& [key, value] : j.at("certified_accuracy").items()) m.certified[std::stoi(key)] = value.get<double>();
    m.mean_radius = j.at("mean_radius").get<double>();
    m.test_images = j.at("test_images").get<int64_t>();
  }
  if (j.contains("val_accuracy")) {
    m.validated = true;
    m.val_accuracy = j.at("val_accuracy").get<double>();
    m.val_certified = j.at("val_certified_accuracy").get<double>();
  }
  return m;
}

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

Trainer::Trainer(const TrainConfig& config, const CifarSplit& train, const CifarSplit& test, std::FILE* log)
    : config_(config), train_(train), test_(test), log_(log) {
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
}

Trainer::~Trainer() = default;

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
  row("device / threads", config_.device + " / " + std::to_string(thread_count()));
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

void Trainer::prepare(const std::string& resume_from) {
  set_thread_count(config_.threads);
  const Device device = config_.device == "cuda" ? Device::cuda : Device::cpu;
  model_ = std::make_unique<LipConvnet>(config_.model, backend_for(device));
  model_->set_precision(config_.precision);
  sgd_ = std::make_unique<Sgd>(*model_);
  step_ = std::make_unique<TrainStep>(*model_, *sgd_, config_.gamma, config_.normalization.lipschitz());

  std::error_code ec;
  fs::create_directories(config_.out_dir, ec);
  if (ec || !fs::is_directory(config_.out_dir))
    throw IoError("cannot create the output directory " + config_.out_dir + ": " +
                  (ec ? ec.message() : std::string("not a directory")));
  if (::access(config_.out_dir.c_str(), W_OK) != 0)
    throw IoError("the output directory " + config_.out_dir + " is not writable");
  const std::string last = (fs::path(config_.out_dir) / "last.safetensors").string();
  if (resume_from.empty()) {
    if (fs::exists(last))
      throw IoError("the output directory " + config_.out_dir + " already holds a run (last.safetensors); pass "
                    "--resume " + config_.out_dir + " to continue it, or choose another --out");
  } else {
    load(resume_from);
  }
  write_file_atomically((fs::path(config_.out_dir) / "config.json").string(), config_.to_json());
  if (log_) {
    std::fprintf(log_, "%s", configuration_table().c_str());
    if (!resume_from.empty())
      std::fprintf(log_, "resumed from %s after epoch %lld (step %lld)\n", resume_from.c_str(),
                   static_cast<long long>(epochs_done_), static_cast<long long>(global_step_));
    std::fflush(log_);
  }
}

void Trainer::load(const std::string& path) {
  Checkpoint c = load_checkpoint(path);
  check_checkpoint_format(c, path);
  auto meta = [&](const std::string& key) -> const std::string& {
    auto it = c.metadata.find(key);
    if (it == c.metadata.end()) throw IoError("checkpoint " + path + ": missing metadata '" + key + "'");
    return it->second;
  };
  // The data order and the schedule must be the ones the run started with.
  TrainConfig saved = TrainConfig::from_json(meta("train.config"));
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
  read_model_state(c, path, *model_);
  sgd_->load(c, path);
  try {
    epochs_done_ = std::stoll(meta("train.epoch"));
    global_step_ = std::stoll(meta("train.step"));
    best_metric_ = std::stod(meta("train.best_metric"));
    best_epoch_ = std::stoll(meta("train.best_epoch"));
    history_.clear();
    std::stringstream lines(meta("train.history"));
    std::string line;
    while (std::getline(lines, line))
      if (!line.empty()) history_.push_back(metrics_from_json(line));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw IoError("checkpoint " + path + ": invalid training state: " + e.what());
  }
}

void Trainer::save(const std::string& path, int64_t epoch) {
  Checkpoint c;
  write_model_state(*model_, config_.normalization, c);
  sgd_->save(c);
  c.metadata["train.epoch"] = std::to_string(epoch);
  c.metadata["train.step"] = std::to_string(global_step_);
  c.metadata["train.config"] = config_.to_json();
  c.metadata["train.precision"] = conv_precision_name(config_.precision);
  json rng{{"generator", "BatchLoader(seed, epoch)"}, {"seed", config_.seed}, {"next_epoch", epoch}};
  c.metadata["train.rng"] = rng.dump();
  char best[64];
  std::snprintf(best, sizeof(best), "%.17g", best_metric_);
  c.metadata["train.best_metric"] = best;
  c.metadata["train.best_epoch"] = std::to_string(best_epoch_);
  std::string history;
  for (const EpochMetrics& m : history_) history += m.json() + "\n";
  c.metadata["train.history"] = history;
  save_checkpoint(path, c);
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

void Trainer::run(int64_t stop_after) {
  require(model_ != nullptr, "Trainer::run called before prepare");
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
  BatchLoader loader(train_, train_indices_, config_.normalization, options);
  const int64_t per_epoch = loader.batches_per_epoch();
  const int64_t total = per_epoch * config_.epochs;
  const bool tty = log_ == stdout && ::isatty(::fileno(stdout));
  const std::string last_path = (fs::path(config_.out_dir) / "last.safetensors").string();
  const std::string best_path = (fs::path(config_.out_dir) / "best.safetensors").string();
  const int headline = config_.eps.front();
  using Clock = std::chrono::steady_clock;
  const auto run_start = Clock::now();
  int64_t run_steps = 0;
  double run_images = 0.0;

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
    const auto epoch_start = Clock::now();
    auto last_print = epoch_start;
    loader.start_epoch(epoch);
    double loss_sum = 0.0;
    int64_t correct = 0, images = 0, step_in_epoch = 0;
    double lr = config_.lr;
    while (loader.next(batch)) {
      lr = scheduled_lr(config_, global_step_, total);
      StepStats s = step_->run(batch.images, batch.labels, static_cast<float>(lr),
                               static_cast<float>(config_.momentum), static_cast<float>(config_.weight_decay));
      if (!std::isfinite(s.loss_sum)) {
        if (tty && log_) std::fprintf(log_, "\n");
        throw TrainingDiverged(
            "non-finite training loss at epoch " + std::to_string(epoch + 1) + ", step " +
            std::to_string(global_step_ + 1) + " (lr " + std::to_string(lr) + "); stopped. " +
            (fs::exists(last_path) ? "The last good checkpoint is kept: " + last_path + " (epoch " +
                                         std::to_string(epochs_done_) + ")"
                                   : std::string("No checkpoint had been written yet.")) +
            " Try a smaller --lr.");
      }
      ++global_step_;
      ++step_in_epoch;
      ++run_steps;
      loss_sum += s.loss_sum;
      correct += s.correct;
      images += s.images;
      run_images += static_cast<double>(s.images);
      if (log_) {
        const auto now = Clock::now();
        const double elapsed = std::chrono::duration<double>(now - run_start).count();
        const double epoch_elapsed = std::chrono::duration<double>(now - epoch_start).count();
        const double per_step = elapsed / static_cast<double>(run_steps);
        const double eta = per_step * static_cast<double>(total - global_step_);
        const bool periodic = step_in_epoch == per_epoch ||
                              std::chrono::duration<double>(now - last_print).count() >= (tty ? 0.2 : 30.0) ||
                              (!tty && per_epoch >= 10 && step_in_epoch % (per_epoch / 10) == 0);
        if (periodic) {
          last_print = now;
          char line[256];
          std::snprintf(line, sizeof(line),
                        "  epoch %lld/%lld step %lld/%lld loss %.4f lr %.5f %.1f img/s ETA %s",
                        static_cast<long long>(epoch + 1), static_cast<long long>(config_.epochs),
                        static_cast<long long>(step_in_epoch), static_cast<long long>(per_epoch),
                        loss_sum / static_cast<double>(images), lr,
                        static_cast<double>(images) / std::max(epoch_elapsed, 1e-9), format_duration(eta).c_str());
          if (tty) {
            const int width = 20;
            const int filled = static_cast<int>(width * step_in_epoch / std::max<int64_t>(per_epoch, 1));
            std::fprintf(log_, "\r[%s%s]%s\033[K", std::string(static_cast<size_t>(filled), '#').c_str(),
                         std::string(static_cast<size_t>(width - filled), '.').c_str(), line);
          } else {
            std::fprintf(log_, "%s\n", line);
          }
          std::fflush(log_);
        }
      }
    }
    if (tty && log_) std::fprintf(log_, "\r\033[K");
    const double train_seconds = std::chrono::duration<double>(Clock::now() - epoch_start).count();
    // A finite loss with overflowed parameters would save a broken checkpoint: check them before anything.
    if (!parameters_finite(*model_))
      throw TrainingDiverged("non-finite parameters after epoch " + std::to_string(epoch + 1) + " (step " +
                             std::to_string(global_step_) + ", lr " + std::to_string(lr) + "); stopped. " +
                             (fs::exists(last_path) ? "The last good checkpoint is kept: " + last_path + " (epoch " +
                                                          std::to_string(epochs_done_) + ")"
                                                    : std::string("No checkpoint had been written yet.")) +
                             " Try a smaller --lr.");

    EpochMetrics m;
    m.epoch = epoch + 1;
    m.step = global_step_;
    m.precision = conv_precision_name(config_.precision);
    m.lr = lr;
    m.train_loss = images ? loss_sum / static_cast<double>(images) : 0.0;
    m.train_accuracy = images ? static_cast<double>(correct) / static_cast<double>(images) : 0.0;
    m.images_per_second = static_cast<double>(images) / std::max(train_seconds, 1e-9);
    const bool last_epoch = epoch + 1 == config_.epochs;
    if (((epoch + 1) % config_.eval_every == 0 || last_epoch) && !test_indices_.empty()) {
      CertifyReport r = evaluate_model(*model_, test_, test_indices_, config_.normalization, config_.eps,
                                       config_.eval_batch);
      m.evaluated = true;
      m.test_loss = r.mean_loss();
      m.test_accuracy = r.clean_accuracy();
      m.mean_radius = r.mean_radius();
      m.test_images = r.images;
      for (int e : config_.eps) m.certified[e] = r.certified_accuracy(e);
    }
    bool new_best = false;
    if (!val_indices_.empty()) {
      CertifyReport r = evaluate_model(*model_, train_, val_indices_, config_.normalization, config_.eps,
                                       config_.eval_batch);
      m.validated = true;
      m.val_accuracy = r.clean_accuracy();
      m.val_certified = r.certified_accuracy(headline);
      if (m.val_certified >= best_metric_) {
        best_metric_ = m.val_certified;
        best_epoch_ = epoch + 1;
        new_best = true;
      }
    }
    model_->set_training(true);
    m.seconds = std::chrono::duration<double>(Clock::now() - epoch_start).count();
    history_.push_back(m);
    epochs_done_ = epoch + 1;
    write_metrics();
    save(last_path, epochs_done_);
    if (new_best) save(best_path, epochs_done_);
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
  }
}

}  // namespace orthoconv
