#!/usr/bin/env bash
# Throwaway single-node Ceph cluster + radosgw (real S3 API, real SigV4 checks) for the
# S3 key store integration tests. MinIO is not packaged for Debian and moto does not check
# signatures or speak HTTP like a real server, so we run the real thing from Debian's packages.
#
#   .ci/services/radosgw.sh install   # apt-get install the Ceph daemons (root, once per machine)
#   .ci/services/radosgw.sh start     # start (or find running) cluster; prints `export` lines
#   .ci/services/radosgw.sh env       # print the `export` lines of the running cluster
#   .ci/services/radosgw.sh stop      # kill the daemons and delete all cluster state
#
#   eval "$(.ci/services/radosgw.sh start)"   # sets HEINFER_TEST_S3_ENDPOINT/_ACCESS_KEY/_SECRET_KEY
#
# Everything (config, mon store, memstore OSD, sockets, logs) lives under $RADOSGW_STATE_DIR
# (default .ci/state/ceph, gitignored); nothing is written to /etc/ceph or /var/lib/ceph and
# every daemon binds to 127.0.0.1 only. The OSD uses memstore, so objects live in RAM and the
# cluster is disposable: `stop` wipes it and the next `start` builds a fresh one (~10-15 s).
#
# Knobs (environment): RADOSGW_STATE_DIR, RADOSGW_PORT (S3 port; default: a free port),
# CEPH_MON_PORT (default: a free port), RADOSGW_START_TIMEOUT (seconds, default 90).
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${RADOSGW_STATE_DIR:-$REPO_ROOT/.ci/state/ceph}"
TIMEOUT="${RADOSGW_START_TIMEOUT:-90}"
PACKAGES=(ceph-mon ceph-osd ceph-common radosgw)

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_ROOT/.ci/services/lib.sh"
ours() { ours_marked "$1" "$STATE/ceph.conf"; }

rand_token() {  # $1 characters from [A-Z0-9] or [a-zA-Z0-9]
    local n="$1" set="$2"
    LC_ALL=C tr -dc "$set" </dev/urandom | head -c "$n" || true
}

print_env() {
    [[ -f "$STATE/env" ]] || die "no running cluster under $STATE (run: $0 start)"
    cat "$STATE/env"
}

running() {
    [[ -f "$STATE/env" && -f "$STATE/run/client.rgw.heinfer.pid" ]] || return 1
    local name
    for name in mon.a osd.0 client.rgw.heinfer; do
        ours "$(cat "$STATE/run/$name.pid" 2>/dev/null)" || return 1
    done
    # shellcheck disable=SC1091
    port_open "$(. "$STATE/env"; echo "${HEINFER_TEST_S3_ENDPOINT##*:}")"
}

cmd_install() {
    if command -v radosgw >/dev/null && command -v ceph-mon >/dev/null \
        && command -v ceph-osd >/dev/null && command -v radosgw-admin >/dev/null; then
        log "ceph packages already installed"
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || die "install needs root (apt-get install ${PACKAGES[*]})"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2
    fi
}

kill_daemons() {
    local name pid
    for name in client.rgw.heinfer osd.0 mon.a; do
        pid="$(cat "$STATE/run/$name.pid" 2>/dev/null || true)"
        # SIGKILL: the cluster is thrown away anyway, and on SIGTERM memstore spends seconds
        # dumping its RAM contents to disk.
        if [[ -n "$pid" ]] && ours "$pid"; then
            kill -9 "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
        fi
    done
}

cmd_stop() {
    kill_daemons
    # The state dir holds nothing but this throwaway cluster; refuse anything that looks wrong.
    if [[ -f "$STATE/ceph.conf" ]]; then
        rm -rf "$STATE"
    elif [[ -d "$STATE" && -z "$(ls -A "$STATE")" ]]; then
        rmdir "$STATE"
    fi
}

dump_logs() {
    local f
    for f in "$STATE"/log/*.log "$STATE"/log/*.out; do
        [[ -s "$f" ]] || continue
        log "---- tail of $f"
        tail -n 15 "$f" >&2 || true
    done
}

wait_for() {  # wait_for <description> <command...>
    local what="$1" deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@"; do
        if ((SECONDS >= deadline)); then
            die "timed out after ${TIMEOUT}s waiting for $what"
        fi
        sleep 0.2
    done
}

osd_up() { ceph osd dump 2>/dev/null | grep -q '^osd\.0 up'; }

# Pacific's MonClient with cephx off sometimes sends a command before it has the monmap, and
# the mon refuses it ("wrong fsid", EPERM). Every command we send is idempotent: just retry.
ceph_retry() {
    local i out
    for i in 1 2 3 4 5 6 7 8 9 10; do
        if out="$(ceph --connect-timeout 5 "$@" 2>&1)"; then
            return 0
        fi
        sleep 0.2
    done
    log "ceph $* failed: $out"
    return 1
}

cmd_start() {
    if running; then
        print_env
        return 0
    fi
    local bin
    for bin in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool python3; do
        command -v "$bin" >/dev/null || die "$bin not found; run: $0 install"
    done
    cmd_stop  # leftovers of a crashed or half-started cluster

    local fsid osd_uuid mon_port rgw_port access secret
    STARTING=1  # from here on, a failure kills what was started (see on_exit)
    mkdir -p "$STATE"/{run,log,mon/a,osd/0,rgw}
    chmod 700 "$STATE"
    fsid="$(cat /proc/sys/kernel/random/uuid)"
    osd_uuid="$(cat /proc/sys/kernel/random/uuid)"
    mon_port="${CEPH_MON_PORT:-$(free_port)}"
    rgw_port="${RADOSGW_PORT:-$(free_port)}"
    port_open "$rgw_port" && die "port $rgw_port is already in use"
    port_open "$mon_port" && die "port $mon_port is already in use"

    # cephx is off inside the cluster (loopback only, throwaway); S3 requests are still
    # authenticated by radosgw with the user's SigV4 keys, which is what the tests exercise.
    cat >"$STATE/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
keyring = /dev/null
run dir = $STATE/run
admin socket = $STATE/run/\$name.asok
pid file = $STATE/run/\$name.pid
log file = $STATE/log/\$name.log
crash dir = $STATE/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
# Every pool create / osd boot is a paxos commit; the default 1 s batching window would make
# start-up take ~20 s instead of a few.
paxos propose interval = 0.01
paxos min wait = 0.01
[mon]
mon data = $STATE/mon/\$id
[osd]
osd data = $STATE/osd/\$id
osd objectstore = memstore
# On start an OSD files "set my device class / crush position" commands; in Pacific these race
# with the OSD learning the cluster fsid and are then refused ("wrong fsid"), leaving the OSD
# unable to boot. We place it in the crush map ourselves instead.
osd crush update on start = false
osd class update on start = false
memstore device bytes = 4294967296
[client.rgw.heinfer]
rgw data = $STATE/rgw
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw dns name = 127.0.0.1
EOF
    export CEPH_CONF="$STATE/ceph.conf"

    log "starting mon (127.0.0.1:$mon_port)"
    monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$mon_port]" "$STATE/monmap" >/dev/null
    ceph-mon -c "$CEPH_CONF" --mkfs -i a --monmap "$STATE/monmap" >>"$STATE/log/mon.out" 2>&1
    ceph-mon -c "$CEPH_CONF" -i a </dev/null >>"$STATE/log/mon.out" 2>&1
    wait_for "ceph-mon to listen on 127.0.0.1:$mon_port" port_open "$mon_port"

    log "starting osd (memstore)"
    ceph_retry osd new "$osd_uuid"
    ceph_retry osd crush add osd.0 1.0 root=default
    ceph-osd -c "$CEPH_CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$STATE/log/osd.out" 2>&1
    ceph-osd -c "$CEPH_CONF" -i 0 </dev/null >>"$STATE/log/osd.out" 2>&1
    wait_for "osd.0 to come up" osd_up

    # radosgw creates these itself, one at a time, on first start and first bucket; creating
    # them up front in one go saves several seconds of start-up and of the first test.
    local pool
    for pool in .rgw.root default.rgw.log default.rgw.control default.rgw.meta \
        default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
        ceph_retry osd pool create "$pool" 8 8
        ceph_retry osd pool application enable "$pool" rgw
    done

    log "starting radosgw (http://127.0.0.1:$rgw_port)"
    radosgw -c "$CEPH_CONF" -n client.rgw.heinfer </dev/null >>"$STATE/log/rgw.out" 2>&1
    wait_for "radosgw to listen on 127.0.0.1:$rgw_port" port_open "$rgw_port"

    access="$(rand_token 20 'A-Z0-9')"
    secret="$(rand_token 40 'a-zA-Z0-9')"
    local i
    for i in 1 2 3 4 5; do
        radosgw-admin user create --uid=heinfer-test --display-name="heinfer tests" \
            --access-key="$access" --secret-key="$secret" >/dev/null 2>>"$STATE/log/rgw-admin.out" \
            && break
        ((i < 5)) || die "radosgw-admin user create failed (see $STATE/log/rgw-admin.out)"
        sleep 0.5
    done

    umask 077
    cat >"$STATE/env" <<EOF
export HEINFER_TEST_S3_ENDPOINT=http://127.0.0.1:$rgw_port
export HEINFER_TEST_S3_ACCESS_KEY=$access
export HEINFER_TEST_S3_SECRET_KEY=$secret
EOF
    STARTING=0
    log "ready"
    print_env
}

STARTING=0
on_exit() {
    local status=$?
    if ((status != 0 && STARTING == 1)); then
        dump_logs
        kill_daemons
        log "start failed; logs kept under $STATE/log (\`$0 stop\` removes them)"
    fi
}
trap on_exit EXIT
trap 'log "command failed at line $LINENO (exit $?)"' ERR

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    env) print_env ;;
    *)
        echo "usage: $0 install|start|stop|env" >&2
        exit 2
        ;;
esac
