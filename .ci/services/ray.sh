#!/usr/bin/env bash
# A small two-node Ray cluster on this one machine for the Ray Serve tests (tests/ray, marker
# `ray`): a head node on 127.0.0.2 and a worker node on 127.0.0.3, so "two replicas on two
# nodes" is real Ray scheduling and real cross-node traffic, all on loopback.
#
#   .ci/services/ray.sh install     # pip install the `ray` extra (pin read from pyproject.toml)
#   .ci/services/ray.sh start       # start (or find running) cluster; prints `export` lines
#   .ci/services/ray.sh env         # print the `export` lines of the running cluster
#   .ci/services/ray.sh footprint   # resident memory of all the cluster's processes (KiB)
#   .ci/services/ray.sh stop        # stop every process of the cluster and delete its state
#
#   eval "$(.ci/services/ray.sh start)"
#     HEINFER_TEST_RAY_ADDRESS     127.0.0.2:GCS_PORT (ray.init / heinfer serve --ray)
#     HEINFER_TEST_RAY_HTTP        127.0.0.2:PORT, free for the Serve HTTP proxy (head only)
#     HEINFER_TEST_RAY_TOKEN_PATH  Ray token file: set RAY_AUTH_MODE=token and
#                                  RAY_AUTH_TOKEN_PATH=<it> in processes that connect
#     HEINFER_TEST_RAY_STATE_DIR   this state dir (RAY_STATE_DIR for `footprint`)
#
# Why these choices:
# * 127.0.0.2/.3, not 127.0.0.1: Ray replaces 127.0.0.1 by the host's interface address.
#   Ray's own sockets are pinned to the node addresses where Ray allows it (dashboard, client
#   server, agents); Ray 2.60's GCS, raylet and object manager still listen on the wildcard
#   address and have no option for it, which is why token authentication is on (a random
#   token in the state dir, mode 0600).
# * Every port is explicit and free-picked: two nodes on one machine would otherwise both take
#   Ray's fixed defaults (6379, 8265, 10001, 52365, ...), and so would a second cluster.
# * --num-cpus 1, --memory and --object-store-memory per node: by default each node claims
#   all cores and 30% of the machine's RAM for its object store.
# * Each node has its own --temp-dir (short, under /tmp: Ray's Unix socket paths must fit
#   in 107 bytes), and its own custom resource (node_a / node_b) for tests that pin work.
# * RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0: the HTTP proxy runs on the head only; Serve's
#   default would send every request to the head's replica until it is saturated.
# * Stop never uses `ray stop` (it kills every Ray process on the machine, by name): each node's
#   `ray start` runs in a new session (setsid), and stop signals the pids of those sessions.
#
# Knobs (environment): RAY_STATE_DIR (default .ci/state/ray), RAY_PYTHON (default
# .venv/bin/python, else python3), RAY_NODE_CPUS (1), RAY_NODE_MEMORY (bytes, 3 GiB),
# RAY_OBJECT_STORE_MEMORY (bytes, 128 MiB), RAY_START_TIMEOUT (seconds, 120).
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${RAY_STATE_DIR:-$REPO_ROOT/.ci/state/ray}"
TIMEOUT="${RAY_START_TIMEOUT:-120}"
NODE_CPUS="${RAY_NODE_CPUS:-1}"
NODE_MEMORY="${RAY_NODE_MEMORY:-$((3 << 30))}"
OBJECT_STORE_MEMORY="${RAY_OBJECT_STORE_MEMORY:-$((128 << 20))}"
HEAD_IP=127.0.0.2
WORKER_IP=127.0.0.3

if [[ -n "${RAY_PYTHON:-}" ]]; then
    PY="$RAY_PYTHON"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PY="$REPO_ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
RAY="$(dirname "$PY")/ray"

log() { echo "ray.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Live (not zombie) members of session $1, one pid a line. Sessions, not process groups:
# Ray puts each worker (Serve controller, proxy, replicas) in a process group of its own, but
# they all stay in the session of the `ray start` that started their raylet.
session_members() {
    ps -e -o pid=,sid=,stat= 2>/dev/null | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'
}

# A process is ours if it carries this cluster's token path in its environment (every process
# `ray start` runs inherits it) or our temp dir in its command line. Ray workers rename
# themselves (setproctitle overwrites /proc/PID/environ), so not every member shows either:
# a session is ours when one member does, and then all its members are. That is safe because
# Linux never hands out a pid that is still some live process's session id.
pid_ours() {
    local pid="$1" tmp
    tmp="$(cat "$STATE/tmpdir" 2>/dev/null)" || return 1
    [[ -n "$tmp" ]] || return 1
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF -- "RAY_AUTH_TOKEN_PATH=$STATE/auth_token" ||
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$tmp"
}

# Our live processes in session $1: all of its members, once one of them is proven ours.
session_ours_members() {
    local pid members
    members="$(session_members "$1")"
    for pid in $members; do
        if pid_ours "$pid"; then
            echo "$members"
            return 0
        fi
    done
}

session_ours() { [[ -n "$1" && -n "$(session_ours_members "$1")" ]]; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# free_ports IP N: N distinct free TCP ports on IP (all bound at once, so no duplicates).
free_ports() {
    "$PY" - "$1" "$2" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.bind((sys.argv[1], 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

node_env() {
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
    export RAY_USAGE_STATS_ENABLED=0 RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0
    unset RAY_ADDRESS RAY_AUTH_TOKEN
}

print_env() {
    [[ -f "$STATE/env" ]] || die "no running cluster under $STATE (run: $0 start)"
    cat "$STATE/env"
}

running() {
    [[ -f "$STATE/env" && -f "$STATE/sessions" ]] || return 1
    local sid sids
    read -r -a sids <"$STATE/sessions" || true
    ((${#sids[@]} == 2)) || return 1
    for sid in "${sids[@]}"; do
        session_ours "$sid" || return 1
    done
    port_open "$HEAD_IP" "$(cat "$STATE/gcs_port")"
}

cmd_install() {
    local spec
    read -r -a spec <<<"$(cd "$REPO_ROOT" && "$PY" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["ray"]))')"
    if "$PY" -c 'import ray.serve' 2>/dev/null; then
        log "ray already installed ($("$PY" -c 'import ray; print(ray.__version__)'))"
        return 0
    fi
    log "pip install ${spec[*]}"
    "$PY" -m pip install -q "${spec[@]}" >&2
}

cmd_footprint() {
    local total=0 sid sids=() pid rss
    read -r -a sids <"$STATE/sessions" 2>/dev/null || true
    for sid in "${sids[@]}"; do
        for pid in $(session_ours_members "$sid"); do
            rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
            total=$((total + ${rss:-0}))
        done
    done
    echo "$total"
}

cmd_stop() {
    local sids=() sid pids tmp
    read -r -a sids <"$STATE/sessions" 2>/dev/null || true
    # Worker node first, then the head (the order `ray stop` uses: raylets before the GCS).
    # SIGTERM, then SIGKILL after 5 s (the GCS may linger on SIGTERM; the cluster is thrown
    # away, nothing needs a graceful exit).
    for sid in $(printf '%s\n' "${sids[@]}" | tac); do
        pids="$(session_ours_members "$sid")"
        [[ -n "$pids" ]] || continue
        # From here on the session is known to be ours: wait for all of its members, also the
        # renamed ones that outlive the raylet for a moment.
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 1 50); do
            [[ -z "$(session_members "$sid")" ]] && break
            sleep 0.1
        done
        pids="$(session_members "$sid")"
        # shellcheck disable=SC2086
        [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
    done
    tmp="$(cat "$STATE/tmpdir" 2>/dev/null || true)"
    if [[ "$tmp" == /tmp/heinfer-ray.* ]]; then
        rm -rf "$tmp"
    fi
    if [[ -f "$STATE/env" || -f "$STATE/tmpdir" ]]; then
        rm -rf "$STATE"
    fi
}

# start_node NAME ARGS...: `ray start` in a new session; records the session id.
start_node() {
    local name="$1" pid
    shift
    (
        node_env
        exec setsid "$RAY" start "$@" --disable-usage-stats --log-style=record --log-color=false
    ) </dev/null >>"$STATE/$name.log" 2>&1 &
    pid=$!
    echo -n "$pid " >>"$STATE/sessions"
    if ! wait "$pid"; then
        tail -n 30 "$STATE/$name.log" >&2 || true
        cmd_stop
        die "ray start ($name) failed; see above"
    fi
    session_ours "$pid" || { cmd_stop; die "ray start ($name) left no session $pid"; }
}

nodes_alive() {
    (node_env; "$RAY" status --address "$HEAD_IP:$(cat "$STATE/gcs_port")" 2>/dev/null) |
        awk '/^Active:/ { on = 1; next } /^Pending:/ { on = 0 } on && /node_/ { n++ } END { exit !(n >= 2) }'
}

cmd_start() {
    if running; then
        print_env
        return 0
    fi
    [[ -x "$RAY" ]] || die "$RAY not found: install the ray extra first ($0 install)"
    cmd_stop
    mkdir -p "$STATE"
    local tmp head_ports worker_ports gcs client dash serve
    tmp="$(mktemp -d /tmp/heinfer-ray.XXXXXX)"
    echo "$tmp" >"$STATE/tmpdir"
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
    : >"$STATE/sessions"

    # head: gcs client dashboard serve-http node-manager object-manager agent agent-grpc
    #       runtime-env metrics
    read -r -a head_ports <<<"$(free_ports "$HEAD_IP" 10)"
    read -r -a worker_ports <<<"$(free_ports "$WORKER_IP" 6)"
    gcs="${head_ports[0]}" client="${head_ports[1]}" dash="${head_ports[2]}"
    serve="${head_ports[3]}"
    echo "$gcs" >"$STATE/gcs_port"

    local common=(--num-cpus="$NODE_CPUS" --memory="$NODE_MEMORY"
        --object-store-memory="$OBJECT_STORE_MEMORY")
    log "starting Ray head on $HEAD_IP:$gcs (temp dir $tmp/head)"
    start_node head --head --node-ip-address="$HEAD_IP" --port="$gcs" "${common[@]}" \
        --resources='{"node_a": 1}' --temp-dir="$tmp/head" \
        --include-dashboard=false --dashboard-host="$HEAD_IP" --dashboard-port="$dash" \
        --ray-client-server-port="$client" \
        --node-manager-port="${head_ports[4]}" --object-manager-port="${head_ports[5]}" \
        --dashboard-agent-listen-port="${head_ports[6]}" \
        --dashboard-agent-grpc-port="${head_ports[7]}" \
        --runtime-env-agent-port="${head_ports[8]}" --metrics-export-port="${head_ports[9]}"
    log "starting Ray worker node on $WORKER_IP (temp dir $tmp/worker)"
    start_node worker --address="$HEAD_IP:$gcs" --node-ip-address="$WORKER_IP" "${common[@]}" \
        --resources='{"node_b": 1}' --temp-dir="$tmp/worker" \
        --node-manager-port="${worker_ports[0]}" --object-manager-port="${worker_ports[1]}" \
        --dashboard-agent-listen-port="${worker_ports[2]}" \
        --dashboard-agent-grpc-port="${worker_ports[3]}" \
        --runtime-env-agent-port="${worker_ports[4]}" --metrics-export-port="${worker_ports[5]}"

    local deadline=$((SECONDS + TIMEOUT))
    until nodes_alive; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$STATE"/*.log >&2 || true
            cmd_stop
            die "the two Ray nodes did not both come up within ${TIMEOUT}s"
        fi
        sleep 0.5
    done
    {
        echo "export HEINFER_TEST_RAY_ADDRESS='$HEAD_IP:$gcs'"
        echo "export HEINFER_TEST_RAY_HTTP='$HEAD_IP:$serve'"
        echo "export HEINFER_TEST_RAY_TOKEN_PATH='$STATE/auth_token'"
        echo "export HEINFER_TEST_RAY_STATE_DIR='$STATE'"
    } >"$STATE/env"
    print_env
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    env) print_env ;;
    footprint) cmd_footprint ;;
    *)
        echo "usage: $0 install|start|stop|env|footprint" >&2
        exit 2
        ;;
esac
