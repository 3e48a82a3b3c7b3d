#!/usr/bin/env bash
# quickstart.sh: the README's main job, from a fresh Debian 12 machine.
#   1. installs the build dependencies (scripts/install-deps.sh),
#   2. configures and builds the Release command line (build/apps/orthoconv),
#   3. finds (or downloads) CIFAR-100 and verifies it (data/get-cifar100.sh),
#   4. measures one LipConvnet-15 GS-SOC (4,1) training step on this machine and sizes a short CPU schedule from
#      it: 3 epochs on a training subset, so that training plus evaluation take about QUICKSTART_MINUTES (10)
#      minutes (on 2 cores that is a few thousand images: a demonstration, not the paper's numbers),
#   5. trains it (`orthoconv train`), then certifies the last checkpoint (`orthoconv certify`) and prints the table.
#
# The full paper recipe (Table 3 of the GS-SOC paper: 200 epochs on all 50,000 images, batch 128, SGD lr 0.1,
# momentum 0.9, weight decay 5e-4, lr x0.1 at 50% and 75%) is the default of `orthoconv train`:
#   build/apps/orthoconv train --conv gs-soc --groups 4,1 --out runs/paper
#
# Environment: QUICKSTART_MINUTES (default 10), QUICKSTART_EPOCHS (3), QUICKSTART_THREADS (all cores),
# QUICKSTART_CERTIFY_IMAGES (1000; 0 = the whole test set), QUICKSTART_BUILD_DIR (build), ORTHOCONV_DATA (a
# CIFAR-100 binary directory).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

minutes="${QUICKSTART_MINUTES:-10}"
epochs="${QUICKSTART_EPOCHS:-3}"
threads="${QUICKSTART_THREADS:-$(nproc)}"
certify_images="${QUICKSTART_CERTIFY_IMAGES:-1000}"
eval_images=500
say() { echo "quickstart: $*" >&2; }

say "1/5 dependencies"
bash scripts/install-deps.sh

build_dir="${QUICKSTART_BUILD_DIR:-build}"
say "2/5 build (Release, $build_dir/)"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" --target orthoconv_cli
cli="$repo/$build_dir/apps/orthoconv"

say "3/5 dataset"
if [ -n "${ORTHOCONV_DATA:-}" ]; then
  data="$(bash data/get-cifar100.sh --from "$ORTHOCONV_DATA" | tail -n 1)"
else
  data="$(bash data/get-cifar100.sh | tail -n 1)"
fi
say "CIFAR-100 at $data"

say "4/5 measuring one training step of LipConvnet-15 GS-SOC (4,1), batch 128"
# Measured on one thread as CPU time (on a busy machine wall time measures the neighbours), then divided by the
# thread count with 10% for imperfect scaling: the step time on otherwise idle cores.
bench="$(OMP_NUM_THREADS=1 "$cli" bench train --conv gs-soc --groups 4,1 --paths auto --steps 1 --warmup 1 --json)"
cpu_seconds="$(printf '%s' "$bench" | sed -n 's/.*"cpu_seconds_per_step":\([0-9.eE+-]*\).*/\1/p')"
if [ -z "$cpu_seconds" ]; then
  say "error: could not read the step time from: $bench"
  exit 1
fi
step_seconds="$(awk -v c="$cpu_seconds" -v t="$threads" 'BEGIN { printf "%.3f", c / t * 1.1 }')"
# Training gets ~65% of the budget; the per-epoch evaluations (eval_images at 12 terms) and the final certify
# (certify_images: a float32 pass plus the float64 certifying pass, ~3x the float32 one) take the rest. At least 10 steps (1280 images) per epoch, at most the whole training set.
read -r subset steps_per_epoch < <(awk -v s="$step_seconds" -v m="$minutes" -v e="$epochs" -v ev="$eval_images" \
  -v ci="$certify_images" 'BEGIN {
    budget = m * 60 * 0.65;
    eval_steps = (e * ev + 4 * (ci > 0 ? ci : 10000)) / 128 * 0.8;  # a 12-term forward ~ 0.8 of a training step
    per_epoch = int((budget / s - eval_steps) / e);
    if (per_epoch < 10) per_epoch = 10;
    if (per_epoch > 390) per_epoch = 390;
    printf "%d %d\n", per_epoch * 128, per_epoch }')
say "~$step_seconds s per step on $threads threads ($cpu_seconds CPU s on one): $epochs epochs x $steps_per_epoch steps = $subset training images"

run_dir="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
say "5/5 training into $run_dir"
"$cli" train --conv gs-soc --groups 4,1 --depth 15 --epochs "$epochs" --train-subset "$subset" \
  --test-subset "$eval_images" --threads "$threads" --data "$data" --out "$run_dir"

"$cli" certify --checkpoint "$run_dir/last.safetensors" --data "$data" --eps 36,72,108 \
  --images "$certify_images" --threads "$threads"
say "done. Metrics: $run_dir/metrics.csv; checkpoint: $run_dir/last.safetensors"
say "the paper recipe (200 epochs, all 50,000 images): $cli train --conv gs-soc --groups 4,1 --out runs/paper"
