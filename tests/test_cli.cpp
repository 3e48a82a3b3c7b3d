// The `orthoconv` command line, run as a real process: `verify` exits 0 and prints one JSON object with the four
// documented keys (and values that say the layer is orthogonal); bad flags exit non-zero with exactly one line on
// stderr and nothing on stdout.
#include <catch2/catch.hpp>

#include "cli_helpers.hpp"

#ifdef ORTHOCONV_CLI_PATH

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace {

using orthoconv::testing::line_count;
using orthoconv::testing::run_cli;
using Result = orthoconv::testing::CliResult;

void check_bad_flag(const std::string& args, const std::string& mentioned) {
  const Result r = run_cli(args);
  INFO("orthoconv " << args << "\nexit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code < 128);  // an orderly exit, not a crash
  CHECK(r.out.empty());
  CHECK(line_count(r.err) == 1);
  CHECK(r.err.find(mentioned) != std::string::npos);
}

}  // namespace

TEST_CASE("orthoconv verify --json exits 0 and prints the four keys of an orthogonal layer", "[cli]") {
  for (const std::string layer : {"gs-soc --groups 4,1", "soc --groups 2", "gs-soc --groups 2,- --stride 2"}) {
    const Result r =
        run_cli("verify --layer " + layer + " --channels 8 --size 4 --kernel 3 --terms 12 --seed 3 --json");
    INFO("verify --layer " << layer << "\nexit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(r.err.empty());
    nlohmann::json j;
    REQUIRE_NOTHROW(j = nlohmann::json::parse(r.out));
    for (const char* key : {"max_singular_value", "min_singular_value", "skew_residual", "sigma"}) {
      INFO("key " << key);
      REQUIRE(j.contains(key));
      REQUIRE(j[key].is_number());
    }
    // Same bounds as the Jacobian tests (test_orthogonality.cpp); stride 2 with c_out = 2 c_in truncates, so only
    // the upper bound applies there.
    CHECK(j["max_singular_value"].get<double>() <= 1.0 + 1e-5);
    if (layer.find("--stride") == std::string::npos) CHECK(j["min_singular_value"].get<double>() >= 1.0 - 1e-5);
    CHECK(j["skew_residual"].get<double>() <= 1e-12);
    CHECK(j["sigma"].get<double>() > 0.0);
  }
}

TEST_CASE("orthoconv verify without --json prints a readable report", "[cli]") {
  const Result r = run_cli("verify --layer soc --groups 1 --channels 4 --size 4");
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("max singular value") != std::string::npos);
  CHECK(r.out.find("min singular value") != std::string::npos);
}

TEST_CASE("orthoconv verify with bad flags exits non-zero with one line on stderr", "[cli][errors]") {
  check_bad_flag("verify --stride 3 --channels 4 --size 4", "stride");
  check_bad_flag("verify --groups x --channels 4 --size 4", "--groups");
  check_bad_flag("verify --groups 4,0 --channels 4 --size 4", "--groups");
  check_bad_flag("verify --kernel 2 --channels 4 --size 4", "kernel");
  check_bad_flag("verify --layer dense --channels 4 --size 4", "--layer");
  check_bad_flag("verify --no-such-flag", "--no-such-flag");
  check_bad_flag("verify --channels x", "--channels");
  check_bad_flag("no-such-command", "subcommand");
}

TEST_CASE("orthoconv names what is wrong: unknown commands and options, empty or malformed numbers, bad ranges",
          "[cli][errors]") {
  check_bad_flag("no-such-command", "unknown subcommand 'no-such-command'");
  check_bad_flag("bench no-such-bench", "unknown subcommand 'no-such-bench' for 'orthoconv bench'");
  // A negative value for an option the command does not have: the option is named, not the value.
  check_bad_flag("certify --checkpoint x.safetensors --lr -1", "unknown option '--lr' for 'orthoconv certify'");
  // Empty or malformed numbers are refused, never read as 0, octal or a saturated value.
  check_bad_flag("certify --checkpoint x.safetensors --eps ''", "--eps: an empty value");
  check_bad_flag("verify --seed -1", "--seed: '-1' is negative");
  check_bad_flag("verify --seed ''", "--seed: an empty value");
  check_bad_flag("train --epochs 99999999999999999999", "--epochs: '99999999999999999999' is out of range");
  check_bad_flag("train --lr ''", "--lr: an empty value");
  check_bad_flag("model-info --depth 0x10", "--depth: '0x10' is not a decimal integer");
  // --terms 0 is an error, not the default.
  check_bad_flag("certify --checkpoint x.safetensors --terms 0", "--terms must be in 1..100, got 0");
  check_bad_flag("attack --checkpoint x.safetensors --terms 0", "--terms must be in 1..100, got 0");
  // A range in words, not a 309-digit number.
  const Result r = run_cli("verify --channels 0");
  CHECK(r.err.size() < 200);
  check_bad_flag("verify --channels 0", "--channels must be in 1..16384, got 0");
  check_bad_flag("verify --size 99999999999 --channels 1", "--size must be in 1..16384");
  check_bad_flag("verify --kernel 999999999 --channels 4 --size 4", "--kernel must be in 1..9");
  check_bad_flag("verify --terms 1000000000 --channels 4 --size 4", "--terms must be in 1..100");
  // Sizes the machine cannot hold.
  check_bad_flag("model-info --width 100000", "width 100000");
  check_bad_flag("model-info --classes 1000000", "1000000 classes");
  check_bad_flag("model-info --depth 999999999999999995", "depth must be at most 1000");
  check_bad_flag("train --threads 100000 --data /nonexistent", "--threads 100000 is more than");
  // The library names settings (epochs, weight_decay); the command line names its flags.
  check_bad_flag("train --epochs 0 --data /nonexistent", "--epochs must be positive, got 0");
  check_bad_flag("train --weight-decay -1 --data /nonexistent", "--weight-decay must be >= 0, got -1");
  check_bad_flag("train --gamma 1 --head lln --data /nonexistent",
                 "--gamma (certificate regularization) needs --head soc");
  check_bad_flag("certify --threads 1000 --checkpoint x.safetensors", "--threads 1000 is more than");
  // The plot path is checked before the checkpoint is even read (not after the whole certification).
  check_bad_flag("certify --checkpoint /nonexistent.safetensors --plot /nonexistent-dir/plot.png",
                 "cannot write plot /nonexistent-dir/plot.png");
}

TEST_CASE("numbers are decimal: a leading zero is not octal", "[cli]") {
  const Result r = run_cli("model-info --depth 010 --conv soc --groups 1 --width 4 --classes 10 --json");
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(nlohmann::json::parse(r.out).at("model") == "LipConvnet-10");
}

TEST_CASE("verify --layer soc without --groups uses the soc default (1), gs-soc its (4,1)", "[cli]") {
  for (const std::string layer : {"soc", "gs-soc"}) {
    const Result r = run_cli("verify --layer " + layer + " --channels 8 --size 4 --json");
    INFO(layer << "\nstderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    const std::string description = nlohmann::json::parse(r.out).at("description");
    CHECK(description.find(layer == "soc" ? "soc 8->8 k3 s1 g1" : "gs-soc (4,1)") != std::string::npos);
  }
}

#endif  // ORTHOCONV_CLI_PATH
