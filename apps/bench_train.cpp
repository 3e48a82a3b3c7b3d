// `orthoconv bench train`: images/s of full LipConvnet training steps (forward, cross-entropy, backward, SGD
// update) on random batches, and the process's peak resident memory (getrusage). No dataset needed. Every pair of
// a --paths value (the path of the 1x1 SocConvs) and a --precision value (of the series convolutions) is one
// variant; the variants take turns step by step on the same model, so that all see the same machine.
//
// Under mpirun (N ranks; docs/distributed.md) every rank runs its part of each global batch of --batch images and
// the steps all-reduce their gradients, as `orthoconv train` does: the time in the all-reduces is reported per step
// and as a share of the step, with the volume all-reduced; rank 0 prints, CPU seconds are summed over the ranks.

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "backend/cpu/cpu_backend.hpp"
#include "bench_train.hpp"
#include "commands.hpp"
#include "job.hpp"
#include "orthoconv/model.hpp"
#include "orthoconv/runtime.hpp"
#include "orthoconv/trainer.hpp"

namespace orthoconv::apps {

ModelConfig bench_model_config(const TrainBenchOptions& o) {
  ModelConfig config;
  config.conv = parse_conv_kind(o.conv);
  config.depth = o.depth;
  // The shared default "4,1" is for gs-soc; plain SOC (default_groups) unless a single count is given.
  if (config.conv == ConvKind::gs_soc || o.groups != "4,1") config.groups = GroupCounts::parse(o.groups);
  require(config.conv == ConvKind::gs_soc || !config.group_counts().second, "--conv soc takes one group count, got '",
          o.groups, "'");
  config.validate();
  return config;
}

namespace {

// Every 1x1 SocConv of the model takes `path` (the k x k ones stay on the series, their only path).
void set_one_by_one_path(LipConvnet& model, SocPath path) {
  for (NamedSoc& s : model.soc_layers())
    if (s.soc->config().kernel == 1) s.soc->set_path(path);
}

struct Variant {
  std::string name;  // "<path> <precision>"
  SocPath path;
  ConvPrecision precision;
  std::vector<double> seconds, cpu_seconds, allreduce_seconds;
  int matrix_layers = 0, one_by_one_layers = 0;  // after its last step
  double per_step() const {
    double total = 0.0;
    for (double t : seconds) total += t;
    return total / static_cast<double>(seconds.size());
  }
  double cpu_per_step() const {
    double total = 0.0;
    for (double t : cpu_seconds) total += t;
    return total / static_cast<double>(cpu_seconds.size());
  }
  double allreduce_per_step() const {
    double total = 0.0;
    for (double t : allreduce_seconds) total += t;
    return total / static_cast<double>(allreduce_seconds.size());
  }
};

}  // namespace

namespace {

// The variants, every --paths value with every --precision value; each precision is tried on the model at once, so
// that one this machine cannot run fails before any step, naming --precision.
std::vector<Variant> make_variants(const TrainBenchOptions& o, LipConvnet& model) {
  std::vector<Variant> variants;
  for (const std::string& path : o.paths)
    for (const std::string& precision : o.precisions) {
      variants.push_back({path + " " + precision, parse_soc_path(path), parse_conv_precision(precision), {}, {}, {}});
      model.set_precision(variants.back().precision);
    }
  return variants;
}

// This rank's part of one random global batch of --batch images (all of it in one process): seeded, so every rank
// draws the same batch and every run the same images.
struct RandomBatch {
  Range part;
  Tensor images;
  std::vector<int32_t> labels;
};

RandomBatch random_batch(int64_t batch, int64_t classes, const Communicator& job) {
  std::mt19937_64 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int32_t> label(0, static_cast<int32_t>(classes - 1));
  std::vector<float> host(static_cast<size_t>(batch * 3 * 32 * 32));
  for (float& x : host) x = normal(rng);
  std::vector<int32_t> all_labels(static_cast<size_t>(batch));
  for (int32_t& y : all_labels) y = label(rng);
  RandomBatch out;
  out.part = batch_part(batch, job.rank(), job.size());
  out.images = Tensor::from_vector(
      std::vector<float>(host.begin() + out.part.begin * kCifarPixels, host.begin() + out.part.end * kCifarPixels),
      Shape{out.part.size(), 3, 32, 32});
  out.labels.assign(all_labels.begin() + out.part.begin, all_labels.begin() + out.part.end);
  return out;
}

// Warm-up steps first (they also make the backend's per-shape precision choices), then the timed steps, the
// variants taking turns step by step. Each timed step records its wall time, the process's CPU time (all threads:
// on a shared machine wall time measures the neighbours too) and its time in all-reduces.
void time_variants(const TrainBenchOptions& o, LipConvnet& model, TrainStep& step, const RandomBatch& batch,
                   std::vector<Variant>& variants) {
  using Clock = std::chrono::steady_clock;
  auto run_step = [&](Variant& p) {
    set_one_by_one_path(model, p.path);
    model.set_precision(p.precision);
    step.run(batch.images, batch.labels, 0.01f, 0.9f, 5e-4f, o.batch);
    model.backend().synchronize();
  };
  for (Variant& p : variants)
    for (int i = 0; i < o.warmup; ++i) run_step(p);
  for (int i = 0; i < o.steps; ++i)
    for (Variant& p : variants) {
      const double cpu_start = process_cpu_seconds(), allreduce_start = step.allreduce_seconds();
      const auto start = Clock::now();
      run_step(p);
      p.seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
      p.cpu_seconds.push_back(process_cpu_seconds() - cpu_start);
      p.allreduce_seconds.push_back(step.allreduce_seconds() - allreduce_start);
      p.matrix_layers = p.one_by_one_layers = 0;
      for (NamedSoc& s : model.soc_layers())
        if (s.soc->config().kernel == 1) {
          ++p.one_by_one_layers;
          p.matrix_layers += is_matrix_path(s.soc->last_path());
        }
    }
}

// What the report says besides the variants: the model, the job, and the headline variant (the first on the path
// training takes, auto, when it was run, else the first).
struct TrainBenchRun {
  const TrainBenchOptions& options;
  const ModelConfig& config;
  LipConvnet& model;
  const Communicator& job;
  const TrainStep& step;
  const RandomBatch& batch;
  const std::vector<Variant>& variants;
  const Variant& headline() const {
    const Variant* main = &variants.front();
    for (auto p = variants.rbegin(); p != variants.rend(); ++p)
      if (p->path == SocPath::automatic) main = &*p;
    return *main;
  }
};

void print_train_json(const TrainBenchRun& run, double rss_mb) {
  const TrainBenchOptions& o = run.options;
  const Variant &first = run.variants.front(), &main = run.headline();
  nlohmann::ordered_json per_variant = nlohmann::json::array();
  for (const Variant& p : run.variants)
    per_variant.push_back({{"path", soc_path_name(p.path)},
                           {"precision", conv_precision_name(p.precision)},
                           {"seconds_per_step", p.per_step()},
                           {"images_per_second", static_cast<double>(o.batch) / p.per_step()},
                           {"cpu_seconds_per_step", p.cpu_per_step()},
                           {"speedup_over_first", first.per_step() / p.per_step()},
                           {"cpu_speedup_over_first", first.cpu_per_step() / p.cpu_per_step()},
                           {"allreduce_seconds_per_step", p.allreduce_per_step()},
                           {"allreduce_share", p.allreduce_per_step() / p.per_step()},
                           {"one_by_one_layers", p.one_by_one_layers},
                           {"matrix_layers", p.matrix_layers}});
  nlohmann::ordered_json out{{"benchmark", "train"},
                             {"model", "LipConvnet-" + std::to_string(run.config.depth)},
                             {"conv", run.config.conv_label()},
                             {"device", o.device},
                             {"threads", thread_count()},
                             {"ranks", run.job.size()},
                             {"communicator", run.job.description()},
                             {"allreduce_floats", run.step.allreduce_floats()},
                             {"batch", o.batch},
                             {"steps", o.steps},
                             {"warmup", o.warmup},
                             {"parameters", run.model.parameter_count()},
                             {"path", soc_path_name(main.path)},
                             {"precision", conv_precision_name(main.precision)},
                             {"seconds_per_step", main.per_step()},
                             {"images_per_second", static_cast<double>(o.batch) / main.per_step()},
                             {"cpu_seconds_per_step", main.cpu_per_step()},
                             {"allreduce_seconds_per_step", main.allreduce_per_step()},
                             {"allreduce_share", main.allreduce_per_step() / main.per_step()},
                             {"peak_rss_mb", rss_mb},
                             {"variants", per_variant}};
  std::printf("%s\n", out.dump().c_str());
}

void print_train_table(const TrainBenchRun& run, double rss_mb) {
  const TrainBenchOptions& o = run.options;
  const Variant &first = run.variants.front(), &main = run.headline();
  std::printf(
      "LipConvnet-%lld %s, batch %lld, %s, %d threads; %d steps per variant (1x1 path, precision) after "
      "%d warm-up, interleaved\n",
      static_cast<long long>(run.config.depth), run.config.conv_label().c_str(), static_cast<long long>(o.batch),
      o.device.c_str(), thread_count(), o.steps, o.warmup);
  for (const Variant& p : run.variants)
    std::printf(
        "  %-12s %.3f s/step  %.1f images/s  %.3f CPU s/step  x%.2f (CPU x%.2f) vs "
        "%s  (%d of %d 1x1 layers on the matrix path)\n",
        p.name.c_str(), p.per_step(), static_cast<double>(o.batch) / p.per_step(), p.cpu_per_step(),
        first.per_step() / p.per_step(), first.cpu_per_step() / p.cpu_per_step(), first.name.c_str(), p.matrix_layers,
        p.one_by_one_layers);
  if (run.job.size() > 1) {
    const double allreduce_mb = 4.0 * static_cast<double>(run.step.allreduce_floats()) / (1024.0 * 1024.0);
    std::printf("  %s, %lld images per rank: all-reduce of %.1f MiB per step, %.3f s/step (%.1f%% of the step)\n",
                run.job.description().c_str(), static_cast<long long>(run.batch.part.size()), allreduce_mb,
                main.allreduce_per_step(), 100.0 * main.allreduce_per_step() / main.per_step());
  }
  std::printf("  peak RSS %.0f MiB%s\n", rss_mb, run.job.size() > 1 ? " (rank 0)" : "");
  if (const auto* cpu = dynamic_cast<const cpu::CpuBackend*>(&run.model.backend()))
    for (const std::string& line : cpu->precision_choices()) std::printf("  bf16 choice: %s\n", line.c_str());
}

}  // namespace

int run_train_benchmark(const TrainBenchOptions& o) {
  require(o.batch > 0, "--batch must be positive, got ", o.batch);
  require(o.steps > 0 && o.warmup >= 0, "--steps must be positive and --warmup >= 0, got ", o.steps, " and ", o.warmup);
  const Device device = parse_device(o.device);
  require(!o.paths.empty(), "--paths needs at least one of series, matrix, auto");
  require(!o.precisions.empty(), "--precision needs at least one of fp32, tf32, bf16");
  const ModelConfig config = bench_model_config(o);
  const std::shared_ptr<Communicator> job = join_job(0);
  use_local_gpu(*job, device);
  require(o.batch >= job->size(), "--batch ", o.batch, " leaves ranks without images: at least one per rank (",
          job->size(), ")");
  LipConvnet model(config, backend_for(device));
  std::vector<Variant> variants = make_variants(o, model);
  Sgd sgd(model);
  Normalization norm;
  TrainStep step(model, sgd, 0.0, norm.lipschitz(), job);
  const RandomBatch batch = random_batch(o.batch, config.classes, *job);
  time_variants(o, model, step, batch, variants);
  // The job's CPU time: every rank's.
  for (Variant& p : variants) job->allreduce_sum(p.cpu_seconds.data(), static_cast<int64_t>(p.cpu_seconds.size()));
  const double rss_mb = static_cast<double>(peak_rss_bytes()) / (1024.0 * 1024.0);
  if (!job->root()) return 0;
  const TrainBenchRun run{o, config, model, *job, step, batch, variants};
  if (o.json)
    print_train_json(run, rss_mb);
  else
    print_train_table(run, rss_mb);
  return 0;
}

}  // namespace orthoconv::apps
