#!/usr/bin/env bash
# One command: install janus-server (skipped when nothing changed) and serve it in the foreground on
# the in-process queue: the playground and REST on :8000, gRPC on :50051; Ctrl+C stops it.
# With no --model (and no JANUS_MODEL) it writes and serves a tiny random checkpoint with Janus-Pro's
# shapes (384x384 images, 576 generation steps; noise, not pictures), which needs no download; pass
# --model DIR_OR_HUB_ID for a real Janus-Pro. Other flags go to `janus-server serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
args=("$@")
if [[ " ${args[*]-} " != *" --model "* && " ${args[*]-} " != *" --model="* && -z "${JANUS_MODEL:-}" ]]; then
  tiny=.cache/tiny-model-384
  if [ ! -f "$tiny/config.json" ]; then
    # keep the log JSON-only: the writer's own line is shown only if it fails
    if ! out=$(.venv/bin/janus-server tiny-model "$tiny" --image-size 384 2>&1); then
      echo "$out" >&2
      exit 1
    fi
  fi
  printf '{"ts": %s, "level": "info", "logger": "serve.sh", "msg": "no --model given: serving the tiny random checkpoint in %s (random weights: noise images and nonsense text, for trying the API offline)"}\n' \
    "$(date +%s)" "$tiny" >&2
  args+=(--model "$tiny")
fi
exec .venv/bin/janus-server serve "${args[@]}"
