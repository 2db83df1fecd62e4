# Settings and process helpers shared by up.sh and down.sh (sourced, not run).
# Every knob is an environment variable with a default, so tests can run a second stack beside yours.

STACK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="$(mkdir -p "${GENPIPE_STACK_DIR:-$STACK_ROOT/.stack}" && cd "${GENPIPE_STACK_DIR:-$STACK_ROOT/.stack}" && pwd)"
BIN="$(cd "${GENPIPE_BIN:-$STACK_ROOT/.venv/bin}" && pwd)"
HOST=127.0.0.1
MLFLOW_PORT="${GENPIPE_MLFLOW_PORT:-5055}"
PREFECT_PORT="${GENPIPE_PREFECT_PORT:-4205}"
RAY_PORT="${GENPIPE_RAY_PORT:-6385}"
# Ray's Unix socket paths must stay under ~107 characters, so its temp dir cannot live in .stack/.
RAY_TEMP_DIR="${GENPIPE_RAY_TEMP_DIR:-/tmp/ray-genpipe-$RAY_PORT}"
RAY_OBJECT_STORE_BYTES="${GENPIPE_RAY_OBJECT_STORE_BYTES:-200000000}"
STARTUP_TIMEOUT_S="${GENPIPE_STACK_TIMEOUT_S:-150}"
SERVICES=(ray-worker ray-head prefect mlflow)

PIDS="$STATE/pids"
LOGS="$STATE/logs"
mkdir -p "$PIDS" "$LOGS"

say() { printf 'genpipe stack: %s\n' "$*"; }

# The pid a service was started with; setsid made it the leader of its own session, so the
# session id names the server and everything it spawned (Ray's workers move to process groups of
# their own, but stay in the session).
pid_of() { [[ -s "$PIDS/$1.pid" ]] && cat "$PIDS/$1.pid"; }

# Processes of a session that still run. Zombies are left out: they only wait for init to reap them.
session_pids() { ps -o pid=,stat= -s "$1" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}'; }

service_alive() {
    local pid
    pid="$(pid_of "$1")" || return 1
    [[ -n "$(session_pids "$pid")" ]]
}

any_session_alive() {
    local sid
    for sid in "$@"; do
        [[ -n "$(session_pids "$sid")" ]] && return 0
    done
    return 1
}

signal_sessions() {
    local signal=$1 sid
    shift
    for sid in "$@"; do
        # shellcheck disable=SC2046
        kill "-$signal" $(session_pids "$sid") 2>/dev/null || true
    done
}

# Polls for up to $1 half-seconds; true once no process of the given sessions runs.
wait_sessions_gone() {
    local ticks=$1 waited=0
    shift
    while any_session_alive "$@"; do
        ((waited++ < ticks)) || return 1
        sleep 0.5
    done
}

# SIGTERM every process of every service at once (as `ray stop` does for all of Ray), give them a
# grace period together, then SIGKILL what is left.
stop_all() {
    local name sessions=()
    for name in "${SERVICES[@]}"; do
        if service_alive "$name"; then
            say "stopping $name (session $(pid_of "$name"))"
            sessions+=("$(pid_of "$name")")
        fi
    done
    if ((${#sessions[@]})); then
        signal_sessions TERM "${sessions[@]}"
        if ! wait_sessions_gone 30 "${sessions[@]}"; then
            say "some processes ignored SIGTERM for 15 s; sending SIGKILL"
            signal_sessions KILL "${sessions[@]}"
            wait_sessions_gone 10 "${sessions[@]}" || say "warning: processes of sessions ${sessions[*]} survive SIGKILL"
        fi
    fi
    for name in "${SERVICES[@]}"; do
        rm -f "$PIDS/$name.pid"
    done
    if [[ -s "$STATE/ray-temp-dir" ]]; then
        # Only the directory this stack created and recorded, and only once its Ray is gone.
        local temp_dir
        temp_dir="$(cat "$STATE/ray-temp-dir")"
        [[ "$temp_dir" == /tmp/ray-* ]] && rm -rf -- "$temp_dir"
        rm -f "$STATE/ray-temp-dir"
    fi
    rm -f "$STATE/env"
}
