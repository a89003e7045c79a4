#!/usr/bin/env bash
# Start a Ray head with token authentication on (Ray 2.60's `ray start --head` leaves it off
# unless RAY_AUTH_MODE=token is set or a token file exists; it never creates a token).
#   cluster/start-head.sh [ray start options...]     e.g. --port=6379 --num-cpus=8
# The token: $RAY_AUTH_TOKEN if set, else ~/.ray/auth_token (created here on first use).
# Copy that token to every worker and every client (RAY_AUTH_TOKEN or ~/.ray/auth_token) and
# set RAY_AUTH_MODE=token there; cluster/start-worker.sh does it for workers.
set -euo pipefail
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  ray get-auth-token --generate >/dev/null 2>&1 \
    || { echo "start-head: could not create a Ray auth token in ~/.ray" >&2; exit 1; }
fi
# The dashboard (job server) stays on loopback: reach it through an SSH tunnel or port-forward.
exec ray start --head --dashboard-host=127.0.0.1 --disable-usage-stats "$@"
