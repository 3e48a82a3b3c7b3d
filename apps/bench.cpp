// orthoconv bench: speed measurements (not tests).
//
// `orthoconv bench layers`: at the shapes of LipConvnet-15's layers (batch 128: 32ch 32x32, 64ch 16x16, 128ch 8x8,
// 256ch 4x4, 512ch 2x2) the time of SocConv (groups 1, k3, C -> C), GsSocConv (4,1) and (4,-): forward in
// training mode (5 terms, one power iteration), forward + backward in training mode, forward in evaluation mode
// (12 terms); and, in the same run and interleaved with them, a plain 3x3 convolution of the same shape through
// the same Backend (conv layout in and out; forward, and forward + backward-data + backward-weights).
// The figure of merit is the throughput ratio
//     (FLOPs of the layer's series convolutions / layer time) / (plain convolution FLOPs / plain time),
// with the series FLOPs counted exactly: each series term is one convolution of 2 * N*H*W * C * (C/g) * k*k
// FLOPs forward, and as much again for its backward-data and for its share of the batched backward-weights.
// Everything else a layer does (layout reorders, Horner's additions, the power iteration, the filter's
// skew-symmetrization and scaling, shuffles, bias) is time without FLOPs: it lowers the ratio.
// Layers with a 1x1 SocConv (GS-SOC (4,1)'s second stage) run once per --paths entry (series, matrix, matrix-conv,
// matrix-gemm, auto: the cost model's choice; soc_conv.hpp), interleaved with everything else; the FLOPs stay those of
// the series, so a faster path shows as a ratio above the series'. Per shape, the 1x1 stage's share of a (4,1) layer is
// 1 - time(4,-) / time(4,1) for each path.
//
// On a machine shared with other jobs run it with OMP_WAIT_POLICY=passive: with OpenMP's default spinning waits
// an oversubscribed machine turns every barrier into a wait for a descheduled thread, which penalizes layers
// (many short parallel regions) far more than one long convolution.
//
// `orthoconv bench train`: full training steps of a LipConvnet (apps/bench_train.cpp).
#include <dlfcn.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "bench_train.hpp"
#include "commands.hpp"
#include "orthoconv/orthoconv.hpp"
#include "orthoconv/limits.hpp"

namespace orthoconv::apps {

namespace {

struct LayerBenchOptions {
  bool json = false;
  int64_t batch = 128;
  int repeats = 7;
  int warmup = 2;
  int threads = 0;             // 0: the OpenMP default
  std::string clock = "wall";  // wall | cpu (process CPU time)
  std::vector<int64_t> channels{32, 64, 128, 256, 512};
  std::vector<std::string> layers{"soc", "gs-soc(4,1)", "gs-soc(4,-)"};
  int train_terms = 5;
  int eval_terms = 12;
  uint64_t seed = 1;
  std::vector<std::string> paths{"series", "auto"};
};

// The CLI does not link OpenMP itself; the library's runtime (loaded through liborthoconv and oneDNN) is found
// at run time. Returns the thread count in effect, or 0 when no OpenMP runtime is present.
int set_openmp_threads(int threads) {
  using SetFn = void (*)(int);
  using GetFn = int (*)();
  auto set = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  auto get = reinterpret_cast<GetFn>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
  if (threads > 0 && set) set(threads);
  return get ? get() : 0;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// CPU time of the whole process (all threads), in ms: on a machine shared with other jobs the wall time of a run
// includes the neighbours' time slices, its CPU time (with OMP_WAIT_POLICY=passive) mostly does not.
double cpu_ms() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return 1e3 * static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-3 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void fill_random(Tensor& t, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> host(static_cast<size_t>(t.numel()));
  for (float& x : host) x = normal(rng);
  cpu_backend()->from_host(host.data(), t.data(), t.numel());
}

// One timed thing: a function run `warmup` times untimed, then once per repeat (interleaved with the others).
struct Timed {
  std::string name;
  std::function<void()> run;
  std::vector<double> ms;
  double median_ms() const { return median(ms); }
};

// The series convolutions of a layer: its ConvShapes (one per SOC stage, from the layer's steps).
struct LayerCase {
  std::string name;
  std::string path = "-";         // the 1x1 stage's path setting, "-" without a 1x1 stage
  SocConv* one_by_one = nullptr;  // the 1x1 stage
  std::unique_ptr<Layer> layer;
  std::vector<NetworkStep> steps;  // conv_steps of the layer (model.hpp)
  std::vector<ConvShape> series;   // one per SOC stage
  Tensor input, output, diff_output, diff_input;
  double series_macs() const {
    double m = 0.0;
    for (const auto& s : series) m += static_cast<double>(s.macs());
    return m;
  }
};

std::unique_ptr<LayerCase> make_case(const std::string& name, int64_t channels, int64_t size, int64_t batch,
                                     const std::optional<GroupCounts>& gs_groups, const LayerBenchOptions& o,
                                     const std::string& path = "-") {
  auto c = std::make_unique<LayerCase>();
  c->name = name;
  c->path = path;
  SocConfig base;
  base.in_channels = base.out_channels = channels;
  base.kernel = 3;
  base.train_terms = o.train_terms;
  base.eval_terms = o.eval_terms;
  base.seed = o.seed;
  const Shape image{1, channels, size, size};
  if (!gs_groups) {  // a plain SocConv
    auto layer = std::make_unique<SocConv>(base);
    c->steps = conv_steps(*layer, name, name, image);
    c->layer = std::move(layer);
  } else {
    GsSocConfig config;
    config.base = base;
    config.groups = *gs_groups;
    auto layer = std::make_unique<GsSocConv>(config);
    c->steps = conv_steps(*layer, name, name, image);
    c->layer = std::move(layer);
  }
  for (const NetworkStep& step : c->steps) {
    if (!step.soc) continue;
    const SocConfig& soc = step.soc->config();
    ConvShape s;  // the series convolution: C*g channels at the output side
    s.batch = batch;
    s.in_channels = s.out_channels = soc.group_channels() * soc.groups;
    s.height = s.width = step.output[2];
    s.kernel = soc.kernel;
    s.groups = soc.groups;
    c->series.push_back(s);
    if (soc.kernel == 1) {
      c->one_by_one = step.soc;
      c->one_by_one->set_path(parse_soc_path(path));
    }
  }
  std::mt19937_64 rng(o.seed + 17);
  c->input = Tensor(Shape{batch, channels, size, size});
  c->diff_output = Tensor(Shape{batch, channels, size, size});
  fill_random(c->input, rng);
  fill_random(c->diff_output, rng);
  return c;
}

// Keeps every training-mode forward on the steady-state schedule (one power iteration, not the 50 of every
// 200th step), so that repeats measure the same work.
void steady_step(const LayerCase& c) {
  for (const NetworkStep& step : c.steps)
    if (step.soc) step.soc->set_step(1);
}

// A layer case's three timings: a training forward, a training step (forward + backward), an evaluation forward.
void add_layer_timings(std::vector<Timed>& timed, LayerCase* lc) {
  if (lc->path != "-") lc->name += " " + lc->path;
  timed.push_back({lc->name + " forward",
                   [lc] {
                     lc->layer->set_training(true);
                     steady_step(*lc);
                     lc->layer->forward(lc->input, lc->output);
                   },
                   {}});
  timed.push_back({lc->name + " train",
                   [lc] {
                     lc->layer->set_training(true);
                     steady_step(*lc);
                     lc->layer->forward(lc->input, lc->output);
                     lc->layer->backward(lc->diff_output, lc->diff_input);
                   },
                   {}});
  timed.push_back({lc->name + " eval",
                   [lc] {
                     lc->layer->set_training(false);
                     lc->layer->forward(lc->input, lc->output);
                   },
                   {}});
}

// Warm-up rounds, then repeats of every timing interleaved (one round runs each once), on the chosen clock.
void run_timings(std::vector<Timed>& timed, const LayerBenchOptions& o, Backend& be) {
  for (int w = 0; w < o.warmup; ++w)
    for (auto& t : timed) t.run();
  for (int r = 0; r < o.repeats; ++r)
    for (auto& t : timed) {
      be.synchronize();
      const bool wall = o.clock == "wall";
      const double start = wall ? now_ms() : cpu_ms();
      t.run();
      be.synchronize();
      t.ms.push_back((wall ? now_ms() : cpu_ms()) - start);
    }
}

// The layers of --layers on `channels` x size x size; GS-SOC (4,1) once per --paths entry.
std::vector<std::unique_ptr<LayerCase>> layer_cases(int64_t channels, int64_t size, int64_t batch,
                                                    const LayerBenchOptions& o) {
  std::vector<std::unique_ptr<LayerCase>> cases;
  auto wanted = [&](const std::string& name) {
    return std::find(o.layers.begin(), o.layers.end(), name) != o.layers.end();
  };
  if (wanted("soc")) cases.push_back(make_case("soc", channels, size, batch, std::nullopt, o));
  if (wanted("gs-soc(4,1)"))
    for (const std::string& path : o.paths)
      cases.push_back(make_case("gs-soc(4,1)", channels, size, batch, GroupCounts{4, 1}, o, path));
  if (wanted("gs-soc(4,-)"))
    cases.push_back(make_case("gs-soc(4,-)", channels, size, batch, GroupCounts{4, std::nullopt}, o));
  return cases;
}

// The path the layer's 1x1 stage takes on `input` in each mode (null without a 1x1 stage); leaves it in evaluation.
nlohmann::json one_by_one_paths(LayerCase& c, const Shape& input) {
  if (!c.one_by_one) return nullptr;
  c.one_by_one->set_training(true);
  const std::string train_path = soc_path_name(c.one_by_one->path_for(input));
  c.one_by_one->set_training(false);
  return {{"train", train_path}, {"eval", soc_path_name(c.one_by_one->path_for(input))}};
}

nlohmann::json bench_shape(int64_t channels, const LayerBenchOptions& o, cpu::CpuBackend* cpu) {
  auto backend = cpu_backend();
  Backend& be = *backend;
  const int64_t size = 32 * 32 / channels;  // LipConvnet-15: C * H = 1024
  const int64_t batch = o.batch;

  // The plain 3x3 convolution of the same shape, in the conv layout, through the same Backend.
  ConvShape plain;
  plain.batch = batch;
  plain.in_channels = plain.out_channels = channels;
  plain.height = plain.width = size;
  plain.kernel = 3;
  plain.groups = 1;
  const int64_t buffer = be.conv_buffer_size(plain);
  std::mt19937_64 rng(o.seed);
  Tensor src(Shape{buffer}), dst(Shape{buffer}), diff_dst(Shape{buffer}), diff_src(Shape{buffer});
  Tensor plain_w(Shape{plain.weight_count()}), diff_w(Shape{plain.weight_count()});
  fill_random(src, rng);
  fill_random(diff_dst, rng);
  fill_random(plain_w, rng);
  Tensor w_fwd(Shape{be.conv_weights_size(plain, ConvPass::forward)});
  Tensor w_bwd(Shape{be.conv_weights_size(plain, ConvPass::backward_data)});
  be.weights_to_conv_layout(plain, ConvPass::forward, plain_w.data(), w_fwd.data());
  be.weights_to_conv_layout(plain, ConvPass::backward_data, plain_w.data(), w_bwd.data());

  std::vector<std::unique_ptr<LayerCase>> cases = layer_cases(channels, size, batch, o);

  std::vector<Timed> timed;
  timed.push_back({"plain forward", [&] { be.conv_forward(plain, src.data(), w_fwd.data(), dst.data(), false); }, {}});
  timed.push_back({"plain train",
                   [&] {
                     be.conv_forward(plain, src.data(), w_fwd.data(), dst.data(), false);
                     be.conv_backward_data(plain, diff_dst.data(), w_bwd.data(), diff_src.data());
                     be.conv_backward_weights(plain, src.data(), diff_dst.data(), diff_w.data());
                   },
                   {}});
  for (auto& c : cases) add_layer_timings(timed, c.get());
  run_timings(timed, o, be);
  auto ms_of = [&](const std::string& name) {
    for (auto& t : timed)
      if (t.name == name) return t.median_ms();
    throw Error("bench: no timing named " + name);
  };

  const double plain_flops = 2.0 * static_cast<double>(plain.macs());
  const double plain_fwd_ms = ms_of("plain forward"), plain_train_ms = ms_of("plain train");
  const double plain_fwd_rate = plain_flops / plain_fwd_ms * 1e-6;  // GFLOP/s
  const double plain_train_rate = 3.0 * plain_flops / plain_train_ms * 1e-6;
  nlohmann::json record{{"channels", channels},
                        {"size", size},
                        {"batch", batch},
                        {"plain",
                         {{"forward_ms", plain_fwd_ms},
                          {"train_ms", plain_train_ms},
                          {"forward_flops", plain_flops},
                          {"train_flops", 3.0 * plain_flops},
                          {"forward_gflops", plain_fwd_rate},
                          {"train_gflops", plain_train_rate},
                          {"implementation", cpu ? cpu->implementation(plain) : be.name()}}},
                        {"layers", nlohmann::json::array()}};
  double soc_ms[3] = {0, 0, 0}, series_ms[3] = {0, 0, 0};
  for (auto& c : cases)
    if (c->path == "series") {
      series_ms[0] = ms_of(c->name + " forward");
      series_ms[1] = ms_of(c->name + " train");
      series_ms[2] = ms_of(c->name + " eval");
    }
  double single_stage_train_ms = 0.0;  // GS-SOC (4,-): the (4,1) layer without its 1x1 stage
  for (auto& c : cases)
    if (c->name == "gs-soc(4,-)") single_stage_train_ms = ms_of("gs-soc(4,-) train");
  for (auto& c : cases) {
    const double conv_flops = 2.0 * c->series_macs();  // one series term over all stages
    const double fwd_flops = o.train_terms * conv_flops, train_flops = 3.0 * fwd_flops;
    const double eval_flops = o.eval_terms * conv_flops;
    const double fwd_ms = ms_of(c->name + " forward"), train_ms = ms_of(c->name + " train");
    const double eval_ms = ms_of(c->name + " eval");
    if (c->name == "soc") {
      soc_ms[0] = fwd_ms;
      soc_ms[1] = train_ms;
      soc_ms[2] = eval_ms;
    }
    nlohmann::json impls = nlohmann::json::array();
    for (const auto& s : c->series)
      impls.push_back({{"shape", s.str()}, {"implementation", cpu ? cpu->implementation(s) : be.name()}});
    // The path the 1x1 stage took in each mode (its last forward was the eval one; ask for training).
    const nlohmann::json taken = one_by_one_paths(*c, Shape{batch, channels, size, size});
    nlohmann::json over_series = nullptr;
    if (c->path != "-" && series_ms[1] > 0.0)
      over_series = {{"forward", series_ms[0] / fwd_ms},
                     {"train", series_ms[1] / train_ms},
                     {"eval_forward", series_ms[2] / eval_ms}};
    nlohmann::json share = nullptr;
    if (c->path != "-" && single_stage_train_ms > 0.0) share = 1.0 - single_stage_train_ms / train_ms;
    record["layers"].push_back(
        {{"layer", c->name},
         {"path", c->path},
         {"path_taken", taken},
         {"speedup_over_series", over_series},
         {"one_by_one_train_share", share},
         {"description", c->layer->describe()},
         {"forward_ms", fwd_ms},
         {"train_ms", train_ms},
         {"eval_forward_ms", eval_ms},
         {"forward_flops", fwd_flops},
         {"train_flops", train_flops},
         {"eval_forward_flops", eval_flops},
         {"forward_gflops", fwd_flops / fwd_ms * 1e-6},
         {"train_gflops", train_flops / train_ms * 1e-6},
         {"eval_forward_gflops", eval_flops / eval_ms * 1e-6},
         {"forward_ratio", fwd_flops / fwd_ms * 1e-6 / plain_fwd_rate},
         {"train_ratio", train_flops / train_ms * 1e-6 / plain_train_rate},
         {"eval_forward_ratio", eval_flops / eval_ms * 1e-6 / plain_fwd_rate},
         {"speedup_over_soc", soc_ms[1] > 0.0 ? nlohmann::json{{"forward", soc_ms[0] / fwd_ms},
                                                               {"train", soc_ms[1] / train_ms},
                                                               {"eval_forward", soc_ms[2] / eval_ms}}
                                              : nlohmann::json(nullptr)},
         {"series_convolutions", impls}});
  }
  return record;
}

void print_header(const nlohmann::json& out) {
  std::printf(
      "orthoconv bench layers: %s, %d OpenMP threads (OMP_WAIT_POLICY %s), batch %lld, median %s time of %d "
      "repeats after %d warm-up\n",
      out["backend"].get<std::string>().c_str(), out["threads"].get<int>(),
      out["omp_wait_policy"].get<std::string>().c_str(), (long long)out["batch"].get<int64_t>(),
      out["clock"].get<std::string>().c_str(), out["repeats"].get<int>(), out["warmup"].get<int>());
  std::printf("train = forward + backward, %d terms, 1 power iteration; eval = forward, %d terms.\n",
              out["train_terms"].get<int>(), out["eval_terms"].get<int>());
  std::printf(
      "ratio = (series conv FLOP/s) / (plain 3x3 conv FLOP/s, same shape, same run); "
      "xSOC = SOC time / layer time\n");
  std::printf(
      "1x1 paths (--paths): series, matrix[-conv|-gemm], auto (=the cost model's choice in training/evaluation); "
      "xSer = the same layer's series time / its time; 1x1%% = the 1x1 stage's share of the (4,1) training "
      "step, 1 - (4,-) / (4,1)\n\n");
  std::printf("%-13s %-30s %9s %7s %6s %9s %7s %6s %9s %7s %6s %6s %6s %6s %6s %6s %6s %5s\n", "shape", "layer",
              "fwd ms", "GF/s", "ratio", "train ms", "GF/s", "ratio", "eval ms", "GF/s", "ratio", "xSOCf", "xSOCt",
              "xSOCe", "xSerf", "xSert", "xSere", "1x1%");
  std::fflush(stdout);
}

void print_shape(const nlohmann::json& r) {
  char shape[32];
  std::snprintf(shape, sizeof shape, "%lldch %lldx%lld", (long long)r["channels"].get<int64_t>(),
                (long long)r["size"].get<int64_t>(), (long long)r["size"].get<int64_t>());
  const auto& p = r["plain"];
  std::printf("%-13s %-30s %9.2f %7.1f %6s %9.2f %7.1f %6s\n", shape, "plain conv", p["forward_ms"].get<double>(),
              p["forward_gflops"].get<double>(), "1", p["train_ms"].get<double>(), p["train_gflops"].get<double>(),
              "1");
  for (const auto& l : r["layers"]) {
    const auto& s = l["speedup_over_soc"];
    std::string name = l["layer"].get<std::string>();
    if (!l["path_taken"].is_null() && l["path"] == "auto") {
      const std::string train = l["path_taken"]["train"], eval = l["path_taken"]["eval"];
      name += "=" + (train == eval ? train : train + "/" + eval);
    }
    char over[64] = "", share[16] = "", soc[32] = "      -      -      -";
    if (!s.is_null())
      std::snprintf(soc, sizeof soc, "%6.2f %6.2f %6.2f", s["forward"].get<double>(), s["train"].get<double>(),
                    s["eval_forward"].get<double>());
    if (!l["speedup_over_series"].is_null()) {
      const auto& v = l["speedup_over_series"];
      std::snprintf(over, sizeof over, " %6.2f %6.2f %6.2f", v["forward"].get<double>(), v["train"].get<double>(),
                    v["eval_forward"].get<double>());
    }
    if (!l["one_by_one_train_share"].is_null())
      std::snprintf(share, sizeof share, " %4.0f%%", 100.0 * l["one_by_one_train_share"].get<double>());
    std::printf("%-13s %-30s %9.2f %7.1f %6.2f %9.2f %7.1f %6.2f %9.2f %7.1f %6.2f %s%s%s\n", "", name.c_str(),
                l["forward_ms"].get<double>(), l["forward_gflops"].get<double>(), l["forward_ratio"].get<double>(),
                l["train_ms"].get<double>(), l["train_gflops"].get<double>(), l["train_ratio"].get<double>(),
                l["eval_forward_ms"].get<double>(), l["eval_forward_gflops"].get<double>(),
                l["eval_forward_ratio"].get<double>(), soc, over, share);
  }
  std::fflush(stdout);
}

void print_implementations(const nlohmann::json& out) {
  std::printf("\noneDNN implementations:\n");
  for (const auto& r : out["shapes"]) {
    std::printf("  plain %lldch: %s\n", (long long)r["channels"].get<int64_t>(),
                r["plain"]["implementation"].get<std::string>().c_str());
    for (const auto& l : r["layers"])
      for (const auto& s : l["series_convolutions"])
        std::printf("  %-12s %s: %s\n", l["layer"].get<std::string>().c_str(), s["shape"].get<std::string>().c_str(),
                    s["implementation"].get<std::string>().c_str());
  }
}

int run_layer_bench(const LayerBenchOptions& o) {
  require(o.batch > 0, "--batch must be positive, got ", o.batch);
  require(o.repeats > 0, "--repeats must be positive, got ", o.repeats);
  require(o.warmup >= 0, "--warmup must be >= 0, got ", o.warmup);
  require_thread_count(o.threads);
  for (int64_t c : o.channels)
    require(c >= 4 && c <= 1024 && 1024 % c == 0, "--channels: each must divide 1024 (C * H = 1024), got ", c);
  const int threads = set_openmp_threads(o.threads);
  auto backend = cpu_backend();
  auto* cpu = dynamic_cast<cpu::CpuBackend*>(backend.get());
  const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
  nlohmann::json out{{"benchmark", "layers"},
                     {"backend", backend->name()},
                     {"threads", threads},
                     {"omp_wait_policy", wait_policy ? wait_policy : "default"},
                     {"batch", o.batch},
                     {"clock", o.clock},
                     {"repeats", o.repeats},
                     {"warmup", o.warmup},
                     {"train_terms", o.train_terms},
                     {"eval_terms", o.eval_terms},
                     {"paths", o.paths},
                     {"shapes", nlohmann::json::array()}};
  if (!o.json) print_header(out);
  for (int64_t c : o.channels) {
    out["shapes"].push_back(bench_shape(c, o, cpu));
    if (!o.json) print_shape(out["shapes"].back());
  }
  if (o.json)
    std::printf("%s\n", out.dump(2).c_str());
  else
    print_implementations(out);
  return 0;
}

Runner setup_bench(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "Benchmarks: layers (SOC / GS-SOC vs a plain convolution), train, certify");
  cmd->require_subcommand(1);

  auto lo = std::make_shared<LayerBenchOptions>();
  auto* layers = cmd->add_subcommand("layers", "SocConv / GsSocConv at LipConvnet-15's shapes vs a plain 3x3 conv");
  layers->add_flag("--json", lo->json, "print one JSON object");
  layers->add_option("--batch", lo->batch, "batch size")->capture_default_str();
  layers->add_option("--repeats", lo->repeats, "timed repeats (median reported)")->capture_default_str();
  layers->add_option("--warmup", lo->warmup, "untimed runs first")->capture_default_str();
  layers->add_option("--threads", lo->threads, "OpenMP threads (0: default)")->capture_default_str();
  layers
      ->add_option("--clock", lo->clock,
                   "time measured: wall, or cpu (the process's CPU time: on a shared "
                   "machine, with OMP_WAIT_POLICY=passive)")
      ->capture_default_str()
      ->check(CLI::IsMember({"wall", "cpu"}));
  layers->add_option("--channels", lo->channels, "shapes to run, by channel count (C x 1024/C x 1024/C)")
      ->capture_default_str();
  layers->add_option("--layers", lo->layers, "layers to run: soc, gs-soc(4,1), gs-soc(4,-)")
      ->capture_default_str()
      ->check(CLI::IsMember({"soc", "gs-soc(4,1)", "gs-soc(4,-)"}));
  layers->add_option("--train-terms", lo->train_terms, "series terms in training mode")->capture_default_str();
  layers->add_option("--eval-terms", lo->eval_terms, "series terms in evaluation mode")->capture_default_str();
  layers->add_option("--seed", lo->seed, "random seed")->capture_default_str();
  layers
      ->add_option("--paths", lo->paths,
                   "paths of the 1x1 stage to run side by side: series, matrix, "
                   "matrix-conv, matrix-gemm (the matrix path's two applications of P), auto")
      ->capture_default_str()
      ->check(CLI::IsMember({"series", "matrix", "matrix-conv", "matrix-gemm", "auto"}));

  auto to = std::make_shared<TrainBenchOptions>();
  auto* train = cmd->add_subcommand("train", "images/s of full LipConvnet training steps");
  train->add_option("--conv", to->conv, "soc or gs-soc")->capture_default_str();
  train->add_option("--groups", to->groups, "GS-SOC groups 'a,b' or 'a,-'")->capture_default_str();
  train->add_option("--depth", to->depth, "LipConvnet depth")->capture_default_str();
  train->add_option("--batch", to->batch, "batch size")->capture_default_str();
  train->add_option("--steps", to->steps, "timed steps")->capture_default_str();
  train->add_option("--warmup", to->warmup, "untimed steps first")->capture_default_str();
  train->add_option("--device", to->device, "cpu or cuda")->capture_default_str();
  train
      ->add_option("--paths", to->paths,
                   "paths of the 1x1 SocConvs to time side by side, step by step: series, "
                   "matrix (every 1x1 layer; also matrix-conv, matrix-gemm), auto (the cost model's choice, as in "
                   "training)")
      ->capture_default_str()
      ->check(CLI::IsMember({"series", "matrix", "matrix-conv", "matrix-gemm", "auto"}));
  train
      ->add_option("--precision", to->precisions,
                   "series-convolution precisions to compare, e.g. fp32,bf16 "
                   "(steps alternate; ratios against the first)")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "tf32", "bf16"}));
  train->add_flag("--json", to->json, "print one JSON object");

  auto co = std::make_shared<TrainBenchOptions>();
  co->batch = 64;
  co->steps = 2;
  auto* certify = cmd->add_subcommand("certify", "images/s of the float32 evaluation and the float64 certifying pass");
  certify->add_option("--conv", co->conv, "soc or gs-soc")->capture_default_str();
  certify->add_option("--groups", co->groups, "GS-SOC groups 'a,b' or 'a,-'")->capture_default_str();
  certify->add_option("--depth", co->depth, "LipConvnet depth")->capture_default_str();
  certify->add_option("--images", co->batch, "images per pass")->capture_default_str();
  certify->add_option("--steps", co->steps, "timed passes")->capture_default_str();
  certify->add_option("--warmup", co->warmup, "untimed passes first")->capture_default_str();
  certify->add_option("--device", co->device, "cpu or cuda (the float32 pass; the float64 pass runs on the host)")
      ->capture_default_str();
  certify->add_flag("--json", co->json, "print one JSON object");

  return [layers, train, certify, lo, to, co]() -> int {
    if (layers->parsed()) return run_layer_bench(*lo);
    if (train->parsed()) return run_train_benchmark(*to);
    if (certify->parsed()) return run_certify_benchmark(*co);
    return 2;
  };
}

}  // namespace

static const bool registered = register_command("bench", setup_bench);

}  // namespace orthoconv::apps
