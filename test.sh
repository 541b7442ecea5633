#!/usr/bin/env bash
# Runs the whole test suite: formatting, clippy, unit, integration and chaos
# tests (real `shopkv serve` processes on loopback), the crash tests (a
# build with the `failpoints` feature) and the bench harness (built
# without its etcd driver, which only `bench/run.sh` needs). Installs clang/libclang-dev
# if missing (as root). Builds go to $CARGO_TARGET_DIR (default
# ~/.cache/shopkv/target, shared with cluster/bootstrap.sh so RocksDB compiles once).
set -euo pipefail
cd "$(dirname "$0")"

# shellcheck source=cluster/ensure-deps.sh
. cluster/ensure-deps.sh

cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
# One test at a time: the cluster tests each run several node processes and
# their timing bounds (writes resume within 5 s) assume the 2 cores are theirs.
cargo test --release --workspace -- --test-threads=1
# The crash tests: failpoints are compiled in only with this feature (the
# node aborts itself at txn-after-begin/-prepare/-decide or pay-after-capture,
# or waits at a delay point); the lock tests again for their delay-point test.
cargo clippy --release --features failpoints --all-targets -- -D warnings
cargo test --release --features failpoints --test txn_crash --test lock --test forward -- --test-threads=1
