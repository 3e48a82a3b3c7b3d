#!/usr/bin/env bash
# scripts/lint.sh BUILD_DIR: the habits the tools enforce (issue 14), run by .ci/run.
#   1. clang-format (the repository's .clang-format): every C++ and CUDA file is formatted; prints the files that
#      are not. Fix with: git ls-files '*.cpp' '*.hpp' '*.cu' '*.cuh' | xargs clang-format -i
#   2. clang-tidy (.clang-tidy: bugprone, performance, function size) on the library's and the command line's
#      sources, with BUILD_DIR's compile_commands.json (configure it with -DCMAKE_EXPORT_COMPILE_COMMANDS=ON).
#      CUDA-backend .cpp files are checked when BUILD_DIR built the CUDA backend; .cu files are not (clang-tidy
#      would need the CUDA toolkit as clang sees it). Tests are not checked: a Catch2 TEST_CASE is long by design.
# Environment: JOBS (parallel clang-tidy processes, default: all cores).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:?usage: scripts/lint.sh BUILD_DIR (with compile_commands.json)}
JOBS=${JOBS:-$(nproc)}
cd "$ROOT"
[ -f "$BUILD/compile_commands.json" ] || { echo "lint: $BUILD/compile_commands.json is missing (configure with -DCMAKE_EXPORT_COMPILE_COMMANDS=ON)" >&2; exit 2; }

echo "lint: clang-format ($(clang-format --version))"
unformatted=$(git ls-files '*.cpp' '*.hpp' '*.cu' '*.cuh' | while read -r f; do
  clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || echo "$f"; done)
if [ -n "$unformatted" ]; then
  echo "lint: not formatted as .clang-format says (run clang-format -i on them):" >&2
  echo "$unformatted" >&2
  exit 1
fi

# The sources the build compiled, from lib/ and apps/ only.
mapfile -t sources < <(python3 - "$BUILD/compile_commands.json" "$ROOT" <<'PY'
import json, os, sys
root = os.path.realpath(sys.argv[2])
for entry in json.load(open(sys.argv[1])):
    f = os.path.realpath(os.path.join(entry["directory"], entry["file"]))
    rel = os.path.relpath(f, root)
    if rel.startswith(("lib/", "apps/")) and rel.endswith(".cpp"):
        print(rel)
PY
)
echo "lint: clang-tidy on ${#sources[@]} files, $JOBS at a time ($(clang-tidy --version | grep -o 'version [0-9.]*'))"
printf '%s\n' "${sources[@]}" | sort -u | xargs -P "$JOBS" -n 1 clang-tidy -p "$BUILD" --quiet --extra-arg=-Wno-unknown-warning-option --extra-arg=-Wno-unknown-attributes 2>/dev/null >"$BUILD/clang-tidy.log" || {
  grep -E "(error|warning):" "$BUILD/clang-tidy.log" >&2 || cat "$BUILD/clang-tidy.log" >&2
  echo "lint: clang-tidy found problems (above; whole output in $BUILD/clang-tidy.log)" >&2
  exit 1
}
echo "lint: clean"
