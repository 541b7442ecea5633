#!/usr/bin/env bash
# Same-minute A/B of two shopkv builds ("duel"): both run at once, so both see
# the same VM speed.
#
#   bench/duel.sh BIN_A BIN_B [--workload put|order|...] [--clients N] [--secs S] [--rounds R]
#                 [--kv-api unary|batch]
#
# Starts two fresh 3-node clusters (cluster/bootstrap.sh, 3 shards each) from the
# two binaries, loads each with its own shopkv-bench (N clients, default 32; KV
# requests as unary calls unless --kv-api batch) for S seconds (default 10), and
# reports each cluster's ops/s and the CPU its nodes used per operation
# (shopkv-bench --server-pids). Every round runs twice with the builds in
# swapped positions (the A/A spread between positions is ~2 %). Alternated single
# runs on a shared 2-core VM move 15-25 % between minutes; a duel shows 5 %.
# Absolute numbers are not comparable to bench/run.sh rows (6 nodes and 2 load
# generators share the cores). Needs shopkv-bench built (cargo build --release -p shopkv-bench).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,16p' "$0"; exit "${1:-0}"; }
[ $# -ge 2 ] || usage 1
BIN_A=$(realpath "$1"); BIN_B=$(realpath "$2"); shift 2
WORKLOAD=put; CLIENTS=32; SECS=10; ROUNDS=1; KV_API=unary
while [ $# -gt 0 ]; do
  case "$1" in
    --workload) WORKLOAD=${2:?}; shift 2 ;;
    --clients) CLIENTS=${2:?}; shift 2 ;;
    --secs) SECS=${2:?}; shift 2 ;;
    --rounds) ROUNDS=${2:?}; shift 2 ;;
    --kv-api) KV_API=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "duel.sh: unknown argument: $1" >&2; usage 1 ;;
  esac
done
[ "$SECS" -ge 1 ] || { echo "duel.sh: --secs must be at least 1" >&2; exit 1; }
[ "$BIN_A" != "$BIN_B" ] || { echo "duel.sh: copy the binary to compare a build with itself" >&2; exit 1; }
# The same default build directory as cluster/ensure-deps.sh.
BENCH="${CARGO_TARGET_DIR:-$HOME/.cache/shopkv/target}/release/shopkv-bench"
[ -x "$BENCH" ] || { echo "duel.sh: no $BENCH; build it with cargo build --release -p shopkv-bench" >&2; exit 1; }
WORK=$(mktemp -d /tmp/shopkv-duel.XXXXXX)
cleanup() {
  for side in a b; do "$ROOT/cluster/stop.sh" --data-dir "$WORK/$side" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# One duel: $1 in the first position (ports 25500), $2 in the second (25600).
duel() {
  local first=$1 second=$2 side bin port line
  local -A pid
  for side in a b; do "$ROOT/cluster/stop.sh" --data-dir "$WORK/$side" >/dev/null 2>&1 || true; done
  rm -rf "$WORK/a" "$WORK/b"
  for side in a b; do
    if [ "$side" = a ]; then bin=$first; port=25500; else bin=$second; port=25600; fi
    SHOPKV_BIN=$bin "$ROOT/cluster/bootstrap.sh" --data-dir "$WORK/$side" --base-port "$port" \
      >"$WORK/$side-boot.log" 2>&1 || { cat "$WORK/$side-boot.log" >&2; exit 1; }
  done
  for side in a b; do
    "$BENCH" run --system shopkv --endpoints "$(cat "$WORK/$side/endpoints")" --workload "$WORKLOAD" \
      --clients "$CLIENTS" --duration-secs "$SECS" --warmup-secs 2 --kv-api "$KV_API" --out "$WORK/$side.jsonl" \
      --server-pids "$(cat "$WORK/$side"/n*/shopkv.pid | paste -sd , -)" >"$WORK/$side.out" 2>&1 &
    pid[$side]=$!
  done
  for side in a b; do wait "${pid[$side]}" || { tail -n 5 "$WORK/$side.out" >&2; exit 1; }; done
  for side in a b; do
    if [ "$side" = a ]; then bin=$first; else bin=$second; fi
    # "  => N ops/s ... cpu_us/op: servers=S load_generator=L"
    line=$(grep "=>" "$WORK/$side.out" | tail -n 1)
    echo "  $(basename "$bin") ops/s=$(sed 's/.*=> \([0-9]*\) ops.*/\1/' <<<"$line") cpu_us/op=$(sed -n 's/.*servers=\([0-9]*\).*/\1/p' <<<"$line")"
  done
}

for r in $(seq 1 "$ROUNDS"); do
  echo "duel.sh: round $r, $WORKLOAD, $CLIENTS clients each, ${SECS}s; $(basename "$BIN_A") first"
  duel "$BIN_A" "$BIN_B"
  echo "duel.sh: round $r, $(basename "$BIN_B") first"
  duel "$BIN_B" "$BIN_A"
done
