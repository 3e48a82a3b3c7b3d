// TrainConfig: validation and config.json (written and read back). See include/orthoconv/trainer.hpp.
#include <cmath>
#include <nlohmann/json.hpp>

#include "orthoconv/limits.hpp"
#include "orthoconv/trainer.hpp"
#include "train/json_fields.hpp"

namespace orthoconv {

using nlohmann::json;

// Messages name the settings by their config.json keys (SettingError); the command line writes its flags instead.
void TrainConfig::validate() const {
  model.validate();
  require_setting(epochs > 0, {"epochs"}, "{0} must be positive, got ", epochs);
  require_setting(batch_size > 0, {"batch"}, "{0} must be positive, got ", batch_size);
  require_setting(std::isfinite(lr) && lr > 0, {"lr"}, "{0} must be positive, got ", lr);
  require_setting(std::isfinite(momentum) && momentum >= 0 && momentum < 1, {"momentum"}, "{0} must be in [0, 1), got ",
                  momentum);
  require_setting(std::isfinite(weight_decay) && weight_decay >= 0, {"weight_decay"}, "{0} must be >= 0, got ",
                  weight_decay);
  require_setting(std::isfinite(lr_decay) && lr_decay > 0, {"lr_decay"}, "{0} must be positive, got ", lr_decay);
  for (double m : milestones)
    require_setting(m > 0 && m <= 1, {"milestones"}, "{0} must be fractions in (0, 1], got ", m);
  require_setting(std::isfinite(gamma) && gamma >= 0, {"gamma"}, "{0} must be >= 0, got ", gamma);
  require_setting(gamma == 0 || model.head == HeadKind::soc, {"gamma", "head"},
                  "{0} (certificate regularization) needs {1} soc");
  require_setting(train_subset >= 0, {"train_subset"}, "{0} must be >= 0, got ", train_subset);
  require_setting(val_split >= 0, {"val_split"}, "{0} must be >= 0, got ", val_split);
  require_setting(test_subset >= 0, {"test_subset"}, "{0} must be >= 0, got ", test_subset);
  require_setting(eval_every > 0, {"eval_every"}, "{0} must be positive, got ", eval_every);
  require(eval_batch > 0, "evaluation batch must be positive, got ", eval_batch);
  require_setting(!eps.empty(), {"eps"}, "{0} needs at least one value");
  for (int e : eps) require_setting(e >= 0, {"eps"}, "{0} values must be non-negative numerators over 255, got ", e);
  require_setting(precision != ConvPrecision::tf32 || device == Device::cuda, {"precision", "device"},
                  "{0} tf32 is a CUDA tensor-core format; with {1} cpu use {0} fp32 or bf16");
  require_thread_count(threads);  // SettingError naming "threads"
  for (int i = 0; i < 3; ++i)
    require_setting(normalization.std[i] > 0 && std::isfinite(normalization.std[i]), {"std"},
                    "{0} values must be positive");
}

std::string TrainConfig::to_json() const {
  json j;
  j["conv"] = conv_kind_name(model.conv);
  j["groups"] = model.groups_text();
  j["depth"] = model.depth;
  j["width"] = model.init_channels;
  j["classes"] = model.classes;
  j["activation"] = activation_name(model.activation);
  j["head"] = head_name(model.head);
  j["downsample_keep"] = keep_name(model.keep);
  j["train_terms"] = model.train_terms;
  j["eval_terms"] = model.eval_terms;
  j["power_schedule"] = model.power_schedule.str();
  j["architecture"] = model.architecture();
  j["mean"] = std::vector<float>(normalization.mean.begin(), normalization.mean.end());
  j["std"] = std::vector<float>(normalization.std.begin(), normalization.std.end());
  j["data"] = data_dir;
  j["out"] = out_dir;
  j["device"] = device_name(device);
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
    c.model.conv = parse_conv_kind(j.at("conv").get<std::string>());
    c.model.groups = GroupCounts::parse(j.at("groups").get<std::string>(), "'groups'");
    c.model.depth = json_int(j, "depth", 5, kMaxDepth);
    c.model.init_channels = json_int(j, "width", 1, kLargestInt64);
    c.model.classes = json_int(j, "classes", 2, kLargestInt64);
    c.model.activation = parse_activation(j.at("activation").get<std::string>());
    c.model.head = parse_head(j.at("head").get<std::string>());
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
    c.device = parse_device(j.at("device").get<std::string>());
    // Absent in runs from before --precision existed: they trained in float32.
    c.precision = parse_conv_precision(json_string(j, "precision", "fp32"));
    c.epochs = json_int(j, "epochs", 1, kMaxTrainingSteps);
    c.batch_size = json_int(j, "batch", 1, kLargestInt64);
    c.lr = json_number(j, "lr");
    c.momentum = json_number(j, "momentum");
    c.weight_decay = json_number(j, "weight_decay");
    c.lr_decay = json_number(j, "lr_decay");
    c.milestones = j.at("milestones").get<std::vector<double>>();
    c.gamma = json_number(j, "gamma");
    c.train_subset = json_int(j, "train_subset", 0, kLargestInt64);
    c.val_split = json_int(j, "val_split", 0, kLargestInt64);
    c.test_subset = json_int(j, "test_subset", 0, kLargestInt64);
    c.eval_every = json_int(j, "eval_every", 1, kLargestInt64);
    c.eps.clear();
    require(j.at("eps").is_array(), "'eps' must be an array");
    for (const json& e : j.at("eps")) c.eps.push_back(static_cast<int>(json_integer(e, "eps", 0, kLargestInt)));
    c.seed = json_uint64(j, "seed");
    c.model.seed = c.seed;
    c.threads = static_cast<int>(json_int(j, "threads", 0, kLargestInt));
  } catch (const Error& e) {
    throw ConfigError(std::string("invalid training configuration: ") + e.what());
  } catch (const std::exception& e) {
    throw ConfigError(std::string("invalid training configuration JSON: ") + e.what());
  }
  return c;
}

}  // namespace orthoconv
