#!/usr/bin/env bash
# Join a Ray cluster whose head runs token authentication (cluster/start-head.sh).
#   RAY_AUTH_TOKEN=... cluster/start-worker.sh HEAD_IP:6379 [ray start options...]
# (or put the head's token in ~/.ray/auth_token on this machine)
set -euo pipefail
if [[ $# -lt 1 ]]; then echo "usage: start-worker.sh HEAD_IP:PORT [ray start options...]" >&2; exit 2; fi
export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
  echo "start-worker: no Ray auth token: set RAY_AUTH_TOKEN or copy the head's ~/.ray/auth_token here" >&2
  exit 1
fi
address="$1"; shift
exec ray start --address="$address" --disable-usage-stats "$@"
