#!/usr/bin/env bash
# Start genpipe's server stack on 127.0.0.1 as background processes: an MLflow tracking server with
# basic auth (SQLite, proxied artifacts), a Prefect server, and a Ray cluster of a head and one worker.
# State, pid files and logs go to $GENPIPE_STACK_DIR (default .stack/); `infra/stack/down.sh` stops it.
set -euo pipefail
# shellcheck source=infra/stack/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

fail() {
    say "error: $*" >&2
    stop_all >&2
    exit 1
}

log_tail() { tail -n 25 "$LOGS/$1.log" 2>/dev/null | sed "s/^/    [$1] /" >&2 || true; }

port_free() {
    "$BIN/python" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no listener
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

# Run a service in a session of its own, so down.sh can find and stop all it spawns.
start_service() {
    local name=$1
    shift
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

# Poll `check` until it succeeds; fail early, with the log, if the service dies.
wait_until() {
    local name=$1 what=$2
    shift 2
    local deadline=$((SECONDS + STARTUP_TIMEOUT_S))
    until "$@" >/dev/null 2>&1; do
        if ! service_alive "$name"; then
            log_tail "$name"
            fail "$name exited before $what (log: $LOGS/$name.log)"
        fi
        if ((SECONDS > deadline)); then
            log_tail "$name"
            fail "$name: no $what after ${STARTUP_TIMEOUT_S} s (log: $LOGS/$name.log)"
        fi
        sleep 1
    done
    say "$name: $what"
}

http_ok() { curl -fsS --max-time 5 -o /dev/null "$1"; }

# Ray gives a new node's raylet a fixed 30 s to register with the GCS; on a machine busy with other
# work that can pass, and `ray start` then exits saying so. Such a start is tried again, a few times.
RAY_START_ATTEMPTS=3
start_ray_node() {
    local name=$1 what=$2 nodes=$3 attempt
    shift 3
    for ((attempt = 1; ; attempt++)); do
        start_service "$name" "$BIN/ray" start "$@" "${RAY_NODE_ARGS[@]}"
        local deadline=$((SECONDS + STARTUP_TIMEOUT_S))
        until ray_has_nodes "$nodes" || ! service_alive "$name"; do
            if ((SECONDS > deadline)); then
                log_tail "$name"
                fail "$name: no $what after ${STARTUP_TIMEOUT_S} s (log: $LOGS/$name.log)"
            fi
            sleep 1
        done
        if ray_has_nodes "$nodes"; then
            say "$name: $what"
            return
        fi
        if ((attempt == RAY_START_ATTEMPTS)) || ! grep -q "timed out during startup" "$LOGS/$name.log"; then
            log_tail "$name"
            fail "$name exited before $what (log: $LOGS/$name.log)"
        fi
        say "$name: Ray's node start timed out (a busy machine); trying again ($((attempt + 1))/$RAY_START_ATTEMPTS)"
        cp "$LOGS/$name.log" "$LOGS/$name.attempt-$attempt.log"
    done
}

# `ray status` lists one "1 node_<id>" line per node under "Active:".
ray_has_nodes() {
    local count
    count="$("$BIN/ray" status --address "$HOST:$RAY_PORT" 2>/dev/null |
        awk '/^Active:/{on=1; next} /^[A-Z][a-z]+:/{on=0} on && /node_/{n++} END{print n+0}')"
    ((count >= $1))
}

secret() { "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

# --- refuse to start twice, or on ports something else holds -------------------------------------
for name in "${SERVICES[@]}"; do
    if service_alive "$name"; then
        say "error: the stack in $STATE is already running ($name has pid $(pid_of "$name"));" \
            "run \`make stack-down\` (or infra/stack/down.sh) first" >&2
        exit 1
    fi
    rm -f "$PIDS/$name.pid" # a stale pid file from a crashed run
done
if ((RAY_PORT >= 10002 && RAY_PORT <= 19999)); then
    fail "GENPIPE_RAY_PORT=$RAY_PORT lies in 10002-19999, the range Ray keeps for its worker processes"
fi
for var in MLFLOW_PORT PREFECT_PORT RAY_PORT; do
    port_free "${!var}" ||
        fail "port ${!var} on $HOST is in use by another program; choose another with GENPIPE_$var=..."
done

# --- credentials: from the environment, else the ones generated on an earlier start -----------------
# MLflow only reads the admin password when it creates the admin user, so generated values are kept.
mkdir -p "$STATE/mlflow/artifacts" "$STATE/prefect"
chmod 700 "$STATE"
SECRETS="$STATE/mlflow/secrets"
if [[ -s "$SECRETS" ]]; then
    # shellcheck disable=SC1090
    source "$SECRETS"
fi
ADMIN_USER="${MLFLOW_AUTH_ADMIN_USERNAME:-${STORED_ADMIN_USER:-admin}}"
ADMIN_PASSWORD="${MLFLOW_AUTH_ADMIN_PASSWORD:-${STORED_ADMIN_PASSWORD:-$(secret)}}"
SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-${STORED_SECRET_KEY:-$(secret)}}"
# Ray cannot bind to loopback only (it resolves 127.0.0.1 to the node's address), so the cluster
# requires a token of its own; clients find it through the same two variables in the env file.
mkdir -p "$STATE/ray"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/ray/auth_token"
if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
    (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' >"$RAY_AUTH_TOKEN_PATH")
fi
sed "s|@AUTH_DB@|$STATE/mlflow/basic_auth.db|" "$STACK_ROOT/infra/stack/basic_auth.ini" \
    >"$STATE/mlflow/basic_auth.ini"

# --- start ----------------------------------------------------------------------------------------
trap 'fail "interrupted"' INT TERM
say "starting in $STATE (logs in $LOGS)"
echo "$RAY_TEMP_DIR" >"$STATE/ray-temp-dir"

# MLflow's server-side job runner serves GenAI features genpipe does not use; starting it costs about
# 40 s of CPU. GENPIPE_MLFLOW_JOBS=true turns it on.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${GENPIPE_MLFLOW_JOBS:-false}" \
    MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow/basic_auth.ini" \
    MLFLOW_AUTH_ADMIN_USERNAME="$ADMIN_USER" \
    MLFLOW_AUTH_ADMIN_PASSWORD="$ADMIN_PASSWORD" \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$SECRET_KEY" \
    start_service mlflow "$BIN/mlflow" server --app-name basic-auth \
    --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
    --artifacts-destination "$STATE/mlflow/artifacts" --serve-artifacts

PREFECT_HOME="$STATE/prefect" \
    PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STATE/prefect/prefect.db" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_API_URL="http://$HOST:$PREFECT_PORT/api" \
    start_service prefect "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"

# Agents get random ports (0): their fixed defaults would clash between two nodes on one machine.
RAY_NODE_ARGS=(--num-cpus 1 --num-gpus 0 --temp-dir "$RAY_TEMP_DIR"
    --object-store-memory "$RAY_OBJECT_STORE_BYTES" --dashboard-agent-listen-port 0
    --disable-usage-stats --block)
# Without Ray Serve there is nothing to drain: stop at once on SIGTERM.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
start_ray_node ray-head "head node up" 1 --head --port "$RAY_PORT" --include-dashboard false
start_ray_node ray-worker "2 nodes in the cluster" 2 --address "$HOST:$RAY_PORT"

wait_until mlflow "healthy at http://$HOST:$MLFLOW_PORT" http_ok "http://$HOST:$MLFLOW_PORT/health"
curl -fsS --max-time 10 -o /dev/null -u "$ADMIN_USER:$ADMIN_PASSWORD" \
    "http://$HOST:$MLFLOW_PORT/api/2.0/mlflow/users/current" ||
    fail "MLflow rejects the admin credentials for '$ADMIN_USER': its user store" \
        "$STATE/mlflow/basic_auth.db was created with another password (unset MLFLOW_AUTH_ADMIN_PASSWORD" \
        "to use the stored one, or remove $STATE/mlflow to start afresh)"
# Kept only now that MLflow accepts them: its user store holds this password from here on.
(
    umask 077
    printf 'STORED_ADMIN_USER=%q\nSTORED_ADMIN_PASSWORD=%q\nSTORED_SECRET_KEY=%q\n' \
        "$ADMIN_USER" "$ADMIN_PASSWORD" "$SECRET_KEY" >"$SECRETS"
)
wait_until prefect "healthy at http://$HOST:$PREFECT_PORT/api" http_ok "http://$HOST:$PREFECT_PORT/api/health"

(
    umask 077
    {
        printf '# genpipe stack in %s; written by infra/stack/up.sh\n' "$STATE"
        printf 'export MLFLOW_TRACKING_URI=%q\n' "http://$HOST:$MLFLOW_PORT"
        printf 'export MLFLOW_TRACKING_USERNAME=%q\n' "$ADMIN_USER"
        printf 'export MLFLOW_TRACKING_PASSWORD=%q\n' "$ADMIN_PASSWORD"
        printf 'export PREFECT_API_URL=%q\n' "http://$HOST:$PREFECT_PORT/api"
        printf 'export RAY_ADDRESS=%q\n' "$HOST:$RAY_PORT"
        printf 'export RAY_AUTH_MODE=token\n'
        printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$RAY_AUTH_TOKEN_PATH"
    } >"$STATE/env"
)
say "up: MLflow http://$HOST:$MLFLOW_PORT  Prefect http://$HOST:$PREFECT_PORT  Ray $HOST:$RAY_PORT"
if [[ "$STATE" == "$STACK_ROOT/.stack" ]]; then
    echo "source .stack/env"
else
    echo "source $STATE/env"
fi
