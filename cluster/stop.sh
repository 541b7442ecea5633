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
# Running = exists and is not a zombie (an orphan's zombie lingers where PID 1 does not reap).
alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# PID is a live process serving data dir DIR (its --data-dir is DIR): a pid
# file outlives a reboot, and its number may since belong to another process.
serving() {
  alive "$1" || return 1
  local args i
  mapfile -d '' -t args < "/proc/$1/cmdline" 2>/dev/null || return 1
  for ((i = 0; i + 1 < ${#args[@]}; i++)); do
    [ "${args[i]}" = --data-dir ] && [ "${args[i + 1]}" -ef "$2" ] && return 0
  done
  return 1
}
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
