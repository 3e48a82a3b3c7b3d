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
    const Result r = run_cli("verify --layer " + layer + " --channels 8 --size 4 --kernel 3 --terms 12 --seed 3 --json");
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

#endif  // ORTHOCONV_CLI_PATH
