#!/usr/bin/env bash
# Runs the whole test suite: formatting, clippy, unit, integration and chaos
# tests (real `shopkv serve` processes on loopback). Installs clang/libclang-dev
# if missing (as root). Builds go to $CARGO_TARGET_DIR (default
# ~/.cache/shopkv/target, shared with cluster/bootstrap.sh so RocksDB compiles once).
set -euo pipefail
cd "$(dirname "$0")"

have_libclang() { ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ldconfig -p 2>/dev/null | grep -q libclang; }
if ! command -v clang >/dev/null 2>&1 || ! have_libclang; then
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing clang and libclang-dev (RocksDB's build needs them)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-dev >/dev/null
  else
    echo "test.sh: clang and libclang-dev are missing: sudo apt-get install -y clang libclang-dev" >&2
    exit 1
  fi
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/shopkv/target}

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
# One test at a time: the cluster tests each run several node processes and
# their timing bounds (writes resume within 5 s) assume the 2 cores are theirs.
cargo test --release -- --test-threads=1
