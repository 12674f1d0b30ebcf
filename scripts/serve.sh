#!/usr/bin/env bash
# One command: install janus-server and serve it on the in-process queue (REST :8000, gRPC :50051).
# With no --model (and no JANUS_MODEL) it writes and serves a tiny random checkpoint, which needs no
# download; pass --model DIR_OR_HUB_ID for a real Janus-Pro. Other flags go to `janus-server serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
args=("$@")
if [[ " ${args[*]-} " != *" --model "* && -z "${JANUS_MODEL:-}" ]]; then
  if [ ! -f .cache/tiny-model/config.json ]; then
    .venv/bin/janus-server tiny-model .cache/tiny-model
  fi
  args+=(--model .cache/tiny-model)
fi
exec .venv/bin/janus-server serve "${args[@]}"
