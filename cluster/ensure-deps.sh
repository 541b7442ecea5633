#!/usr/bin/env bash
# Sourced by bootstrap.sh and test.sh: makes sure RocksDB's build prerequisites
# (clang, libclang-dev) are installed, installing them as root on Debian.
have_libclang() { ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ldconfig -p 2>/dev/null | grep -q libclang; }
if ! command -v clang >/dev/null 2>&1 || ! have_libclang; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing clang and libclang-dev (RocksDB's build needs them)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-dev >/dev/null
  else
    echo "clang and libclang-dev are missing: sudo apt-get install -y clang libclang-dev" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo is missing: install Rust (https://rustup.rs)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/shopkv/target}
