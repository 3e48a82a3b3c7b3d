// orthoconv train: LipConvnet on CIFAR-100 with the GS paper's recipe (the defaults), certified accuracy every
// epoch, metrics logs and atomic checkpoints in --out, exact --resume.
//
// --preset paper (the default) is Table 3's recipe: 200 epochs of the full training set, batch 128, SGD lr 0.1
// momentum 0.9 wd 5e-4, lr x0.1 at 50% and 75% of the iterations. --preset quick is a short CPU schedule (a
// training subset, a few epochs, a test subset) sized to finish in about ten minutes on 2 cores; any flag given
// explicitly overrides the preset. With --resume DIR, every flag not given is taken from DIR/config.json; the
// architecture flags, when given, must be the run's.
//
// Signals: the first SIGINT / SIGTERM asks the trainer to stop after the step in progress; it writes
// last.safetensors at that step (a resume continues exactly there) and the command exits with 128 + the signal
// number. A second signal exits at once: the checkpoint on disk is then the previous one, intact (every file is
// written atomically; the next start in that directory removes the temporary file).
//
// Under mpirun / srun (several ranks; docs/distributed.md) the job trains one model data-parallel: rank 0 prints
// and writes, and no signal handlers are installed (the launcher delivers the signals and ends the job; resume
// from the last epoch's checkpoint).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.hpp"
#include "job.hpp"
#include "model_options.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/trainer.hpp"

namespace orthoconv::apps {

namespace {

namespace fs = std::filesystem;

// The flags bind to the TrainConfig fields directly (its defaults are the flags' defaults); the few that need
// parsing or a check first (architecture, device, precision, normalization) are kept as given.
struct TrainOptions {
  TrainConfig config;
  ModelFlags model;
  std::string preset = "paper";
  std::string resume;
  std::string device = "cpu";
  std::string precision = "fp32";
  std::vector<float> mean{0.4914f, 0.4822f, 0.4465f}, std{0.2507f, 0.2507f, 0.2507f};
  int64_t stop_after = 0;
};

// The short CPU schedule of --preset quick: LipConvnet-15 GS-SOC (4,1) on 2 idle cores takes ~1.1 s per step
// (2.2 CPU s on one core), so 3 epochs of 80 steps plus 500-image evaluations take about 6 minutes.
// scripts/quickstart.sh sizes the subset from a step measured on the machine instead.
struct QuickPreset {
  static constexpr int64_t epochs = 3;
  static constexpr int64_t train_subset = 10240;
  static constexpr int64_t test_subset = 500;
};

TrainConfig config_from_options(const TrainOptions& o) {
  TrainConfig c = o.config;
  c.model = o.model.config();
  require(o.mean.size() == 3 && o.std.size() == 3, "--mean and --std take 3 comma-separated values each");
  for (int i = 0; i < 3; ++i) {
    c.normalization.mean[i] = o.mean[i];
    c.normalization.std[i] = o.std[i];
  }
  c.device = parse_device(o.device);
  c.precision = parse_conv_precision(o.precision);
  c.model.seed = c.seed;
  c.validate();
  return c;
}

// The signal handler only touches this lock-free atomic (async-signal-safe); the trainer polls it.
std::atomic<int> g_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);

void on_signal(int signal) {
  int expected = 0;
  if (g_signal.compare_exchange_strong(expected, signal)) {
    const char message[] =
        "\northoconv: interrupted: finishing the current step, then writing a checkpoint "
        "(interrupt again to exit at once)\n";
    (void)!::write(STDERR_FILENO, message, sizeof message - 1);
    return;
  }
  const char message[] = "\northoconv: interrupted again: exiting at once (the last checkpoint is intact)\n";
  (void)!::write(STDERR_FILENO, message, sizeof message - 1);
  ::signal(signal, SIG_DFL);
  ::raise(signal);
}

// Installs on_signal for SIGINT and SIGTERM while training, and puts the previous handlers back.
class InterruptHandlers {
 public:
  InterruptHandlers() {
    g_signal = 0;
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    ::sigaction(SIGINT, &action, &previous_int_);
    ::sigaction(SIGTERM, &action, &previous_term_);
  }
  ~InterruptHandlers() {
    ::sigaction(SIGINT, &previous_int_, nullptr);
    ::sigaction(SIGTERM, &previous_term_, nullptr);
  }
  InterruptHandlers(const InterruptHandlers&) = delete;
  InterruptHandlers& operator=(const InterruptHandlers&) = delete;

 private:
  struct sigaction previous_int_ {
  }, previous_term_{};
};

// The flags that fix the architecture: on --resume, one given explicitly must be the run's.
constexpr const char* kArchitectureKeys[] = {"conv",    "groups",     "depth", "width",
                                             "classes", "activation", "head",  "downsample_keep"};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

int run_train(CLI::App& cmd, TrainOptions o) {
  const std::shared_ptr<Communicator> job = join_job(o.config.threads);
  if (o.preset == "quick") {
    if (cmd.count("--epochs") == 0) o.config.epochs = QuickPreset::epochs;
    if (cmd.count("--train-subset") == 0) o.config.train_subset = QuickPreset::train_subset;
    if (cmd.count("--test-subset") == 0) o.config.test_subset = QuickPreset::test_subset;
  }
  TrainConfig config = config_from_options(o);
  std::string resume_file;
  if (!o.resume.empty()) {
    // Flags not given explicitly come from the run being resumed.
    const std::string saved_path = (fs::path(o.resume) / "config.json").string();
    resume_file = (fs::path(o.resume) / "last.safetensors").string();
    if (!fs::exists(resume_file)) throw IoError("--resume " + o.resume + ": no last.safetensors there");
    nlohmann::json saved;
    try {
      saved = nlohmann::json::parse(read_text(saved_path));
    } catch (const nlohmann::json::exception& e) {
      throw IoError("--resume: " + saved_path + " is not valid JSON: " + e.what());
    }
    nlohmann::json merged = nlohmann::json::parse(config.to_json());
    const auto flag_of = flag_name;
    auto given = [&](const std::string& key) {
      const CLI::Option* option = cmd.get_option_no_throw(flag_of(key));
      return option != nullptr && option->count() > 0;
    };
    for (const char* key : kArchitectureKeys) {
      if (!given(key) || !saved.contains(key) || saved[key] == merged[key]) continue;
      throw ConfigError("--resume " + o.resume + ": " + flag_of(key) + " " + merged[key].dump() +
                        " differs from "
                        "the run's " +
                        saved[key].dump() + "; a resumed run keeps its architecture (" +
                        saved.value("architecture", std::string("?")) + "): drop " + flag_of(key) +
                        ", or start a new run with another --out");
    }
    for (auto& [key, value] : saved.items())
      if (key != "architecture" && merged.contains(key) && !given(key)) merged[key] = value;
    if (cmd.count("--out") == 0) merged["out"] = o.resume;
    try {
      config = TrainConfig::from_json(merged.dump());
      config.validate();
    } catch (const SettingError& e) {
      throw SettingError(e.settings(),
                         "--resume " + o.resume + ": " + saved_path + " with the flags given: " + e.pattern());
    } catch (const ConfigError& e) {
      throw ConfigError("--resume " + o.resume + ": " + saved_path + " with the flags given: " + e.what());
    }
  }
  use_local_gpu(*job, config.device);
  // Before the dataset is read: a precision this machine cannot run fails at once.
  backend_for(config.device)->check_precision(config.precision);
  config.data_dir = find_cifar100(config.data_dir);
  CifarSplit train = load_cifar100(config.data_dir, "train");
  CifarSplit test = load_cifar100(config.data_dir, "test");
  Trainer trainer(config, train, test, job->root() ? stdout : nullptr, job);
  std::unique_ptr<InterruptHandlers> handlers;
  if (job->size() == 1) {
    handlers = std::make_unique<InterruptHandlers>();
    trainer.set_stop_request([] { return g_signal.load(std::memory_order_relaxed) != 0; });
  }
  trainer.prepare(resume_file);
  if (g_signal != 0) {
    std::fprintf(stderr, "orthoconv: interrupted before the first training step; no checkpoint was written\n");
    return 128 + g_signal;
  }
  trainer.run(o.stop_after);
  if (trainer.interrupted()) {
    std::fprintf(stderr,
                 "orthoconv: stopped at step %lld (epoch %lld, %lld of %lld steps done); checkpoint %s; "
                 "continue with: orthoconv train --resume %s\n",
                 static_cast<long long>(trainer.global_step()), static_cast<long long>(trainer.epochs_done()) + 1,
                 static_cast<long long>(trainer.progress().steps), static_cast<long long>(trainer.steps_per_epoch()),
                 (fs::path(config.out_dir) / "last.safetensors").string().c_str(), config.out_dir.c_str());
    return 128 + g_signal;
  }
  const auto& history = trainer.history();
  if (!history.empty() && job->root()) {
    const EpochMetrics& last = history.back();
    std::printf("done: %lld epochs; ", static_cast<long long>(last.epoch));
    if (last.evaluated) {
      std::printf("test clean %.4f", last.test_accuracy);
      for (auto& [eps, acc] : last.certified) std::printf(", certified@%d/255 %.4f", eps, acc);
      std::printf(" (%lld images); ", static_cast<long long>(last.test_images));
    }
    std::printf("checkpoint %s\n", (fs::path(config.out_dir) / "last.safetensors").string().c_str());
  }
  return 0;
}

Runner setup_train(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand("train", "Train LipConvnet on CIFAR-100 (defaults: the GS paper's recipe)");
  add_model_flags(*cmd, o->model);
  cmd->add_option("--preset", o->preset,
                  "paper (Table 3's recipe, the default) | quick (a short CPU run: "
                  "3 epochs of 10,240 training images, 500 test images)")
      ->capture_default_str()
      ->check(CLI::IsMember({"paper", "quick"}));
  cmd->add_option("--data", o->config.data_dir,
                  "CIFAR-100 binary directory (train.bin, test.bin); default: search "
                  "$ORTHOCONV_DATA, ../shared/cifar100/cifar-100-binary, data/cifar-100-binary");
  cmd->add_option("--out", o->config.out_dir, "output directory (config.json, metrics.*, *.safetensors)")
      ->capture_default_str();
  cmd->add_option("--resume", o->resume, "continue the run in this directory (its last.safetensors)");
  cmd->add_option("--device", o->device, "cpu | cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--precision", o->precision,
                  "series convolutions of the training steps: fp32 | bf16 (CPU with "
                  "AVX512-BF16, CUDA) | tf32 (CUDA); bf16 inputs, float32 accumulation, per shape where faster; "
                  "evaluation and certification always float32")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "tf32", "bf16"}));
  cmd->add_option("--epochs", o->config.epochs, "epochs")->capture_default_str();
  cmd->add_option("--batch", o->config.batch_size, "batch size")->capture_default_str();
  cmd->add_option("--lr", o->config.lr, "initial learning rate")->capture_default_str();
  cmd->add_option("--momentum", o->config.momentum, "SGD momentum")->capture_default_str();
  cmd->add_option("--weight-decay", o->config.weight_decay, "weight decay (all parameters)")->capture_default_str();
  cmd->add_option("--lr-decay", o->config.lr_decay, "lr factor at each milestone")->capture_default_str();
  cmd->add_option("--milestones", o->config.milestones, "milestones as fractions of the total iterations")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--gamma", o->config.gamma, "certificate regularization: loss - gamma * mean(relu(radius))")
      ->capture_default_str();
  cmd->add_option("--train-subset", o->config.train_subset, "train on N training images (0: all)")
      ->capture_default_str();
  cmd->add_option("--val-split", o->config.val_split, "hold N training images out to choose best.safetensors")
      ->capture_default_str();
  cmd->add_option("--test-subset", o->config.test_subset, "evaluate on the first N test images (0: all 10,000)")
      ->capture_default_str();
  cmd->add_option("--eval-every", o->config.eval_every, "epochs between test evaluations")->capture_default_str();
  cmd->add_option("--eps", o->config.eps, "certified radii as numerators over 255 (first: headline)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--mean", o->mean, "normalization mean (R,G,B)")->delimiter(',')->capture_default_str();
  cmd->add_option("--std", o->std, "normalization std (R,G,B)")->delimiter(',')->capture_default_str();
  cmd->add_option("--seed", o->config.seed, "seed (initialization, data order, augmentation)")->capture_default_str();
  cmd->add_option("--threads", o->config.threads, "OpenMP threads (0: default)")->capture_default_str();
  cmd->add_option("--stop-after", o->stop_after, "stop after this epoch as if interrupted (continue with --resume)")
      ->capture_default_str();
  return [o, cmd] { return run_train(*cmd, *o); };
}

}  // namespace

static const bool registered = register_command("train", setup_train);

}  // namespace orthoconv::apps
