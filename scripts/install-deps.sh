#!/usr/bin/env bash
# Installs orthoconv's build dependencies from Debian (bookworm) packages. Used by README.md and .ci/run.
#   build-essential cmake ninja-build   the toolchain (g++ 12, CMake >= 3.22, Ninja)
#   libdnnl-dev                         oneDNN 2.6: every CPU convolution
#   libeigen3-dev                       SVD of Jacobians (orthogonality checks)
#   catch2                              Catch2 v2 tests
#   libcli11-dev nlohmann-json3-dev     the command line and its JSON output
#   libstb-dev                          PNG plots
#   libopenmpi-dev openmpi-bin          data-parallel jobs over MPI ranks (ORTHOCONV_MPI; docs/distributed.md) and
#                                       their tests (mpirun)
#   libonnx-dev libprotobuf-dev         `orthoconv export --onnx` (ORTHOCONV_ONNX: the build leaves it out without them)
#   python3 python3-venv                the interop tests' virtual environment (.ci/run; scripts/requirements.txt)
# The CUDA backend needs the CUDA toolkit and cuDNN, which are not Debian packages: install them separately
# (the build detects them with -DORTHOCONV_CUDA=AUTO and builds the CPU-only library without them). Multi-GPU
# jobs use the toolkit's NCCL (nccl.h, libnccl), found with it.
# Extra package names given as arguments are installed too (.ci/run's fuzzing step: clang-14 libclang-rt-14-dev
# libomp-14-dev).
# Does nothing (and needs no root) when everything is already installed. Runs apt-get through sudo when not root.
set -euo pipefail

packages=(build-essential cmake ninja-build libdnnl-dev libeigen3-dev catch2 libcli11-dev nlohmann-json3-dev
          libstb-dev libopenmpi-dev openmpi-bin libonnx-dev libprotobuf-dev python3 python3-venv "$@")

missing=()
for package in "${packages[@]}"; do
  if ! dpkg -s "$package" >/dev/null 2>&1; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages are installed"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: missing packages (${missing[*]}) and not root, and sudo is not available" >&2
    exit 1
  fi
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
