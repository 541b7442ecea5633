#!/usr/bin/env bash
# Starts a local shopkv cluster on loopback.
#
#   cluster/bootstrap.sh [--nodes 3|5] [--data-dir DIR] [--base-port P] [--shards S] [--demo]
#
# Installs clang/libclang-dev if missing (as root), builds the release binary if
# needed, starts the nodes in the background (DIR/n<id>/shopkv.pid, shopkv.log),
# runs `shopkv cluster init` once, waits until every group has a leader, writes
# the client endpoints to DIR/endpoints and prints them. Re-running it on
# existing data restarts stopped nodes without re-initialising.
# Node i listens on P+2i (peer) and P+2i+1 (client). SHOPKV_BIN overrides the binary.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODES=3
DATA_DIR="$ROOT/cluster/data"
BASE_PORT=7100
SHARDS=""   # default: one per node
DEMO=0

die() { echo "bootstrap: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:?}; shift 2 ;;
    --data-dir) DATA_DIR=${2:?}; shift 2 ;;
    --base-port) BASE_PORT=${2:?}; shift 2 ;;
    --shards) SHARDS=${2:?}; shift 2 ;;
    --demo) DEMO=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
case "$NODES" in 3|5) ;; *) die "--nodes must be 3 or 5" ;; esac
[ -n "$SHARDS" ] || SHARDS=$NODES
mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)

# A cluster keeps the layout it was created with.
if [ -f "$DATA_DIR/cluster.env" ]; then
  # shellcheck disable=SC1091
  . "$DATA_DIR/cluster.env"
else
  printf 'NODES=%s\nBASE_PORT=%s\nSHARDS=%s\n' "$NODES" "$BASE_PORT" "$SHARDS" > "$DATA_DIR/cluster.env"
fi

if [ -z "${SHOPKV_BIN:-}" ]; then
  # shellcheck source=cluster/ensure-deps.sh
  . "$ROOT/cluster/ensure-deps.sh"
  echo "bootstrap: building shopkv (release; the first build compiles RocksDB and takes a while)"
  (cd "$ROOT" && cargo build --release --quiet --bin shopkv)
  SHOPKV_BIN="$CARGO_TARGET_DIR/release/shopkv"
fi
[ -x "$SHOPKV_BIN" ] || die "no binary at $SHOPKV_BIN"

# shellcheck source=cluster/procs.sh
. "$ROOT/cluster/procs.sh"

endpoints=""
started=""   # "id:pid" of the nodes this run started
for i in $(seq 1 "$NODES"); do
  dir="$DATA_DIR/n$i"
  mkdir -p "$dir"
  peer="127.0.0.1:$((BASE_PORT + 2 * i))"
  client="127.0.0.1:$((BASE_PORT + 2 * i + 1))"
  endpoints="${endpoints:+$endpoints,}$client"
  if [ -f "$dir/shopkv.pid" ] && pid=$(cat "$dir/shopkv.pid") && serving "$pid" "$dir"; then
    echo "bootstrap: node $i already running (pid $(cat "$dir/shopkv.pid"))"
    continue
  fi
  nohup "$SHOPKV_BIN" serve --id "$i" --data-dir "$dir" --peer-addr "$peer" --client-addr "$client" \
    >> "$dir/shopkv.log" 2>&1 < /dev/null &
  echo $! > "$dir/shopkv.pid"
  started="$started $i:$!"
  echo "bootstrap: started node $i (pid $!, peer $peer, client $client)"
done

# Wait until every node answers. A node started here that exits meanwhile
# (its ports taken, a bad data dir) is reported at once with its log's last
# lines, not after the whole wait.
exited() {
  local n
  for n in $started; do
    [ "${n%%:*}" = "$1" ] || continue
    alive "${n#*:}" || return 0
  done
  return 1
}
log_tail() { tail -n 3 "$DATA_DIR/n$1/shopkv.log" 2>/dev/null; }
for i in $(seq 1 "$NODES"); do
  ep="127.0.0.1:$((BASE_PORT + 2 * i + 1))"
  up=0
  for _ in $(seq 1 150); do
    if "$SHOPKV_BIN" cluster status --endpoints "$ep" >/dev/null 2>&1; then up=1; break; fi
    exited "$i" && die "node $i exited at start-up: $(log_tail "$i")"
    sleep 0.2
  done
  [ "$up" = 1 ] || die "node $i at $ep did not come up within 30 s; the last lines of its log: $(log_tail "$i")"
done

# Whoever answered must be the nodes started here: a node that cannot bind its
# ports (another cluster holds them) exits at once, and that other cluster's
# answers must not be taken for ours (nor its "already initialised").
for _ in 1 2 3 4 5; do
  for n in $started; do
    alive "${n#*:}" || die "node ${n%%:*} exited at start-up: $(log_tail "${n%%:*}")"
  done
  sleep 0.1
done

if [ ! -f "$DATA_DIR/initialized" ]; then
  out=$("$SHOPKV_BIN" cluster init --shards "$SHARDS" --endpoints "$endpoints" 2>&1) || {
    case "$out" in
      *"already"*) echo "bootstrap: $out" ;;
      *) die "cluster init failed: $out" ;;
    esac
  }
  echo "bootstrap: $out"
  touch "$DATA_DIR/initialized"
fi

"$SHOPKV_BIN" cluster wait --timeout-secs 60 --endpoints "$endpoints" >/dev/null \
  || die "cluster not ready: $("$SHOPKV_BIN" cluster wait --timeout-secs 1 --endpoints "$endpoints" 2>&1)"
echo "$endpoints" > "$DATA_DIR/endpoints"

if [ "$DEMO" = 1 ]; then
  "$SHOPKV_BIN" kv put demo/greeting "hello from shopkv" --endpoints "$endpoints" >/dev/null
  # 1 000 products DEMO-00001.. with stock, spread over every shard by SKU.
  echo "bootstrap: $("$SHOPKV_BIN" demo seed --products 1000 --endpoints "$endpoints")"
  echo "bootstrap: demo data loaded. Try:"
  echo "  export SHOPKV_ENDPOINTS=$endpoints"
  echo "  $SHOPKV_BIN product list --limit 5"
  echo "  $SHOPKV_BIN stock get DEMO-00042 -w json"
  echo "  $SHOPKV_BIN cart add alice DEMO-00042 2"
  echo "  $SHOPKV_BIN order place alice --from-cart     # server picks an order id on the SKU's shard"
  echo "  $SHOPKV_BIN order pay ORDER_ID && $SHOPKV_BIN order ship ORDER_ID"
  echo "  $SHOPKV_BIN order list alice"
  echo "  $SHOPKV_BIN cluster status"
fi
echo "$endpoints"
