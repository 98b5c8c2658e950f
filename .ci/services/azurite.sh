#!/usr/bin/env bash
# Azurite (Microsoft's Azure Blob Storage emulator) for the Azure key store integration tests.
# It speaks the real Blob REST API and enforces SharedKey signatures, so a wrong account key
# fails the way it does against Azure.
#
#   .ci/services/azurite.sh install   # npm ci (azurite pinned in package.json / package-lock.json)
#   .ci/services/azurite.sh start     # start (or find running) Azurite; prints an `export` line
#   .ci/services/azurite.sh env       # print the `export` line of the running instance
#   .ci/services/azurite.sh stop      # stop it (data under the state dir is kept)
#
#   eval "$(.ci/services/azurite.sh start)"   # sets HEINFER_TEST_AZURITE_CONN
#
# Blob data lives under $AZURITE_STATE_DIR/data (default .ci/state/azurite, gitignored), so a
# stop + start of the same state dir is a real server restart that keeps its data and port
# (the tests use that for the recovery check). `stop --wipe` also deletes the state dir.
#
# Knobs (environment): AZURITE_STATE_DIR, AZURITE_PORT (default: a free port, remembered in the
# state dir), AZURITE_START_TIMEOUT (seconds, default 30), AZURITE_CERT and AZURITE_KEY (PEM
# files: serve HTTPS with them, and accept OAuth bearer tokens — `--oauth basic`, which checks a
# token's issuer, audience and lifetime but not its signature — besides SharedKey; Azurite
# takes bearer tokens only over HTTPS). The export line's endpoint is https:// then.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${AZURITE_STATE_DIR:-$REPO_ROOT/.ci/state/azurite}"
TIMEOUT="${AZURITE_START_TIMEOUT:-30}"
BIN="$REPO_ROOT/node_modules/.bin/azurite-blob"
# The emulator's fixed, publicly documented development account (not a secret).
ACCOUNT=devstoreaccount1
ACCOUNT_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_ROOT/.ci/services/lib.sh"
ours() { ours_marked "$1" "$STATE/data"; }

scheme() { if [[ -n "${AZURITE_CERT:-}" ]]; then echo https; else echo http; fi; }

print_env() {
    local port proto
    port="$(cat "$STATE/port" 2>/dev/null)" || die "no Azurite state under $STATE (run: $0 start)"
    proto="$(scheme)"
    echo "export HEINFER_TEST_AZURITE_CONN='DefaultEndpointsProtocol=$proto;AccountName=$ACCOUNT;AccountKey=$ACCOUNT_KEY;BlobEndpoint=$proto://127.0.0.1:$port/$ACCOUNT;'"
}

cmd_install() {
    if [[ -x "$BIN" ]]; then
        return 0
    fi
    command -v npm >/dev/null || die "npm not found (apt-get install -y nodejs npm)"
    log "npm ci (azurite)"
    (cd "$REPO_ROOT" && npm ci --no-audit --no-fund --loglevel=error >&2)
}

cmd_stop() {
    local pid
    pid="$(cat "$STATE/pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && ours "$pid"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$STATE/pid"
    if [[ "${1:-}" == "--wipe" && -f "$STATE/port" ]]; then
        rm -rf "$STATE"
    fi
}

cmd_start() {
    local pid port
    pid="$(cat "$STATE/pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && ours "$pid" && port_open "$(cat "$STATE/port")"; then
        print_env
        return 0
    fi
    cmd_install
    command -v node >/dev/null || die "node not found (apt-get install -y nodejs)"
    cmd_stop

    mkdir -p "$STATE/data"
    if [[ -n "${AZURITE_PORT:-}" ]]; then
        port="$AZURITE_PORT"
    elif [[ -s "$STATE/port" ]]; then
        port="$(cat "$STATE/port")"  # a restart keeps the address clients were configured with
    else
        port="$(free_port)"
    fi
    port_open "$port" && die "port $port is already in use"
    echo "$port" >"$STATE/port"

    # --skipApiVersionCheck: the pinned Azurite (newest that runs on Debian's Node 20) predates
    # the REST API version that current azure-storage-blob releases send.
    local tls=()
    if [[ -n "${AZURITE_CERT:-}" ]]; then
        [[ -r "$AZURITE_CERT" && -r "${AZURITE_KEY:-}" ]] || die "AZURITE_CERT needs AZURITE_KEY"
        tls=(--cert "$AZURITE_CERT" --key "$AZURITE_KEY" --oauth basic)
    fi
    log "starting Azurite blob on $(scheme)://127.0.0.1:$port"
    setsid "$BIN" --blobHost 127.0.0.1 --blobPort "$port" --location "$STATE/data" \
        --silent --skipApiVersionCheck --disableTelemetry "${tls[@]}" \
        </dev/null >>"$STATE/azurite.log" 2>&1 &
    echo $! >"$STATE/pid"

    local deadline=$((SECONDS + TIMEOUT))
    until port_open "$port"; do
        if ! alive "$(cat "$STATE/pid")" || ((SECONDS >= deadline)); then
            tail -n 20 "$STATE/azurite.log" >&2 || true
            cmd_stop
            die "Azurite did not start listening on 127.0.0.1:$port"
        fi
        sleep 0.1
    done
    print_env
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop "${2:-}" ;;
    env) print_env ;;
    *)
        echo "usage: $0 install|start|stop [--wipe]|env" >&2
        exit 2
        ;;
esac
