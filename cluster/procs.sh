# Shared by bootstrap.sh and stop.sh (sourced).

# Running = exists and is not a zombie (an orphan's zombie lingers where PID 1
# does not reap).
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
