#!/usr/bin/env bash
# Where a shopkv cluster's time goes under one workload: kernel events per
# operation (WAL syncs, socket writes and reads, futex calls, context switches)
# beside ops/s and CPU per operation, and optionally a stack profile.
#
#   bench/profile.sh [--bin SHOPKV] [--workload put|get-lin|order|...] [--clients N]
#                    [--shards S] [--kv-api unary|batch] [--secs S] [--record FILE]
#
# Starts a fresh 3-node cluster (cluster/bootstrap.sh, S shards, default 3) from
# SHOPKV (default: the release build), loads it with shopkv-bench (N clients,
# default 64) for S seconds (default 12, at least 8) and counts the nodes'
# events with `perf stat` for 5 s from the run's middle; the counts are divided
# by the operations of those 5 s at the run's mean rate. --record also samples the
# nodes' stacks for the same 5 s (`perf record --call-graph dwarf`) into FILE,
# for `perf report -i FILE`. One run says where costs sit (e.g. 1 vs 3 shards:
# bench/RESULTS.md 2026-11-27); compare builds with duel.sh, not with this.
# Needs perf (Debian: linux-perf) and the right to trace the nodes' syscalls (root).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,17p' "$0"; exit "${1:-0}"; }
TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/shopkv/target}/release"
BIN="$TARGET/shopkv"; WORKLOAD=put; CLIENTS=64; SHARDS=3; KV_API=batch; SECS=12; RECORD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=${2:?}; shift 2 ;;
    --workload) WORKLOAD=${2:?}; shift 2 ;;
    --clients) CLIENTS=${2:?}; shift 2 ;;
    --shards) SHARDS=${2:?}; shift 2 ;;
    --kv-api) KV_API=${2:?}; shift 2 ;;
    --secs) SECS=${2:?}; shift 2 ;;
    --record) RECORD=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "profile.sh: unknown argument: $1" >&2; usage 1 ;;
  esac
done
[ "$SECS" -ge 8 ] || { echo "profile.sh: --secs must be at least 8 (5 s are counted from the middle)" >&2; exit 1; }
command -v perf >/dev/null || { echo "profile.sh: perf is missing (Debian: apt-get install linux-perf)" >&2; exit 1; }
BENCH="$TARGET/shopkv-bench"
[ -x "$BENCH" ] || { echo "profile.sh: no $BENCH; build it with cargo build --release -p shopkv-bench" >&2; exit 1; }
[ -x "$BIN" ] || { echo "profile.sh: no shopkv binary at $BIN" >&2; exit 1; }
BIN=$(realpath "$BIN")
WORK=$(mktemp -d /tmp/shopkv-profile.XXXXXX)
cleanup() {
  "$ROOT/cluster/stop.sh" --data-dir "$WORK/c" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

SHOPKV_BIN=$BIN "$ROOT/cluster/bootstrap.sh" --data-dir "$WORK/c" --base-port 25700 --shards "$SHARDS" \
  >"$WORK/boot.log" 2>&1 || { cat "$WORK/boot.log" >&2; exit 1; }
PIDS=$(cat "$WORK/c"/n*/shopkv.pid | paste -sd , -)
WARMUP=2
"$BENCH" run --system shopkv --endpoints "$(cat "$WORK/c/endpoints")" --workload "$WORKLOAD" \
  --clients "$CLIENTS" --duration-secs "$SECS" --warmup-secs "$WARMUP" --kv-api "$KV_API" \
  --shards "$SHARDS" --out "$WORK/run.jsonl" --server-pids "$PIDS" >"$WORK/run.out" 2>&1 &
LOAD=$!
sleep $((WARMUP + (SECS - 5) / 2))
SYSCALLS="fdatasync write writev recvfrom futex epoll_wait"
EVENTS=$(printf 'syscalls:sys_enter_%s,' $SYSCALLS)context-switches
if [ -n "$RECORD" ]; then
  perf record -F 499 --call-graph dwarf,16384 -p "$PIDS" -o "$RECORD" -- sleep 5 >/dev/null 2>"$WORK/record.err" &
  REC=$!
fi
perf stat -x, -e "$EVENTS" -p "$PIDS" -o "$WORK/stat.csv" -- sleep 5 >/dev/null 2>"$WORK/stat.err" \
  || { cat "$WORK/stat.err" >&2; exit 1; }
if [ -n "$RECORD" ]; then wait "$REC" || { cat "$WORK/record.err" >&2; exit 1; }; fi
wait "$LOAD" || { tail -n 5 "$WORK/run.out" >&2; exit 1; }

# "  => N ops/s p50=... cpu_us/op: servers=S load_generator=L"
line=$(grep "=>" "$WORK/run.out" | tail -n 1 || true)
[ -n "$line" ] || { echo "profile.sh: the load generator reported no result:" >&2; tail -n 5 "$WORK/run.out" >&2; exit 1; }
ops=$(sed 's/.*=> \([0-9]*\) ops.*/\1/' <<<"$line")
echo "profile.sh: $WORKLOAD, $CLIENTS clients, 3 nodes, $SHARDS shards, kv-api $KV_API, ${SECS}s ($(basename "$BIN"))"
echo "  ops/s=$ops $(sed -n 's/.*\(cpu_us\/op:.*\)/\1/p' <<<"$line")"
[ "$ops" -gt 0 ] || { echo "profile.sh: no operations measured" >&2; exit 1; }
# perf stat -x, rows: value,unit,event,...; "<not counted>" rows are skipped.
per_op=$(awk -F, -v ops="$ops" '
  $1 ~ /^[0-9]+$/ { name = $3; sub(/^syscalls:sys_enter_/, "", name); gsub(/-/, "_", name)
                    printf " %s=%.3f", name, $1 / (ops * 5) }' "$WORK/stat.csv")
[ -n "$per_op" ] || { echo "profile.sh: perf counted nothing:" >&2; cat "$WORK/stat.csv" >&2; exit 1; }
echo "  per op (the 3 nodes, 5 s):$per_op"
if [ -n "$RECORD" ]; then echo "  stacks: perf report -i $RECORD"; fi
