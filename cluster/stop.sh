#!/usr/bin/env bash
# Stops the nodes a cluster/bootstrap.sh started: cluster/stop.sh [--data-dir DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA_DIR="$ROOT/cluster/data"
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) DATA_DIR=${2:?}; shift 2 ;;
    *) echo "stop: unknown argument: $1" >&2; exit 1 ;;
  esac
done
# shellcheck source=cluster/procs.sh
. "$ROOT/cluster/procs.sh"
for pidfile in "$DATA_DIR"/n*/shopkv.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if serving "$pid" "$(dirname "$pidfile")"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    echo "stop: stopped pid $pid ($(dirname "$pidfile"))"
  fi
  rm -f "$pidfile"
done
