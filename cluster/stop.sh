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
for pidfile in "$DATA_DIR"/n*/shopkv.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    echo "stop: stopped pid $pid ($(dirname "$pidfile"))"
  fi
  rm -f "$pidfile"
done
