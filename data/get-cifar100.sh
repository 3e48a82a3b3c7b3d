#!/usr/bin/env bash
# get-cifar100.sh: find or download CIFAR-100 (binary version) and verify train.bin and test.bin by sha256.
#
# Usage: data/get-cifar100.sh [--dir DIR] [--from DIR] [--download]
#   --dir DIR    where to download and unpack (default: the data/ folder holding this script);
#                the dataset ends up in DIR/cifar-100-binary
#   --from DIR   use an existing copy in DIR (holding train.bin and test.bin) in place: verify it, copy nothing
#   --download   skip the search for local copies and download
#
# Without --from, the first of these that exists is used:
#   1. DIR/cifar-100-binary (an earlier download)
#   2. ../shared/cifar100/cifar-100-binary next to the repository (a shared read-only copy), used in place
#   3. a download of the official archive into DIR
# Every copy is verified before use. The dataset directory is printed as the last line on stdout (messages go to
# stderr), so `ORTHOCONV_DATA=$(data/get-cifar100.sh)` works.
#
# Exit status: 0 ok; 1 usage error, missing files, or a failed download/unpack; 2 checksum mismatch.
set -euo pipefail

# $ORTHOCONV_CIFAR100_URL overrides the address (a mirror, or a file:// URL of a local archive).
readonly URL="${ORTHOCONV_CIFAR100_URL:-https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz}"
readonly TRAIN_SHA256="f31298fc616915fa142368359df1c4ca2ae984d6915ca468b998a5ec6aeebf29"
readonly TEST_SHA256="d8b1e6b7b3bee4020055f0699b111f60b1af1e262aeb93a0b659061746f8224a"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(dirname "$script_dir")"
target_dir="$script_dir"
from_dir=""
force_download=0

say() { echo "get-cifar100: $*" >&2; }
die() {
  local status="$1"
  shift
  say "error: $*"
  exit "$status"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir)
      [[ $# -ge 2 && -n "$2" ]] || die 1 "--dir needs a directory"
      target_dir="$2"
      shift 2
      ;;
    --from)
      [[ $# -ge 2 && -n "$2" ]] || die 1 "--from needs a directory"
      from_dir="$2"
      shift 2
      ;;
    --download)
      force_download=1
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
      exit 0
      ;;
    *) die 1 "unknown argument '$1' (see --help)" ;;
  esac
done

if command -v sha256sum > /dev/null 2>&1; then
  sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
elif command -v shasum > /dev/null 2>&1; then
  sha256_of() { shasum -a 256 "$1" | cut -d' ' -f1; }
else
  die 1 "neither sha256sum nor shasum is installed: cannot verify the dataset"
fi

# verify DIR: both files present and matching their checksums; exits 1 (missing) or 2 (mismatch) otherwise.
verify() {
  local dir="$1" name expected actual
  for name in train.bin test.bin; do
    [[ -f "$dir/$name" ]] || die 1 "$dir/$name: not found (expected the CIFAR-100 binary version: train.bin, test.bin)"
  done
  for name in train.bin test.bin; do
    if [[ "$name" == train.bin ]]; then expected="$TRAIN_SHA256"; else expected="$TEST_SHA256"; fi
    say "verifying $dir/$name"
    actual="$(sha256_of "$dir/$name")"
    if [[ "$actual" != "$expected" ]]; then
      die 2 "$dir/$name: sha256 mismatch (expected $expected, got $actual): corrupt or not the official file"
    fi
  done
}

absolute() { (cd "$1" && pwd); }

use_in_place() {
  local dir="$1"
  verify "$dir"
  say "using $(absolute "$dir") (verified, used in place)"
  absolute "$dir"
  exit 0
}

if [[ -n "$from_dir" ]]; then
  [[ -d "$from_dir" ]] || die 1 "--from $from_dir: not a directory"
  use_in_place "$from_dir"
fi

if [[ "$force_download" -eq 0 ]]; then
  if [[ -f "$target_dir/cifar-100-binary/train.bin" || -f "$target_dir/cifar-100-binary/test.bin" ]]; then
    use_in_place "$target_dir/cifar-100-binary"
  fi
  shared="$repo_root/../shared/cifar100/cifar-100-binary"
  if [[ -d "$shared" ]]; then
    use_in_place "$shared"
  fi
fi

# ---- Download. The project's own machines have no network access, so the real download from the official
# address has not been run there; what follows (unpack, verify, move into place) was exercised with a file://
# URL of a locally built archive. ----
mkdir -p "$target_dir" || die 1 "cannot create $target_dir"
[[ -w "$target_dir" ]] || die 1 "$target_dir is not writable (choose another with --dir)"
[[ ! -e "$target_dir/cifar-100-binary" ]] ||
  die 1 "$target_dir/cifar-100-binary exists but does not hold the dataset: remove it first"
archive="$target_dir/cifar-100-binary.tar.gz"
work="$(mktemp -d "$target_dir/.cifar-100-unpack.XXXXXX")"
# Whatever happens, no half-unpacked directory or unverified archive is left behind (a retry starts clean).
trap 'rm -rf "$work" "$archive.part" "$archive"' EXIT
say "downloading $URL (161 MB)"
if command -v curl > /dev/null 2>&1; then
  progress="--silent --show-error"
  [[ -t 2 ]] && progress="--progress-bar"
  # shellcheck disable=SC2086  # $progress is one or two flags
  curl --fail --location --retry 3 $progress --output "$archive.part" "$URL" || die 1 "download of $URL failed"
elif command -v wget > /dev/null 2>&1; then
  wget --tries=3 --no-verbose --output-document="$archive.part" "$URL" || die 1 "download of $URL failed"
else
  die 1 "neither curl nor wget is installed: download $URL yourself and run with --from"
fi
mv "$archive.part" "$archive"
say "unpacking $archive"
tar -xzf "$archive" -C "$work" || die 1 "cannot unpack $archive (incomplete download? delete it and retry)"
[[ -d "$work/cifar-100-binary" ]] || die 1 "$archive does not contain cifar-100-binary/"
verify "$work/cifar-100-binary"
mv "$work/cifar-100-binary" "$target_dir/cifar-100-binary"
say "CIFAR-100 ready in $(absolute "$target_dir/cifar-100-binary")"
absolute "$target_dir/cifar-100-binary"
