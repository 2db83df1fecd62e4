#!/usr/bin/env bash
# Stop the stack that infra/stack/up.sh started in $GENPIPE_STACK_DIR (default .stack/); safe when
# nothing runs. Only the processes of the sessions recorded in its pid files are signalled, never a
# global `ray stop`, which would also end every other Ray instance on the machine (a test session's).
# Data (MLflow and Prefect databases, artifacts, credentials) stays; remove the directory to start afresh.
set -euo pipefail
# shellcheck source=infra/stack/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_all
say "stopped (data kept in $STATE)"
