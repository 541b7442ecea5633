#!/usr/bin/env bash
# Sourced by bootstrap.sh and test.sh: makes sure the native build prerequisites
# (clang and libclang-dev for RocksDB, make for jemalloc) are installed,
# installing them as root on Debian.
# bindgen loads libclang.so / libclang-<version>.so; libclang-cpp (which other
# LLVM packages bring) is not it.
have_libclang() {
  ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 ||
    ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9][0-9.]*)?\.so'
}
if ! command -v clang >/dev/null 2>&1 || ! have_libclang || ! command -v make >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing clang, libclang-dev and make (the RocksDB and jemalloc builds need them)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-dev make >/dev/null
  else
    echo "clang, libclang-dev or make is missing: sudo apt-get install -y clang libclang-dev make" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo is missing: install Rust (https://rustup.rs)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/shopkv/target}
