# shellcheck shell=bash
# Helpers shared by the service scripts (sourced by them).

log() { echo "${0##*/}: $*" >&2; }
die() { log "$*"; exit 1; }

# A zombie still answers `kill -0`, and daemons re-parented to a non-reaping PID 1 stay zombies,
# so "alive" means: exists and is not in state Z.
alive() {
    local pid="$1" stat
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != "Z" ]]
}

# Only signal a pid from our pid files if it really is ours (pids get reused): its command line
# holds the marker `$2` (our state directory or config file).
ours_marked() {
    local pid="$1" marker="$2"
    alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
