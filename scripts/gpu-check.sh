#!/usr/bin/env bash
# scripts/gpu-check.sh: the GPU check of the CUDA backend, in one go, on a bare GPU machine (about 8 minutes).
#
#   scripts/gpu-check.sh pack   on a development machine with the Debian packages (catch2, libdnnl-dev,
#                               libeigen3-dev, libcli11-dev, nlohmann-json3-dev, libstb-dev): copies them into .deps/
#                               (git-ignored), for GPU machines that have only nvcc, cuDNN, CMake and Python.
#   scripts/gpu-check.sh        on the GPU machine (with .deps/ carried along, if made):
#     1. configures and builds orthoconv for sm_90 (+ compute_90 PTX) with the CUDA backend ON; dependencies
#        from .deps/ first, then the system; cuDNN from the toolkit, the system, or PyTorch's nvidia-cudnn wheel;
#        without oneDNN the CUDA-only build (ORTHOCONV_DNNL=OFF) is made and the CPU comparisons are skipped;
#     2. checks that the library holds sm_90 machine code and compute_90 PTX (cuobjdump);
#     3. runs the GPU tests: orthoconv_tests "[gpu]" (hidden tag [.gpu]);
#     4. runs them again under compute-sanitizer memcheck (primitives and layers; the model step is left out
#        for time);
#     5. runs `orthoconv bench layers` and `orthoconv bench train` (SOC and GS-SOC (4,1)) on the GPU when the
#        command line has --device;
#     6. prints a short table last.
# Its logs (configure.log, build.log, gpu-tests.log, memcheck.log, bench.log) go to $OUT (the device tool's
# output folder) or, without it, to $BUILD/out.
# Exit status: 0 when the build, the GPU tests and memcheck passed; 1 otherwise.
#
# From a development session with the device tool:  run(command="bash scripts/gpu-check.sh",
#     carry=[".deps"], timeout_s=540)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPS="$ROOT/.deps"

# ---------------------------------------------------------------------------------------------------------------
if [[ "${1:-}" == "pack" ]]; then
  set -e
  rm -rf "$DEPS"
  P="$DEPS/prefix"
  mkdir -p "$P/include" "$P/lib" "$P/share/cmake" "$P/share/eigen3" "$DEPS/catch2-single/catch2"
  # Catch2 v2: the single header + ctest discovery scripts, used through CATCH2_SINGLE_HEADER_DIR (Debian's
  # CMake package names a libCatch2WithMain.a that is not worth carrying).
  cp /usr/include/catch2/catch.hpp "$DEPS/catch2-single/catch2/"
  cp /usr/lib/cmake/Catch2/Catch.cmake /usr/lib/cmake/Catch2/CatchAddTests.cmake "$DEPS/catch2-single/"
  # oneDNN 2.x (the CPU backend) and the OpenCL loader it links against.
  cp -r /usr/include/oneapi "$P/include/"
  cp /usr/include/dnnl*.h /usr/include/dnnl*.hpp "$P/include/"
  cp -a /usr/lib/x86_64-linux-gnu/libdnnl.so* "$P/lib/"
  cp -L /usr/lib/x86_64-linux-gnu/libOpenCL.so.1 "$P/lib/"
  # Eigen, CLI11, nlohmann-json: headers and relocatable CMake packages.
  cp -r /usr/include/eigen3 "$P/include/"
  cp -r /usr/share/eigen3/cmake "$P/share/eigen3/"
  cp -r /usr/include/CLI "$P/include/"
  cp -r /usr/share/cmake/CLI11 "$P/share/cmake/"
  cp -r /usr/include/nlohmann "$P/include/"
  cp -r /usr/share/cmake/nlohmann_json "$P/share/cmake/"
  # stb (libstb-dev): header-only image writing for the plots.
  cp -r /usr/include/stb "$P/include/"
  tar -C "$DEPS" -cJf "$DEPS/prefix.tar.xz" prefix
  rm -rf "$P"
  du -sh "$DEPS"/*
  echo "packed into $DEPS (git-ignored); carry it: run(command=\"bash scripts/gpu-check.sh\", carry=[\".deps\"])"
  exit 0
fi

# ---------------------------------------------------------------------------------------------------------------
START=$(date +%s)
export PATH="$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer"  # cuobjdump, compute-sanitizer
BUILD=${ORTHOCONV_GPU_BUILD:-/tmp/orthoconv-gpu-build}
RESULTS=${OUT:-$BUILD/out}
mkdir -p "$BUILD" "$RESULTS"
JOBS=$(nproc 2>/dev/null || echo 4)
declare -A ROW  # summary table
elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "== [$(elapsed)s] $*"; }
left() { echo $(( 470 - $(elapsed) )); }  # seconds left of the 8-minute budget (a little kept for the table)
# A time limit for the next step: what is left, at most $1 seconds, at least $2 (the step is worth overrunning).
limit() { local l; l=$(left); (( l > $1 )) && l=$1; (( l < $2 )) && l=$2; echo "$l"; }

note "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi: none')"
note "nvcc: $(nvcc --version 2>/dev/null | tail -1)  cmake: $(cmake --version | head -1)"

# ---- dependencies ----
PREFIXES=()
if [[ -f "$DEPS/prefix.tar.xz" ]]; then
  mkdir -p /tmp/orthoconv-deps && tar -C /tmp/orthoconv-deps -xJf "$DEPS/prefix.tar.xz"
  PREFIXES+=(/tmp/orthoconv-deps/prefix)
  export LD_LIBRARY_PATH="/tmp/orthoconv-deps/prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  note "dependencies from .deps (oneDNN, Eigen, CLI11, nlohmann-json, stb)"
fi
CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release -DORTHOCONV_CUDA=ON -DORTHOCONV_CUDA_ARCHITECTURES=90)
if ((${#PREFIXES[@]})); then CMAKE_ARGS+=("-DCMAKE_PREFIX_PATH=$(IFS=';'; echo "${PREFIXES[*]}")"); fi
if [[ ${#PREFIXES[@]} -eq 0 && ! -f /usr/include/oneapi/dnnl/dnnl.hpp ]]; then
  # No oneDNN: the CUDA-only build (ORTHOCONV_DNNL AUTO -> OFF); the command line still needs the CPU backend
  # (apps/bench.cpp), so it is left out, and with it the benchmarks.
  CMAKE_ARGS+=(-DORTHOCONV_BUILD_APPS=OFF)
  note "no oneDNN: CUDA-only build without the command line; comparisons with the CPU are skipped"
fi
if [[ -f "$DEPS/catch2-single/catch2/catch.hpp" ]]; then
  CMAKE_ARGS+=("-DCATCH2_SINGLE_HEADER_DIR=$DEPS/catch2-single")
fi
# cuDNN: the toolkit's or the system's, else the one PyTorch ships (nvidia-cudnn wheel: lib/libcudnn.so.9 only).
have_cudnn_header() {
  local dir
  for dir in /usr/local/cuda/include /usr/include /usr/local/include; do [[ -f "$dir/cudnn.h" ]] && return 0; done
  return 1
}
if ! have_cudnn_header; then
  CUDNN_ROOT=$(python3 -c 'import nvidia.cudnn, os; print(os.path.dirname(nvidia.cudnn.__file__) if nvidia.cudnn.__file__ else list(nvidia.cudnn.__path__)[0])' 2>/dev/null)
  if [[ -n "$CUDNN_ROOT" && -f "$CUDNN_ROOT/include/cudnn.h" ]]; then
    LIB=$(ls "$CUDNN_ROOT"/lib/libcudnn.so "$CUDNN_ROOT"/lib/libcudnn.so.9 2>/dev/null | head -1)
    CMAKE_ARGS+=("-DCUDNN_INCLUDE_DIR=$CUDNN_ROOT/include" "-DCUDNN_LIBRARY=$LIB")
    export LD_LIBRARY_PATH="$CUDNN_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    note "cuDNN from $CUDNN_ROOT ($LIB)"
  else
    note "cuDNN not found: the configure step will say so"
  fi
fi
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

# ---- 1. build ----
note "configure: ${CMAKE_ARGS[*]}"
if cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" "${CMAKE_ARGS[@]}" >"$RESULTS/configure.log" 2>&1; then
  BUILD_OK=1
else
  BUILD_OK=0
  tail -30 "$RESULTS/configure.log"
fi
grep -E "orthoconv (CUDA|CPU)|CUDA architectures" "$RESULTS/configure.log"
HAVE_CLI=0
if ((BUILD_OK)); then
  T0=$(date +%s)
  TARGETS=(--target orthoconv_tests)
  grep -q "orthoconv_cli" "$BUILD"/build.ninja "$BUILD"/Makefile 2>/dev/null && { TARGETS+=(--target orthoconv_cli); HAVE_CLI=1; }
  if cmake --build "$BUILD" -j "$JOBS" "${TARGETS[@]}" >"$RESULTS/build.log" 2>&1; then
    ROW[build]="ok ($(( $(date +%s) - T0 )) s, $JOBS jobs)"
  else
    BUILD_OK=0
    grep -E -B2 -A8 "error|FAILED" "$RESULTS/build.log" | head -60
    ROW[build]="FAILED (see build.log)"
  fi
else
  ROW[build]="configure FAILED (see configure.log)"
fi
ROW[backends]="$(grep -Eo 'CUDA backend: [A-Z]+|CPU backend \(oneDNN\): [A-Z]+' "$RESULTS/configure.log" | tr '\n' ' ')"
LIB=$(ls "$BUILD"/lib/liborthoconv.so.*.*.* 2>/dev/null | head -1)

# ---- 2. machine code ----
if [[ -n "$LIB" ]] && command -v cuobjdump >/dev/null; then
  SASS=$(cuobjdump --list-elf "$LIB" 2>/dev/null | grep -c sm_90)
  PTX=$(cuobjdump --list-ptx "$LIB" 2>/dev/null | grep -c compute_90)
  ROW[code]="sm_90 cubins: $SASS, compute_90 PTX: $PTX"
else
  ROW[code]="not checked (no library or no cuobjdump)"
fi

# ---- 3. GPU tests ----
TESTS="$BUILD/tests/orthoconv_tests"
TESTS_OK=0
if ((BUILD_OK)) && [[ -x "$TESTS" ]]; then
  note "GPU tests"
  ORTHOCONV_CUDA_CHECK_POINTERS=1 timeout "$(limit 240 90)" "$TESTS" "[gpu]" -d yes \
    >"$RESULTS/gpu-tests.log" 2>&1
  RC=$?
  grep -E "^(test cases|All tests passed)" "$RESULTS/gpu-tests.log" | tail -1
  grep -B3 -A12 -E "FAILED|failed with|due to unexpected exception" "$RESULTS/gpu-tests.log" | head -120
  SUMMARY=$(grep -E "^(test cases|All tests passed)" "$RESULTS/gpu-tests.log" | tail -1)
  if ((RC == 0)); then TESTS_OK=1; ROW[tests]="passed: $SUMMARY"; else ROW[tests]="FAILED (rc $RC): ${SUMMARY:-no summary, see gpu-tests.log}"; fi
  grep -q ORTHOCONV_GPU_SKIPPED "$RESULTS/gpu-tests.log" && { TESTS_OK=0; ROW[tests]="SKIPPED: no usable GPU (see gpu-tests.log)"; }
else
  ROW[tests]="not run (no build)"
fi

# ---- 4. compute-sanitizer memcheck ----
MEMCHECK_OK=0
if ((BUILD_OK)) && [[ -x "$TESTS" ]] && command -v compute-sanitizer >/dev/null && (( $(left) > 90 )); then
  note "compute-sanitizer memcheck"
  # cuDNN's heuristics instead of timing every algorithm (ORTHOCONV_CUDNN_FIND=0): same kernels, far fewer runs.
  ORTHOCONV_CUDA_CHECK_POINTERS=1 ORTHOCONV_CUDNN_FIND=0 \
  timeout "$(limit 150 60)" compute-sanitizer --tool memcheck --leak-check no \
    --report-api-errors no --error-exitcode 3 "$TESTS" "[gpu]~[model]~[orthogonality]" >"$RESULTS/memcheck.log" 2>&1
  RC=$?
  ERRORS=$(grep -Eo "ERROR SUMMARY: [0-9]+ error" "$RESULTS/memcheck.log" | tail -1)
  if (( $(stat -c %s "$RESULTS/memcheck.log") > 8000000 )); then  # the device tool returns files up to 16 MiB
    head -c 8000000 "$RESULTS/memcheck.log" >"$BUILD/memcheck.head" && mv "$BUILD/memcheck.head" "$RESULTS/memcheck.log"
  fi
  if ((RC == 0)); then MEMCHECK_OK=1; ROW[memcheck]="clean ($ERRORS)"; elif ((RC == 124)); then ROW[memcheck]="TIMEOUT (partial log in memcheck.log)"; else ROW[memcheck]="FAILED rc $RC: $ERRORS"; grep -m20 -A6 "=========" "$RESULTS/memcheck.log" | head -60; fi
else
  ROW[memcheck]="not run"
fi

# ---- 5. benchmarks ----
CLI="$BUILD/apps/orthoconv"
bench() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  (( $(left) < limit )) && { ROW[$name]="not run (time)"; return; }
  note "orthoconv $*"
  local json="$BUILD/$name.json" err="$BUILD/$name.err"
  timeout "$limit" "$CLI" "$@" >"$json" 2>"$err"
  local rc=$?
  { echo "### orthoconv $* (rc $rc)"; cat "$json" "$err"; } >>"$RESULTS/bench.log"
  if ((rc == 0)); then
    ROW[$name]=$(python3 - "$json" <<'PY' 2>/dev/null || tail -c 200 "$json"
import json, sys
d = json.load(open(sys.argv[1]))
if d.get("benchmark") == "train" or "images_per_second" in d:
    print(f'{d["images_per_second"]:.0f} images/s, peak RSS {d.get("peak_rss_mb", 0):.0f} MiB' +
          (f', peak GPU {d["peak_device_mb"]:.0f} MiB' if "peak_device_mb" in d else ""))
else:
    rows = []
    for rec in d.get("shapes", d if isinstance(d, list) else [d]):
        for layer in rec.get("layers", []):
            rows.append(f'{rec.get("channels")}ch {layer["layer"]} train {layer["train_ms"]:.2f} ms')
    print("; ".join(rows[:6]) or json.dumps(d)[:200])
PY
)
  else
    ROW[$name]="FAILED (rc $rc): $(tail -1 "$err")"
  fi
}
if ((BUILD_OK && HAVE_CLI)) && [[ -x "$CLI" ]]; then
  if "$CLI" bench layers --help 2>&1 | grep -q -- "--device"; then
    bench bench_layers 90 bench layers --device cuda --json
  else
    ROW[bench_layers]="not run: 'bench layers' has no --device yet"
  fi
  if "$CLI" bench train --help 2>&1 | grep -q -- "--device"; then
    bench bench_train_soc 100 bench train --device cuda --conv soc --batch 128 --steps 10 --warmup 2 --json
    bench bench_train_gs 100 bench train --device cuda --conv gs-soc --groups 4,1 --batch 128 --steps 10 --warmup 2 --json
  else
    ROW[bench_train_soc]="not run: 'bench train' has no --device yet"
  fi
else
  ROW[bench_layers]="not run (no command line built)"
fi

# ---- 6. the table ----
echo
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "orthoconv GPU check (${GPU_NAME:-no GPU found}, $(elapsed) s)"
printf '%-16s | %s\n' "check" "result"
printf '%-16s-+-%s\n' "----------------" "------------------------------------------------------------"
for key in build backends code tests memcheck bench_layers bench_train_soc bench_train_gs; do
  [[ -n "${ROW[$key]:-}" ]] && printf '%-16s | %s\n' "$key" "${ROW[$key]}"
done
((BUILD_OK && TESTS_OK && MEMCHECK_OK)) && exit 0 || exit 1
