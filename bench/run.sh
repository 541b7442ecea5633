#!/usr/bin/env bash
# Side-by-side benchmark: shopkv vs etcd 3.4 on this machine, in one run.
#
#   bench/run.sh [--quick]
#
# Installs etcd-server (and protoc, which the etcd-client crate's build needs) from
# Debian if missing (as root), builds shopkv and shopkv-bench, then one system at a
# time on fresh data under bench/data/: a 3-member etcd on loopback (default flags,
# fsync on), a 3-node shopkv via cluster/bootstrap.sh (its default: 3 shards); runs every
# workload (W1 put, W2 get, W3 lock cycles, W4 orders, W5 flash sale) against both, then shopkv alone at 5 nodes and with 1 vs 8 shards. shopkv's driver sends
# KV requests on Kv.Batch streams; a put 64 row with one unary call per request is
# reported beside them ("unary-calls"). Prints the table and
# one RESULT line per compared row, and appends the tables with the date, machine
# and commit to bench/RESULTS.md. The compared rows run twice (each system on a fresh
# cluster each round; the report averages them and shows the spread): single runs on
# a shared 2-core machine move by 15-20 %. --quick: one round of short runs, < 3 min.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument: $arg" >&2; exit 1 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  DURATION=3; WARMUP=1; ROUNDS=1; MODE=quick; FLASH_STOCK=200
else
  DURATION=10; WARMUP=2; ROUNDS=2; MODE=full; FLASH_STOCK=500
fi
KEYS=10000
PUT_CLIENTS="1 16 64 256"
WORK="$ROOT/bench/data"
RESULTS="$WORK/results.jsonl"
ETCD_BASE=24000      # member i: client ETCD_BASE+10i, peer ETCD_BASE+10i+1
SHOPKV_BASE=24100    # cluster/bootstrap.sh --base-port

need_root() {
  [ "$(id -u)" = 0 ] || { echo "run.sh: $1 is missing; run as root once to install it" >&2; exit 1; }
}
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  need_root etcd-server
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
if ! command -v protoc >/dev/null; then
  need_root protoc
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
fi
# shellcheck source=cluster/ensure-deps.sh
. "$ROOT/cluster/ensure-deps.sh"

echo "run.sh: building shopkv and shopkv-bench (release)"
(cd "$ROOT" && cargo build --release --quiet --bin shopkv && cargo build --release --quiet -p shopkv-bench --features etcd)
export SHOPKV_BIN="$CARGO_TARGET_DIR/release/shopkv"
BENCH="$CARGO_TARGET_DIR/release/shopkv-bench"

ETCD_PIDS=()
stop_etcd() {
  for pid in "${ETCD_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${ETCD_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  ETCD_PIDS=()
}
SHOPKV_DIRS=()
cleanup() {
  stop_etcd
  for d in "${SHOPKV_DIRS[@]}"; do "$ROOT/cluster/stop.sh" --data-dir "$d" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

rm -rf "$WORK"
mkdir -p "$WORK"
FSYNC=$("$BENCH" fsync-probe "$WORK")
echo "run.sh: $FSYNC"

# SERVER_PIDS (comma separated) names the running cluster's processes: each row
# reports their CPU time per operation beside the load generator's.
# KV_API: how the shopkv driver sends KV requests (batch: on each connection's
# Kv.Batch stream, as a TiKV client does; unary: one call each). etcd ignores it.
KV_API=batch
bench() { # system endpoints workload clients nodes shards label
  "$BENCH" run --system "$1" --endpoints "$2" --workload "$3" --clients "$4" --nodes "$5" \
    --shards "$6" --label "$7" --keys "$KEYS" --duration-secs "$DURATION" --warmup-secs "$WARMUP" \
    --kv-api "$KV_API" --server-pids "$SERVER_PIDS" --out "$RESULTS"
  if [ "$1" = shopkv ]; then leaders_after "$2" "$7 $3 $4"; fi
}
# Each group's leader and term after a shopkv row, so that a slow row can be told
# from a leadership move: the load generator's CPU per op (in the table) rising with
# the servers' points at the VM instead (bench/RESULTS.md, 2026-11-27 23:27).
leaders_after() { # endpoints row
  local now
  now=$("$SHOPKV_BIN" cluster status --endpoints "$1" 2>/dev/null \
    | awk '/^[0-9]/{printf "%sg%s=n%s/t%s", sep, $1, $2, $3; sep=" "}')
  # Keyed by the cluster's processes: each round's cluster is a fresh one.
  echo "$SERVER_PIDS|$2|${now:-unknown}" >> "$WORK/leaders.log"
}
# One line per cluster: its leaders after its first row, and every later row after
# which they differed.
leaders_note() {
  awk -F'|' '
    !($1 in first) { first[$1] = $3; order[++n] = $1; moved[$1] = ""; next }
    $3 != first[$1] { moved[$1] = moved[$1] sprintf("; after %s: %s", $2, $3) }
    END { for (i = 1; i <= n; i++) { k = order[i]; printf "%s%s%s", (i > 1 ? " | " : ""), first[k], (moved[k] == "" ? " (unchanged)" : moved[k]) } }
  ' "$WORK/leaders.log"
}
compare_set() { # system endpoints nodes shards
  for c in $PUT_CLIENTS; do bench "$1" "$2" put "$c" "$3" "$4" compare; done
  # shopkv's puts with one unary call per request, beside the batched rows, on the
  # same cluster at the same point of its life.
  if [ "$1" = shopkv ]; then KV_API=unary bench "$1" "$2" put 64 "$3" "$4" unary-calls; fi
  bench "$1" "$2" get-lin 64 "$3" "$4" compare
  bench "$1" "$2" get-ser 64 "$3" "$4" compare
  # W3: lock cycles on 16 names; its HANDOFF line (stderr) goes to the notes.
  bench "$1" "$2" lock 64 "$3" "$4" compare 2> >(tee -a "$WORK/handoff.log" >&2)
  # W4: 5-line orders over $KEYS SKUs.
  bench "$1" "$2" order 64 "$3" "$4" compare
  # W5: flash sale of FLASH_STOCK units, 64 buyers, until sold out (<= 120 s).
  "$BENCH" run --system "$1" --endpoints "$2" --workload flash --clients 64 --nodes "$3" \
    --shards "$4" --label compare --keys "$FLASH_STOCK" --duration-secs 120 \
    --server-pids "$SERVER_PIDS" --out "$RESULTS"
}

# --- etcd: 3 members on loopback, default flags (fsync on) ---
start_etcd() { # data-dir -> sets etcd_endpoints
  local dir=$1 cluster="" i client peer
  etcd_endpoints=""
  for i in 1 2 3; do
    cluster="${cluster:+$cluster,}e$i=http://127.0.0.1:$((ETCD_BASE + 10 * i + 1))"
  done
  for i in 1 2 3; do
    client="127.0.0.1:$((ETCD_BASE + 10 * i))"
    peer="http://127.0.0.1:$((ETCD_BASE + 10 * i + 1))"
    etcd_endpoints="${etcd_endpoints:+$etcd_endpoints,}$client"
    etcd --name "e$i" --data-dir "$dir/e$i" \
      --listen-client-urls "http://$client" --advertise-client-urls "http://$client" \
      --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
      --initial-cluster "$cluster" --initial-cluster-token shopkv-bench --initial-cluster-state new \
      > "$dir-e$i.log" 2>&1 &
    ETCD_PIDS+=($!)
  done
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$etcd_endpoints" endpoint health >/dev/null 2>&1 && break
    sleep 0.3
  done
  ETCDCTL_API=3 etcdctl --endpoints "$etcd_endpoints" endpoint health >/dev/null \
    || { echo "run.sh: etcd did not become healthy (see $dir-e*.log)" >&2; exit 1; }
  echo "run.sh: etcd $(etcd --version | awk 'NR==1{print $3}') up at $etcd_endpoints"
}

# --- shopkv: bootstrap.sh on fresh data ---
shopkv_cluster() { # name nodes shards -> prints endpoints
  local dir="$WORK/$1"
  SHOPKV_DIRS+=("$dir")
  "$ROOT/cluster/bootstrap.sh" --nodes "$2" --shards "$3" --data-dir "$dir" --base-port "$SHOPKV_BASE" \
    >"$WORK/$1-bootstrap.log" 2>&1 || { cat "$WORK/$1-bootstrap.log" >&2; exit 1; }
  cat "$dir/endpoints"
}
stop_shopkv() { "$ROOT/cluster/stop.sh" --data-dir "$WORK/$1" >/dev/null; }
shopkv_pids() { cat "$WORK/$1"/n*/shopkv.pid | paste -sd , -; } # name -> pids, comma separated

# The compared rows, ROUNDS times, each system on a fresh cluster every round;
# the report averages the rounds and shows their spread.
for round in $(seq 1 "$ROUNDS"); do
  start_etcd "$WORK/etcd-r$round"
  SERVER_PIDS=$(IFS=,; echo "${ETCD_PIDS[*]}")
  compare_set etcd "$etcd_endpoints" 3 1
  stop_etcd
  # 3 nodes with bootstrap's default shards (one per node).
  ep=$(shopkv_cluster "shopkv-3n-r$round" 3 3)
  echo "run.sh: shopkv up at $ep (round $round of $ROUNDS)"
  SERVER_PIDS=$(shopkv_pids "shopkv-3n-r$round")
  compare_set shopkv "$ep" 3 3
  stop_shopkv "shopkv-3n-r$round"
done

# --- shopkv alone: 5 nodes; 1 vs 8 shards ---
EXTRA_CLIENTS="64 256"
[ "$QUICK" = 1 ] && EXTRA_CLIENTS=64
ep=$(shopkv_cluster shopkv-5n 5 5)
SERVER_PIDS=$(shopkv_pids shopkv-5n)
for c in $EXTRA_CLIENTS; do bench shopkv "$ep" put "$c" 5 5 5-nodes; done
stop_shopkv shopkv-5n
for shards in 1 8; do
  ep=$(shopkv_cluster "shopkv-3n-${shards}s" 3 "$shards")
  SERVER_PIDS=$(shopkv_pids "shopkv-3n-${shards}s")
  for c in $EXTRA_CLIENTS; do bench shopkv "$ep" put "$c" 3 "$shards" "3-nodes-${shards}-shards"; done
  stop_shopkv "shopkv-3n-${shards}s"
done

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit="$commit+dirty"
disk=$(df -T "$WORK" | awk 'NR==2{print $1" "$2}')
rota=$(lsblk -ndo ROTA "$(df "$WORK" | awk 'NR==2{print $1}')" 2>/dev/null | tr -d " " || echo "?")
echo
"$BENCH" report "$RESULTS" --markdown "$ROOT/bench/RESULTS.md" \
  --heading "$(date -u '+%Y-%m-%d %H:%M UTC') — $MODE run, commit $commit" \
  --note "command: \`bench/run.sh${1:+ $1}\` (${ROUNDS} round(s) of ${DURATION} s per row after ${WARMUP} s warm-up, ${KEYS} keys, 256 B values, closed loop, load generator on the same cores)" \
  --note "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), disk $disk (rotational=$rota), $FSYNC" \
  --note "W3 hand-off latency (release → next waiter holds), per round: $(grep -h '^HANDOFF' "$WORK/handoff.log" | sed 's/^HANDOFF workload=lock //' | paste -sd ';' -)" \
  --note "shopkv leaders/terms per cluster after its rows (g = group, n = node, t = term): $(leaders_note)" \
  --note "etcd $(etcd --version | awk 'NR==1{print $3}') (Debian etcd-server, 3 members, default flags); shopkv 3 nodes, 3 shards (bootstrap default), driver sends to shard leaders (--route leader), KV requests on Kv.Batch streams (--kv-api batch; unary-calls rows: one unary call each, as the etcd driver)"
echo "run.sh: appended to bench/RESULTS.md"
