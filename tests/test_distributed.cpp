// Data-parallel training and certification (include/orthoconv/communicator.hpp, docs/distributed.md).
//
// Everywhere: the batch parts and evaluation shards (batch_part, batch_range), and BatchLoader's parts, whose
// concatenation over the ranks must be the batch of one loader, bit for bit.
//
// With MPI (ORTHOCONV_WITH_MPI), through Open MPI's mpirun (--oversubscribe: 2 ranks on any machine; CI runs as
// root, so the test commands set OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)):
//   - 2 ranks train the run of 1 rank: the loss of every step and the final weights within the tolerance of the
//     changed float32 summation order (derived below);
//   - `mpirun -np 2 orthoconv train --stop-after 1`, then `orthoconv train --resume` on 1 rank: the run of 1 rank,
//     within the same tolerance; rank 0 alone printed the log and wrote the run directory;
//   - `mpirun -np 2 orthoconv certify --json` prints the report of 1 process (only the wall-time fields may differ);
//   - a rank that fails (bad input on that rank alone, or weights that differ between the ranks) ends the job
//     with its message and a non-zero exit within seconds, never a hang.
//
// Tolerance of "2 ranks = 1 rank". The only difference between the two runs is the order of the float32 sums that
// make the weight gradients: one process sums the batch's 64 images in one reduction, two ranks sum 32 each and
// MPI adds the two halves (the loss gradient's scale n/batch = 1/2 is exact, and the forward pass of every image
// is the same computation). The largest reduction of the tiny LipConvnet (width 8) is a 3x3 backward-weights sum
// over 64 images x 32 x 32 pixels: m = 65,536 products. Reordering a float32 sum of m terms changes it by about
// sqrt(m) u (sum |t|) for rounding errors of random sign (u = 2^-24 = 6.0e-8): 256 u = 1.5e-5 of sum |t|, and with
// a cancellation factor (sum |t|) / |sum t| of up to 10 in a gradient of random labels, eps_g = 1.5e-4 relative per
// step. SGD with momentum 0.9 sums the steps' gradients with weights adding up to at most 1 / (1 - 0.9) = 10 per
// step, like the displacement itself, so to first order (no growth of differences along the 8-step trajectory)
// the weights differ by eps_g of their displacement: |w_2 - w_1| <= 1.5e-4 * max |w_1 - w_0|. We allow a factor 2
// of growth over the trajectory: tolerance 3e-4 of the largest displacement. A bug in the data-parallel path (a
// part trained twice or not at all, a missing all-reduce, a wrong n / batch scale) moves the weights by a sizable
// fraction of their displacement, thousands of times more. The loss of step s, a function of w_s, moves by at most
// |grad L| |w_2 - w_1|; through the first-order change over the run, |L_s - L_1| <= |grad L| |w_s - w_0|, that is
// the same 3e-4 of the largest change of the loss over the run, plus the double sums of the per-image losses
// (1e-15 relative) and the float32 logits (2^-24 relative each, 1e-6 of the loss allowed).
#include <catch2/catch.hpp>

#include "cli_helpers.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "orthoconv/backend.hpp"
#include "orthoconv/checkpoint.hpp"
#include "orthoconv/communicator.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/runtime.hpp"
#include "orthoconv/trainer.hpp"

using namespace orthoconv;
namespace fs = std::filesystem;
using orthoconv::testing::synthetic_split;

TEST_CASE("batch parts and evaluation shards cover every item once, in order, as evenly as possible", "[distributed]") {
  for (int ranks : {1, 2, 3, 7})
    for (int64_t count : {0, 1, 5, 64, 100, 129}) {
      int64_t next = 0;
      for (int r = 0; r < ranks; ++r) {
        const Range part = batch_part(count, r, ranks);
        CHECK(part.begin == next);
        CHECK(part.size() >= count / ranks);
        CHECK(part.size() <= count / ranks + 1);
        next = part.end;
      }
      CHECK(next == count);
      for (int64_t batch : {1, 16, 64}) {
        next = 0;
        for (int r = 0; r < ranks; ++r) {
          const Range shard = batch_range(count, batch, r, ranks);
          CHECK(shard.begin == next);
          CHECK((shard.begin % batch == 0 || shard.begin == count));  // whole batches
          next = shard.end;
        }
        CHECK(next == count);
      }
    }
  CHECK_THROWS_AS(batch_part(10, 2, 2), ConfigError);
  CHECK(single_process_communicator()->size() == 1);
}

TEST_CASE("BatchLoader parts: the ranks' parts of every batch, put together, are the batch of one loader",
          "[distributed][data]") {
  const CifarSplit split = synthetic_split(150, 10, 3);
  std::vector<int64_t> indices;
  for (int64_t i = 0; i < 140; ++i) indices.push_back((i * 37) % 150);
  BatchLoader::Options whole_options;
  whole_options.batch_size = 64;  // 64, 64 and a last batch of 12
  BatchLoader whole(split, indices, Normalization{}, whole_options);
  const int ranks = 3;
  std::vector<std::unique_ptr<BatchLoader>> parts;
  for (int r = 0; r < ranks; ++r) {
    BatchLoader::Options o = whole_options;
    o.part = r;
    o.parts = ranks;
    parts.push_back(std::make_unique<BatchLoader>(split, indices, Normalization{}, o));
  }
  for (int64_t epoch : {0, 1}) {
    whole.start_epoch(epoch);
    for (auto& p : parts) p->start_epoch(epoch);
    Batch expected, got;
    int64_t batches = 0;
    while (whole.next(expected)) {
      ++batches;
      std::vector<float> images;
      std::vector<int32_t> labels;
      std::vector<int64_t> records;
      for (int r = 0; r < ranks; ++r) {
        REQUIRE(parts[static_cast<size_t>(r)]->next(got));
        CHECK(got.images.dim(0) == batch_part(expected.images.dim(0), r, ranks).size());
        const std::vector<float> v = got.images.to_vector();
        images.insert(images.end(), v.begin(), v.end());
        labels.insert(labels.end(), got.labels.begin(), got.labels.end());
        records.insert(records.end(), got.indices.begin(), got.indices.end());
      }
      CHECK(images == expected.images.to_vector());  // order and augmentation of the whole batch's positions
      CHECK(labels == expected.labels);
      CHECK(records == expected.indices);
    }
    CHECK(batches == 3);
    for (auto& p : parts) CHECK_FALSE(p->next(got));
  }
}

TEST_CASE("a job needs an image per rank in every batch: a smaller batch or last batch is one ConfigError",
          "[distributed][train]") {
  // A communicator of 4 ranks that never communicates: the constructor's check comes first.
  struct FourRanks final : Communicator {
    int rank() const override { return 0; }
    int size() const override { return 4; }
    int local_rank() const override { return 0; }
    int local_size() const override { return 4; }
    std::string description() const override { return "4 ranks (test)"; }
    void allreduce_sum(float*, int64_t, Device) override { FAIL("no collective expected"); }
    void allreduce_sum(double*, int64_t) override { FAIL("no collective expected"); }
    void allreduce_sum(int64_t*, int64_t) override { FAIL("no collective expected"); }
    void broadcast(void*, int64_t, int) override { FAIL("no collective expected"); }
    std::vector<double> allgather(const std::vector<double>&) override {
      FAIL("no collective expected");
      return {};
    }
    std::vector<uint64_t> allgather(uint64_t) override {
      FAIL("no collective expected");
      return {};
    }
    void barrier() override {}
    void abort_job(int) noexcept override {}
  };
  const CifarSplit train = synthetic_split(67, 10, 1), test = synthetic_split(8, 10, 2);
  TrainConfig c;
  c.model.conv = ConvKind::soc;
  c.model.groups = GroupCounts{1, std::nullopt};
  c.model.depth = 5;
  c.model.init_channels = 8;
  c.model.classes = 10;
  c.batch_size = 64;  // 67 images: a last batch of 3 for 4 ranks
  c.threads = 1;
  CHECK_THROWS_WITH(Trainer(c, train, test, nullptr, std::make_shared<FourRanks>()),
                    Catch::Contains("last batch of 3") && Catch::Contains("4 ranks"));
  c.batch_size = 3;
  c.train_subset = 60;
  CHECK_THROWS_WITH(Trainer(c, train, test, nullptr, std::make_shared<FourRanks>()),
                    Catch::Contains("batch 3 over 60 training images"));
  c.batch_size = 4;  // 15 batches of 4: fine
  CHECK_NOTHROW(Trainer(c, train, test, nullptr, std::make_shared<FourRanks>()));
}

#if defined(ORTHOCONV_WITH_MPI) && defined(ORTHOCONV_CLI_PATH)

namespace {

using orthoconv::testing::CliResult;
using orthoconv::testing::run_cli;
using orthoconv::testing::run_command;
using orthoconv::testing::slurp;

std::string fresh_dir(const std::string& name) {
  static const orthoconv::testing::TempDir base;  // removed, with every run directory in it, at exit
  const fs::path dir = base.path / name;
  fs::remove_all(dir);
  fs::create_directories(dir.parent_path());
  return dir.string();
}

// mpirun with `ranks` ranks (more than the processors allowed), each with one OpenMP thread and no binding, under a
// timeout: a hang fails the test instead of holding ctest.
std::string mpirun(int ranks, int timeout_seconds = 120) {
  return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 "
         "timeout " +
         std::to_string(timeout_seconds) +
         " " ORTHOCONV_MPIEXEC
         " --oversubscribe --bind-to none "
         "-x OMP_NUM_THREADS=1 -np " +
         std::to_string(ranks) + " ";
}

std::string quoted(const std::string& word) { return "'" + word + "'"; }

// The per-step trace of the library-level run below: the loss of every step, then every weight.
struct Trace {
  std::vector<double> losses;
  std::vector<float> initial, weights;
};

std::vector<float> all_weights(LipConvnet& model) {
  std::vector<float> out;
  for (NamedParameter& p : model.parameters()) {
    const std::vector<float> v = p.parameter->value.to_vector();
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

// 2 epochs of the tiny LipConvnet on 256 random images in batches of 64 (8 steps), as the trainer runs them:
// each rank's part of each global batch, one TrainStep with the job's all-reduces.
Trace train_tiny(std::shared_ptr<Communicator> job) {
  set_thread_count(1);
  const CifarSplit train = synthetic_split(256, 10, 7);
  ModelConfig config;
  config.conv = ConvKind::soc;
  config.groups = GroupCounts{1, std::nullopt};
  config.depth = 5;
  config.init_channels = 8;
  config.classes = 10;
  LipConvnet model(config, backend_for(Device::cpu));
  Sgd sgd(model);
  const Normalization norm;
  TrainStep step(model, sgd, 0.0, norm.lipschitz(), job);
  std::vector<int64_t> indices(256);
  for (int64_t i = 0; i < 256; ++i) indices[static_cast<size_t>(i)] = i;
  BatchLoader::Options options;
  options.batch_size = 64;
  options.part = job->rank();
  options.parts = job->size();
  BatchLoader loader(train, indices, norm, options);
  Trace trace;
  trace.initial = all_weights(model);
  model.set_training(true);
  Batch batch;
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    loader.start_epoch(epoch);
    while (loader.next(batch)) {
      const StepStats s = step.run(batch.images, batch.labels, 0.05f, 0.9f, 5e-4f, 64);
      REQUIRE(s.images == 64);
      trace.losses.push_back(s.loss_sum / static_cast<double>(s.images));
    }
  }
  trace.weights = all_weights(model);
  return trace;
}

template <class T>
void write_values(std::ofstream& out, const std::vector<T>& values) {
  const uint64_t count = values.size();
  out.write(reinterpret_cast<const char*>(&count), sizeof count);
  out.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(count * sizeof(T)));
}

template <class T>
std::vector<T> read_values(std::ifstream& in) {
  uint64_t count = 0;
  in.read(reinterpret_cast<char*>(&count), sizeof count);
  REQUIRE(in);
  REQUIRE(count < (uint64_t{1} << 28));
  std::vector<T> values(count);
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * sizeof(T)));
  REQUIRE(in);
  return values;
}

// max |a - b| <= tolerance * max |reference - initial|, with the numbers in the message.
void check_within_displacement(const std::vector<float>& a, const std::vector<float>& b,
                               const std::vector<float>& initial, double tolerance) {
  REQUIRE(a.size() == b.size());
  REQUIRE(a.size() == initial.size());
  double difference = 0.0, displacement = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    difference = std::max(difference, std::fabs(static_cast<double>(a[i]) - b[i]));
    displacement = std::max(displacement, std::fabs(static_cast<double>(a[i]) - initial[i]));
  }
  INFO("largest weight difference " << difference << ", largest displacement " << displacement << " (tolerance "
                                    << tolerance << " of it)");
  CHECK(displacement > 1e-3);  // the runs trained: the comparison means something
  CHECK(difference <= tolerance * displacement);
}

constexpr double kWeightTolerance = 3e-4;  // of the largest displacement: see the top of this file

std::vector<std::string> tiny_train_args(const std::string& out) {
  return orthoconv::testing::tiny_train_args(out, 2, 64, 256, 96);
}

std::string joined(const std::vector<std::string>& words) {
  std::string out;
  for (const std::string& w : words) out += (out.empty() ? "" : " ") + quoted(w);
  return out;
}

std::vector<float> checkpoint_weights(const std::string& dir) {
  const Checkpoint k = load_checkpoint((fs::path(dir) / "last.safetensors").string());
  std::vector<float> out;
  for (const auto& [name, t] : k.tensors)
    if (name.rfind("optimizer.", 0) != 0) out.insert(out.end(), t.values.begin(), t.values.end());
  return out;
}

std::vector<nlohmann::json> metrics_of(const std::string& dir) {
  std::vector<nlohmann::json> out;
  std::ifstream in(fs::path(dir) / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

}  // namespace

// Run under mpirun by the next test case (hidden: it needs the ranks).
TEST_CASE("mpi worker: the tiny run on this job's ranks, traced into $ORTHOCONV_MPI_TRACE", "[.mpi-worker]") {
  const std::shared_ptr<Communicator> job = world_communicator();
  REQUIRE(job->size() == 2);
  const Trace trace = train_tiny(job);
  if (job->root()) {
    std::ofstream out(std::getenv("ORTHOCONV_MPI_TRACE"), std::ios::binary);
    write_values(out, trace.losses);
    write_values(out, trace.weights);
    REQUIRE(out);
  }
}

TEST_CASE(
    "2 ranks train the run of 1 rank: every step's loss and the final weights within the reordering "
    "tolerance",
    "[distributed][mpi]") {
  const Trace one = train_tiny(single_process_communicator());
  const std::string trace_file = fresh_dir("trace.bin");
  const CliResult two =
      run_command(mpirun(2) + "-x ORTHOCONV_MPI_TRACE=" + quoted(trace_file) + " " +
                  quoted(std::string(ORTHOCONV_TEST_BINARY_DIR) + "/orthoconv_tests") + " '[.mpi-worker]'");
  INFO("mpirun: " << two.out << two.err);
  REQUIRE(two.exit_code == 0);
  std::ifstream in(trace_file, std::ios::binary);
  const std::vector<double> losses = read_values<double>(in);
  const std::vector<float> weights = read_values<float>(in);
  REQUIRE(losses.size() == one.losses.size());
  REQUIRE(losses.size() == 8);
  double loss_change = 0.0;
  for (double l : one.losses) loss_change = std::max(loss_change, std::fabs(l - one.losses.front()));
  for (size_t s = 0; s < losses.size(); ++s) {
    INFO("step " << s + 1 << ": 1 rank " << one.losses[s] << ", 2 ranks " << losses[s]);
    CHECK(std::fabs(losses[s] - one.losses[s]) <= 1e-6 * one.losses[s] + kWeightTolerance * loss_change);
  }
  // The first step sees the same weights in both runs: only the order of the double sum of its losses differs.
  CHECK(std::fabs(losses[0] - one.losses[0]) <= 1e-6 * one.losses[0]);
  check_within_displacement(weights, one.weights, one.initial, kWeightTolerance);
}

TEST_CASE(
    "a 2-rank run stopped after epoch 1 and resumed on 1 rank is the 1-rank run, and rank 0 alone logs and "
    "writes",
    "[distributed][mpi][resume]") {
  const std::string straight = fresh_dir("straight"), split = fresh_dir("split");
  const CliResult one = run_cli(joined(tiny_train_args(straight)));
  INFO("1 rank: " << one.err);
  REQUIRE(one.exit_code == 0);

  std::vector<std::string> first = tiny_train_args(split);
  first.insert(first.end(), {"--stop-after", "1"});
  const CliResult two = run_command(mpirun(2) + quoted(ORTHOCONV_CLI_PATH) + " " + joined(first));
  INFO("2 ranks: " << two.out << two.err);
  REQUIRE(two.exit_code == 0);
  // One configuration table (rank 0's), which names the job.
  size_t tables = 0;
  for (size_t at = two.out.find("| model "); at != std::string::npos; at = two.out.find("| model ", at + 1)) ++tables;
  CHECK(tables == 1);
  CHECK(two.out.find("2 ranks, 32 images each per batch") != std::string::npos);
  const std::vector<nlohmann::json> after_one = metrics_of(split);
  REQUIRE(after_one.size() == 1);
  CHECK(after_one[0].at("ranks") == 2);
  CHECK(after_one[0].at("allreduce_seconds").get<double>() > 0.0);

  const CliResult resumed = run_cli("train --resume " + quoted(split));
  INFO("resumed on 1 rank: " << resumed.err);
  REQUIRE(resumed.exit_code == 0);
  const Checkpoint k = load_checkpoint((fs::path(split) / "last.safetensors").string());
  CHECK(k.metadata.at("train.epoch") == "2");
  CHECK(k.metadata.at("train.step") == "8");
  const std::vector<nlohmann::json> a = metrics_of(straight), b = metrics_of(split);
  REQUIRE(a.size() == 2);
  REQUIRE(b.size() == 2);
  CHECK(b[1].count("ranks") == 0);  // the second epoch ran in one process
  for (size_t e = 0; e < 2; ++e) {
    INFO("epoch " << e + 1);
    CHECK(a[e].at("step") == b[e].at("step"));
    CHECK(a[e].at("lr") == b[e].at("lr"));
    // The mean of the epoch's step losses: the per-step tolerance of the previous test, with the loss's change over
    // the run bounded by the loss itself (it stays positive).
    const double loss = a[e].at("train_loss").get<double>();
    CHECK(std::fabs(loss - b[e].at("train_loss").get<double>()) <= (1e-6 + kWeightTolerance) * loss);
    CHECK(a[e].at("test_images") == b[e].at("test_images"));
  }
  // The initial weights: a fresh model of the run's architecture and seed.
  const std::string last = (fs::path(straight) / "last.safetensors").string();
  ModelConfig config = model_config_from_checkpoint(load_checkpoint(last), last);
  config.seed = 42;
  LipConvnet fresh(config, backend_for(Device::cpu));
  Checkpoint initial;
  write_model_state(fresh, Normalization{}, initial);
  std::vector<float> initial_weights;
  for (const auto& [name, t] : initial.tensors)
    initial_weights.insert(initial_weights.end(), t.values.begin(), t.values.end());
  const std::vector<float> wa = checkpoint_weights(straight), wb = checkpoint_weights(split);
  check_within_displacement(wb, wa, initial_weights, kWeightTolerance);
}

TEST_CASE("mpirun -np 2 orthoconv certify --json prints the report of one process", "[distributed][mpi][certify]") {
  const std::string dir = fresh_dir("certify-model");
  std::vector<std::string> args = tiny_train_args(dir);
  args[12] = "1";  // --epochs 1
  REQUIRE(args[11] == "--epochs");
  args[18] = "32";  // --test-subset 32: the model only needs to exist
  REQUIRE(args[17] == "--test-subset");
  const CliResult trained = run_cli(joined(args));
  INFO("train: " << trained.err);
  REQUIRE(trained.exit_code == 0);
  // 40 images in batches of 16: 3 batches, 2 on rank 0 and the last one, of 8 images, on rank 1.
  const std::string certify = "certify --checkpoint " + quoted((fs::path(dir) / "last.safetensors").string()) +
                              " --data " + quoted(orthoconv::testing::synthetic_cifar100_dir()) +
                              " --images 40 --batch 16 --threads 1 --eps 1,36 --json";
  const CliResult one = run_cli(certify);
  INFO("1 process: " << one.err);
  REQUIRE(one.exit_code == 0);
  const CliResult two = run_command(mpirun(2) + quoted(ORTHOCONV_CLI_PATH) + " " + certify);
  INFO("2 ranks: " << two.err);
  REQUIRE(two.exit_code == 0);
  REQUIRE(orthoconv::testing::line_count(two.out) == 1);  // rank 0's report alone
  nlohmann::json a = nlohmann::json::parse(one.out), b = nlohmann::json::parse(two.out);
  for (nlohmann::json* j : {&a, &b}) {
    j->at("verified").erase("seconds_float32_pass");
    j->at("verified").erase("seconds_float64_pass");
  }
  CHECK(a.at("images") == 40);
  CHECK(a.dump() == b.dump());
}

TEST_CASE("a rank that fails ends the job with its message and a non-zero exit within seconds",
          "[distributed][mpi][errors]") {
  using Clock = std::chrono::steady_clock;
  SECTION("bad input on one rank: rank 1 has no dataset while rank 0 waits for it in a collective") {
    std::vector<std::string> args = tiny_train_args(fresh_dir("one-bad-rank"));
    args.erase(args.end() - 4, args.end() - 2);  // no --data: each rank looks at its own $ORTHOCONV_DATA
    const std::string command = mpirun(1, 60) +
                                "-x ORTHOCONV_DATA=" + quoted(orthoconv::testing::synthetic_cifar100_dir()) + " " +
                                quoted(ORTHOCONV_CLI_PATH) + " " + joined(args) + " : -np 1 -x " +
                                "ORTHOCONV_DATA=/nonexistent/cifar " + quoted(ORTHOCONV_CLI_PATH) + " " + joined(args);
    const auto start = Clock::now();
    const CliResult r = run_command(command);
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    INFO(r.out << r.err);
    CHECK(r.exit_code != 0);
    CHECK(r.exit_code != 124);  // not the timeout
    CHECK(seconds < 30.0);
    CHECK(r.err.find("orthoconv: rank 1 of 2: error: ") != std::string::npos);
    CHECK(r.err.find("/nonexistent/cifar") != std::string::npos);
  }
  SECTION("weights that differ between the ranks (another --lr on rank 1) are named after the epoch") {
    const std::string dir = fresh_dir("differing-ranks");
    std::vector<std::string> a = tiny_train_args(dir), b = tiny_train_args(dir);
    b[b.size() - 7] = "0.06";  // --lr
    REQUIRE(b[b.size() - 8] == "--lr");
    const auto start = Clock::now();
    const CliResult r = run_command(mpirun(1, 60) + quoted(ORTHOCONV_CLI_PATH) + " " + joined(a) + " : -np 1 " +
                                    quoted(ORTHOCONV_CLI_PATH) + " " + joined(b));
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    INFO(r.out << r.err);
    CHECK(r.exit_code != 0);
    CHECK(r.exit_code != 124);
    CHECK(seconds < 60.0);
    CHECK(r.err.find("the weights of rank 0 and rank 1 differ after epoch 1") != std::string::npos);
    CHECK_FALSE(fs::exists(fs::path(dir) / "last.safetensors"));  // checked before anything is written
  }
}

#ifdef ORTHOCONV_WITH_NCCL
// One rank per GPU of this machine (NCCL's all-reduce of device memory); with a single GPU, a job of one rank (the
// MPI + CUDA start-up without NCCL). cuDNN may choose other algorithms for the parts' smaller batches, which moves
// each float32 logit by a few units of the last place: far below eps_g above, so the same tolerance holds.
TEST_CASE("one rank per GPU trains the run of one GPU process within the reordering tolerance",
          "[.gpu][distributed][mpi]") {
  if (!cuda_available()) {
    WARN("ORTHOCONV_GPU_SKIPPED: no usable CUDA device, GPU test not run");
    return;
  }
  const CliResult listed = run_command("nvidia-smi -L");
  const int gpus = std::max<int>(1, static_cast<int>(orthoconv::testing::line_count(listed.out)));
  const int ranks = std::min(gpus, 8);
  const std::string one_dir = fresh_dir("gpu-one"), job_dir = fresh_dir("gpu-job");
  std::vector<std::string> one = tiny_train_args(one_dir), job = tiny_train_args(job_dir);
  one.insert(one.end(), {"--device", "cuda"});
  job.insert(job.end(), {"--device", "cuda"});
  const CliResult a = run_cli(joined(one));
  INFO("1 process: " << a.err);
  REQUIRE(a.exit_code == 0);
  const CliResult b = run_command(mpirun(ranks, 300) + quoted(ORTHOCONV_CLI_PATH) + " " + joined(job));
  INFO(ranks << " ranks: " << b.out << b.err);
  REQUIRE(b.exit_code == 0);
  if (ranks > 1) CHECK(b.out.find("NCCL") != std::string::npos);  // the configuration table names it
  const std::string last = (fs::path(one_dir) / "last.safetensors").string();
  ModelConfig config = model_config_from_checkpoint(load_checkpoint(last), last);
  config.seed = 42;
  LipConvnet fresh(config, backend_for(Device::cpu));
  Checkpoint initial;
  write_model_state(fresh, Normalization{}, initial);
  std::vector<float> initial_weights;
  for (const auto& [name, t] : initial.tensors)
    initial_weights.insert(initial_weights.end(), t.values.begin(), t.values.end());
  check_within_displacement(checkpoint_weights(job_dir), checkpoint_weights(one_dir), initial_weights,
                            kWeightTolerance);
}
#endif  // ORTHOCONV_WITH_NCCL

#endif  // ORTHOCONV_WITH_MPI && ORTHOCONV_CLI_PATH
